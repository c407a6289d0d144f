"""GPU benchmark: a ~124M and a ~350M GPT (sequence 1024, bf16-mixed, AdamW, regional compile)
trained by a raw PyTorch loop, by ``lt.run`` and by Lightning Fabric, interleaved; tokens/s,
TFLOP/s, MFU against the bf16 matmul peak measured in the same run, peak memory; then fp8
(bf16 vs torchao float8 vs Transformer Engine) and an nf4 QLoRA step.

    python tests/benchmarks/gpu.py [--out DIR] [--budget 270]     # on one CUDA GPU, ~4 minutes
    python tests/benchmarks/gpu.py --smoke                         # tiny, on the CPU, under a minute

Targets (issue 15): ltransform's tokens/s >= 0.99x raw and >= Fabric's in the same run; MFU >= 45%
for the 350M model. The code is ``ltransform.gpucheck.bench``; ``python -m ltransform.gpucheck``
runs it after the GPU checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltransform.gpucheck.bench import run_benchmark, to_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code, not speed")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu for --smoke)")
    parser.add_argument("--budget", type=float, default=None, help="seconds; later parts are skipped past it")
    parser.add_argument("--out", type=Path, default=None, help="also write gpu-bench.json and gpu-bench.md here")
    args = parser.parse_args()
    result = run_benchmark(smoke=args.smoke, device=args.device, budget_s=args.budget)
    text = to_markdown(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-bench.json").write_text(json.dumps(result, indent=1))
        (args.out / "gpu-bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
