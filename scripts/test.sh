#!/usr/bin/env bash
# Fresh machine to test results: install ltransform with its test tools, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${PYTHON:-python3}" -m pytest "$@"
