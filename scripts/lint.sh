#!/usr/bin/env bash
# Lint and type-check with the configuration in pyproject.toml ([tool.ruff], [tool.mypy]): the
# dev extra installs the pinned ruff and mypy (skip that with --no-install); both must report no
# error. Both run, so one run shows every finding.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ "${1:-}" != "--no-install" ]; then bash scripts/setup.sh dev; fi
status=0
"$py" -m ruff check ltransform tests || status=1
"$py" -m mypy ltransform || status=1
exit $status
