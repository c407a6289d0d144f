"""A one-command check of ltransform's CUDA paths, and a CPU smoke run of the same checks.

    python -m ltransform.gpucheck                  # on a CUDA machine: every check at full size, then the benchmark
    python -m ltransform.gpucheck --smoke          # anywhere: the same checks, tiny, on the CPU (CUDA-only ones skip)
    bash scripts/gpu-check.sh [--budget 480] [--no-bench] [--checks fsdp,qlora] [--out DIR]

Each check (``checks.CHECKS``) compares an ltransform path against a hand-written plain-PyTorch
reference where the math allows. They run in a worker process watched by a supervisor
(``runner.py``): a check that hangs is killed at its timeout, one that crashes the worker is
recorded with the log's tail, and the rest go on, all within a global time budget. The results
are written to ``gpu-check.json`` and ``gpu-check.md`` after every check. ``import ltransform``
never imports this package.
"""
