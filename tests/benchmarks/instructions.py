"""Per-step overhead in CPU instructions (valgrind's callgrind): deterministic where time is noisy.

    python tests/benchmarks/instructions.py            # needs valgrind; ~10 minutes on 2 cores

Wall-clock ratios on a shared virtual machine drift by several percent between runs; an
instruction count does not. Each case runs under callgrind at two lengths (50 and 250
steps) with string hashing and every thread pool fixed, and the difference divided by 200
is what one step costs, start-up cancelled out. The cases are the tiny-MLP ones of
``overhead.py``, raw and through ``lt.run``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHORT, LONG = 50, 250


def run_case(case: str, steps: int) -> None:
    """Train the tiny MLP for ``steps`` steps one way (called inside valgrind)."""
    sys.path.insert(0, str(HERE))
    import overhead

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 32, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(steps)]
    model = overhead.mlp(32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    if case.startswith("raw"):
        raw = overhead.raw_plain if case == "raw" else overhead.raw_transformed
        raw(model, optimizer, data)
    else:
        import ltransform as lt

        ours = overhead.lt_plain() if case == "lt" else overhead.lt_transformed()
        ours(lt.State(model=model, optimizer=optimizer), data)


def instructions(case: str, steps: int, out_dir: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    log = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/{case}.{steps}.out",
         sys.executable, __file__, "--case", case, str(steps)],
        capture_output=True, text=True, env=env, check=True,
    ).stderr
    return int(re.search(r"Collected : (\d+)", log).group(1))


def main() -> None:
    if sys.argv[1:2] == ["--case"]:
        run_case(sys.argv[2], int(sys.argv[3]))
        return
    with tempfile.TemporaryDirectory() as out_dir:
        per_step = {}
        for case in ("raw", "lt", "raw+transforms", "lt+transforms"):
            short, long = instructions(case, SHORT, out_dir), instructions(case, LONG, out_dir)
            per_step[case] = (long - short) / (LONG - SHORT)
            print(f"{case:<16} {per_step[case]:12,.0f} instructions/step", flush=True)
    for raw, ours in (("raw", "lt"), ("raw+transforms", "lt+transforms")):
        print(f"{ours:<16} / {raw:<16} {per_step[ours] / per_step[raw]:.3f}")


if __name__ == "__main__":
    main()
