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


@pytest.mark.parametrize("flags, shown", [
    (["--devices", "4", "--tp", "2", "--strategy", "fsdp"], "4 process(s), strategy fsdp, tensor parallel 2"),
    (["--devices", "2", "--tp", "2", "--loss-parallel"], "2 process(s), strategy auto, tensor parallel 2"),
], ids=["4-tp2-fsdp", "2-tp2-loss-parallel"])
def test_demo_trains_tensor_parallel(tmp_path, flags, shown):
    """--devices 4 --tp 2 --strategy fsdp: a 2 x 2 ("dp", "tp") mesh, lt.plans.gpt on "tp", FSDP over "dp";
    --devices 2 --tp 2: tensor parallel alone, here with the loss on logits split over the vocabulary."""
    out = subprocess.run(
        [*PYTHON_M, "ltransform.examples.gpt", "--max-steps", "20", "--n-layer", "1", "--n-embd", "32",
         "--corpus-mb", "0.3", "--log-every", "5", "--eval-every", "20", "--sample-chars", "20", "--no-progress",
         "--run-dir", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert shown in out
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, out
    assert out.count("trained 20 steps") == 1 and out.count("sample:") == 1  # rank 0 only


@pytest.mark.parametrize("flags, message", [
    (["--tp", "2"], "gpt: --tp 2 needs several processes, a multiple of it (e.g. --devices 4 --tp 2); got 1"),
    (["--devices", "4", "--tp", "3"], "gpt: --tp 3 needs several processes, a multiple of it (e.g. --devices 6 "
                                      "--tp 3); got 4 process(es)"),
    (["--devices", "4", "--tp", "2"], "gpt: --tp 2 on 4 processes leaves 2 data-parallel groups, which need "
                                      "--strategy fsdp"),
    (["--devices", "2", "--tp", "2", "--strategy", "ddp"], "gpt: --tp composes with --strategy fsdp"),
    (["--loss-parallel"], "gpt: --loss-parallel splits the output projection over the tensor-parallel ranks; give "
                          "--tp too"),
], ids=["one-device", "not-dividing", "dp-without-fsdp", "ddp", "loss-parallel-without-tp"])
def test_demo_tp_errors_are_one_clear_line(monkeypatch, flags, message):
    from ltransform.examples.gpt import check_tensor_parallel, parse_args

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as error:
        check_tensor_parallel(parse_args(flags))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
