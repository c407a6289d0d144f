#!/usr/bin/env bash
# Install ltransform (editable) and the extras named in $1 into the current Python.
# An installed torch is kept; with none, torch==2.13.0 is pinned (an unpinned torch
# would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0"
fi
target=.
if [ -n "${1:-}" ]; then target=".[$1]"; fi
"$py" -m pip install -q --disable-pip-version-check -e "$target"
