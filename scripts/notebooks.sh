#!/usr/bin/env bash
# Execute notebooks/*.ipynb (or the ones named) in place and save them with their outputs.
# Commit the result: GitHub shows the plots. See scripts/notebooks.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/notebooks.py "$@"
