#!/bin/sh
# Make sure .venv (at the repo root) exists and holds the pinned requirements.
# Usage: sh tools/venv.sh REQUIREMENTS_FILE   (prints nothing when already up to date)
# pip runs only when the requirement files changed since the last successful install.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
req="$root/${1:-requirements.txt}"
stamp="$venv/.installed-$(basename "$req")"
want=$(cat "$root/requirements.txt" "$req")
if [ ! -x "$venv/bin/python" ]; then
    echo "[venv] creating $venv"
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[venv] installing $(basename "$req") (first run: about a minute)"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
    printf '%s' "$want" > "$stamp"
fi
