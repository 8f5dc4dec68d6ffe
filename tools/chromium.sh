#!/bin/sh
# Make sure Debian's chromium is installed, for the browser test of serve.py's page
# (tests/test_serve_browser.py drives it with Playwright; nothing is downloaded at run time).
# Prints nothing when it is already there. Needs root and apt-get; elsewhere it says so and
# returns 0: the test then skips, or fails under CI=true.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[chromium] not installed, and cannot install it here (needs root and apt-get):" \
         "the browser test will not run" >&2
    exit 0
fi
echo "[chromium] installing Debian's chromium (first run: a minute or two)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
