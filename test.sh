#!/bin/sh
# Run the test suite on CPU: sets up .venv (first run installs the pinned requirements) and
# chromium (tools/chromium.sh, as root), then pytest.
# Extra arguments go to pytest, e.g.  sh test.sh -k optim -x,  sh test.sh tests/test_optim.py
set -eu
cd "$(dirname "$0")"
sh tools/venv.sh requirements-test.txt
# Debian's chromium, for the browser test of serve.py's page (which, where chromium is missing,
# skips, or fails under CI=true; a failed install does not stop the other tests)
sh tools/chromium.sh || echo "[chromium] install failed" >&2
# the whole of tests/, unless the arguments name tests of their own (sh test.sh tests/test_x.py)
whole=tests
for a in "$@"; do case $a in tests|tests/*) whole= ;; esac; done
exec .venv/bin/python -m pytest $whole --timeout=900 "$@"
