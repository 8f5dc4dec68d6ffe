#!/bin/sh
# Make sure .venv (at the repo root) exists and holds the pinned requirements.
# Usage: sh tools/venv.sh REQUIREMENTS_FILE   (prints nothing when already up to date)
# pip runs only when the requirement files (or TORCH_INDEX_URL) changed since the last successful
# install.
# TORCH_INDEX_URL: where to take the pinned torch from, before the rest, e.g. PyTorch's CPU-only
# builds (https://download.pytorch.org/whl/cpu) where PyPI's Linux wheel is the CUDA build; unset,
# pip takes torch from where it takes everything else (PyPI).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
req="$root/${1:-requirements.txt}"
stamp="$venv/.installed-$(basename "$req")"
torch_index=${TORCH_INDEX_URL:-}
want=$(cat "$root/requirements.txt" "$req"; [ -z "$torch_index" ] || echo "torch from $torch_index")
if [ ! -x "$venv/bin/python" ]; then
    echo "[venv] creating $venv"
    python3 -m venv "$venv"
fi
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if [ -n "$torch_index" ]; then
        torch=$(grep -E '^torch==' "$root/requirements.txt")
        echo "[venv] installing $torch from $torch_index"
        if "$venv/bin/python" -m pip show -q torch >/dev/null 2>&1; then
            # another build of it may be there: pip would call it satisfied and keep it
            pip_install --force-reinstall --no-deps "$torch" --index-url "$torch_index"
        else
            pip_install "$torch" --index-url "$torch_index"
        fi
    fi
    echo "[venv] installing $(basename "$req") (first run: a minute or more, see README)"
    pip_install -r "$req"
    printf '%s' "$want" > "$stamp"
fi
