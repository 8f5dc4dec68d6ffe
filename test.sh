#!/bin/sh
# Run the test suite on CPU: sets up .venv (first run installs the pinned requirements) and
# chromium (tools/chromium.sh, as root), then pytest.
# Extra arguments go to pytest, e.g.  sh test.sh -k optim -x
set -eu
cd "$(dirname "$0")"
sh tools/venv.sh requirements-test.txt
sh tools/chromium.sh  # Debian's chromium, for the browser test of serve.py's page
exec .venv/bin/python -m pytest tests "$@"
