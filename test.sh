#!/bin/sh
# Run the test suite on CPU: sets up .venv (first run installs the pinned requirements) and
# chromium (tools/chromium.sh, as root), then pytest (tools/suite.py).
# Extra arguments go to pytest, e.g.  sh test.sh -k optim -x,  sh test.sh tests/test_optim.py
set -eu
cd "$(dirname "$0")"
sh tools/venv.sh requirements-test.txt
# Debian's chromium, for the browser test of serve.py's page (which, where chromium is missing,
# skips, or fails under CI=true; a failed install does not stop the other tests)
sh tools/chromium.sh || echo "[chromium] install failed" >&2
# the tests two at a time, then the mutation check (tools/suite.py); the whole of tests/ unless
# the arguments name tests of their own (sh test.sh tests/test_x.py)
exec .venv/bin/python -m tools.suite "$@"
