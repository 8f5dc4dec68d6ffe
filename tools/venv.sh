#!/bin/sh
# Make sure .venv (at the repo root) exists and holds the pinned requirements.
# Usage: sh tools/venv.sh REQUIREMENTS_FILE   (prints nothing when already up to date)
# pip runs only when the requirement files changed since the last successful install.
# TORCH_INDEX_URL: where to take the pinned torch from, before the rest: PyTorch's index of
# CPU-only builds (https://download.pytorch.org/whl/cpu), where PyPI's Linux wheel is the CUDA
# build, or of another CUDA version. Unset, pip takes torch from where it takes the rest (PyPI).
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
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch="$(grep -E '^torch==' "$root/requirements.txt") from $TORCH_INDEX_URL"
    if [ "$(cat "$venv/.installed-torch" 2>/dev/null)" != "$torch" ]; then
        echo "[venv] installing $torch"
        if "$venv/bin/python" -m pip show -q torch >/dev/null 2>&1; then
            # another build of it may be there: pip would call it satisfied and keep it
            pip_install --force-reinstall --no-deps "${torch%% *}" --index-url "$TORCH_INDEX_URL"
        else
            pip_install "${torch%% *}" --index-url "$TORCH_INDEX_URL"
        fi
        printf '%s' "$torch" > "$venv/.installed-torch"
    fi
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[venv] installing $(basename "$req") (first run: a minute or more, see README)"
    pip_install -r "$req"
    printf '%s' "$want" > "$stamp"
fi
