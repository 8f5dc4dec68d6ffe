#!/bin/sh
# Preprocess the dataset described by a paths file (see make_data.py for the outputs).
# Usage: sh preprocessing/generate_data.sh [PATHS_YAML] [--workers N]   (from any directory)
# PATHS_YAML defaults to preprocessing/paths.yaml. Rerunning after an interruption resumes.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
paths=${1:-$here/paths.yaml}
[ $# -gt 0 ] && shift
# The paths file is named relative to the caller's directory, but python runs from the repo root.
case $paths in /*) ;; *) paths="$(pwd)/$paths" ;; esac
py=python3
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
cd "$root"
exec "$py" -m preprocessing.make_data "$paths" "$@"
