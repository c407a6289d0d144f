"""`import ltransform` stays light: no optional extras, no heavy submodules."""

import subprocess
import sys

# (tqdm is not listed: torch itself imports it.)
OPTIONAL = ["bitsandbytes", "transformer_engine", "torch_xla", "tensorboard", "wandb", "mlflow", "torchao",
            "torch.utils.tensorboard", "matplotlib", "numpy.testing"]


def test_import_ltransform_does_not_import_optional_extras():
    code = ("import sys, ltransform; "
            f"print(','.join(m for m in {OPTIONAL!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_time_over_torch_is_small():
    """`-X importtime` attributes time to each module; ltransform's own share must stay small."""
    code = "import torch, attrs; import ltransform"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         check=True).stderr
    own = [line for line in err.splitlines() if line.rstrip().endswith("| ltransform")]
    cumulative_us = int(own[0].split("|")[1])
    # The promise is <= 50 ms over torch (measured 23-36 ms here); 200 ms leaves room for a noisy machine.
    assert cumulative_us < 200_000, f"import ltransform took {cumulative_us / 1000:.1f} ms over torch"
