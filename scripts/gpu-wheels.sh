#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels of the GPU check's optional packages into .whl/
# (git-ignored), for a GPU machine without network: scripts/gpu-check.sh installs them from
# there (--no-deps, so the machine's own torch stays) when they are missing. With the device
# runner: run(command="bash scripts/gpu-check.sh", carry=[".whl"]) (~46 MB).
#   bitsandbytes 0.50.2: CUDA 11.8-13.2 kernels in one wheel; torchao 0.17: torch 2.9-2.11.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python || command -v python3)}"
"$python" -m pip download -q --no-deps -d .whl "bitsandbytes==0.50.2" "torchao==0.17.0"
ls -la .whl
