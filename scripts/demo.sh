#!/usr/bin/env bash
# Fresh machine to trained GPT: install ltransform, then run the demo (flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m ltransform.examples.gpt "$@"
