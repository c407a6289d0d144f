#!/usr/bin/env bash
# The XLA job: torch_xla's SPMD on PJRT's CPU devices, in a venv of its own, since torch_xla must
# match torch's major.minor (torch 2.9.0 + torch_xla 2.9.0, the newest pair published; ~7 GB,
# ~3 minutes to build, reused when present). Runs tests/xla, each check in its own process.
#   LTRANSFORM_XLA_VENV  where the venv lives (default ~/.cache/ltransform/venv-xla-2.9)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LTRANSFORM_XLA_VENV:-$HOME/.cache/ltransform/venv-xla-2.9}
py=$venv/bin/python
if ! "$py" -c "import torch_xla, pytest, pytest_timeout" 2>/dev/null; then
    echo "test-xla: building $venv (torch 2.9.0 + torch_xla 2.9.0)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$py" -m pip install -q --disable-pip-version-check "torch==2.9.0" "torch_xla==2.9.0" pytest pytest-timeout
fi
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>/dev/null \
    || "$py" -m pip install -q --disable-pip-version-check -e .
export LTRANSFORM_TEST_XLA=1 PJRT_DEVICE=CPU CPU_NUM_DEVICES=4
exec "$py" -m pytest tests/xla -p no:cacheprovider "$@"
