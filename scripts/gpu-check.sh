#!/usr/bin/env bash
# One command for a GPU machine: every CUDA path of ltransform checked against hand-written
# PyTorch, then the GPU benchmark, within a time budget (default 480 s). Writes gpu-check.json,
# gpu-check.md and worker.log to $OUT if set (the device runner's folder), else gpu-check-out/.
# Exit code 1 if any check failed, or a part of the benchmark (a benchmark cut short at the end of
# the budget keeps the parts that finished and is not a failure by itself). Flags pass through
# (a later --out wins), e.g.:
#   bash scripts/gpu-check.sh --no-bench --checks fsdp,qlora --budget 300
#   bash scripts/gpu-check.sh --smoke          # the CPU smoke run of the same checks
#   bash scripts/gpu-check.sh --list
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's ltransform, installed or not
python="${PYTHON:-$(command -v python || command -v python3)}"
# no network there: the optional packages come as wheels in .whl/ (scripts/gpu-wheels.sh), if at all
if [ -d "$root/.whl" ]; then
    for pkg in bitsandbytes torchao; do
        if ! "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)"; then
            "$python" -m pip install -q --no-deps --no-index --find-links "$root/.whl" "$pkg" \
                || echo "gpu-check: $pkg could not be installed from .whl/; its checks skip"
        fi
    done
fi
exec "$python" -m ltransform.gpucheck --out "${OUT:-gpu-check-out}" "$@"
