"""The demo runs as `python -m ltransform.examples.gpt`, and its loss falls."""

import csv
import re
import subprocess
import sys

import pytest


TINY = ["--max-steps", "30", "--n-layer", "1", "--n-embd", "32",
        "--corpus-mb", "0.3", "--log-every", "5", "--eval-every", "15", "--sample-chars", "40", "--no-progress"]
PYTHON_M = [sys.executable, "-m"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]


@pytest.mark.parametrize("launcher, flags", [
    (PYTHON_M, []),
    (PYTHON_M, ["--precision", "bf16-mixed", "--accumulate", "2"]),
    (PYTHON_M, ["--devices", "2", "--strategy", "ddp"]),
    (PYTHON_M, ["--devices", "2", "--strategy", "fsdp", "--accumulate", "2"]),
    (TORCHRUN, ["--strategy", "fsdp"]),
    (PYTHON_M, ["--compile"]),
], ids=["one-process", "bf16-accumulate", "2-ddp", "2-fsdp-accumulate", "torchrun-fsdp", "compile"])
def test_demo_trains_logs_and_samples(tmp_path, launcher, flags):
    out = subprocess.run(
        [*launcher, "ltransform.examples.gpt", *TINY, "--run-dir", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, out
    assert "val_loss" in out and out.count("sample:") == 1 and out.count("trained 30 steps") == 1  # rank 0 only
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows if r["loss"]] == ["5", "10", "15", "20", "25", "30"]
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
