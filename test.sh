#!/bin/sh
# Run the test suite on CPU: sets up .venv (first run installs the pinned requirements), then pytest.
# Extra arguments go to pytest, e.g.  sh test.sh -k optim -x
set -eu
cd "$(dirname "$0")"
sh tools/venv.sh requirements-test.txt
exec .venv/bin/python -m pytest tests "$@"
