#!/bin/sh
# Preprocess the dataset described by a paths file (see make_data.py for the outputs).
# Usage: sh preprocessing/generate_data.sh [PATHS_YAML] [--workers N]   (from any directory)
# PATHS_YAML defaults to preprocessing/paths.yaml. Rerunning after an interruption resumes.
# The first run sets up .venv (tools/venv.sh: about a minute).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
paths=${1:-$here/paths.yaml}
[ $# -gt 0 ] && shift
# The paths file is named relative to the caller's directory, but python runs from the repo root.
case $paths in /*) ;; *) paths="$(pwd)/$paths" ;; esac
# The project's python: .venv, made or brought up to date first (as demo.sh does)
sh "$root/tools/venv.sh" requirements.txt
cd "$root"
exec .venv/bin/python -m preprocessing.make_data "$paths" "$@"
