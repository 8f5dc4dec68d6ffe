#!/bin/sh
# Like generate_data.sh, on only the first 10 batches of the (shuffled) train and of the val images:
# a quick end-to-end check. It writes to the same outputs; delete them before a full run.
# Usage: sh preprocessing/generate_toy_data.sh [PATHS_YAML] [--workers N]   (from any directory)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
paths=${1:-$here/paths.yaml}
[ $# -gt 0 ] && shift
exec sh "$here/generate_data.sh" "$paths" --toy "$@"
