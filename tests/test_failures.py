"""A failed rank under lt.launch and ``ltransform run``: one paragraph naming the rank that failed
first and why (real processes, torch's own agent); ``consolidate`` and ``inspect`` errors in one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ltransform as lt
from ltransform.cli import main

ROOT = str(Path(__file__).resolve().parents[1])
FIRST = r"rank 1 failed first \(local rank 1 on node 0\), at \d\d:\d\d:\d\d\.\d{3}: "


def rank_1_fails(how: str) -> None:
    """Rank 1 raises or is killed while rank 0 waits for it in a barrier."""
    import torch.distributed as dist

    lt.all_reduce(torch.tensor([1.0]), "sum")  # both ranks are in the group
    if lt.rank() == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("bad batch 7")
    dist.barrier()


def test_launch_names_the_rank_that_raised_first():
    with pytest.raises(lt.LaunchError) as caught:
        lt.launch(rank_1_fails, "raise", devices=2)
    message = str(caught.value)
    assert re.match(f"lt.launch: {FIRST}ValueError: bad batch 7 \\(test_failures.py:\\d+, in rank_1_fails\\)\\.",
                    message), message
    assert caught.value.first == 1 and next(iter(caught.value.failures)) == 1
    assert "\n" not in message  # one paragraph
    path = re.search(r"Full traceback: (\S+)", message)
    assert path and "ValueError: bad batch 7" in Path(path.group(1)).read_text(), message


def test_launch_names_the_rank_killed_by_sigkill():
    with pytest.raises(lt.LaunchError) as caught:
        lt.launch(rank_1_fails, "kill", devices=2)
    message = str(caught.value)
    assert re.match(f"lt.launch: {FIRST}killed by signal SIGKILL\\.", message), message
    assert "No Python traceback" in message and caught.value.first == 1


RESTARTED = """
import torch, ltransform as lt

def work():
    lt.all_reduce(torch.tensor([1.0]), "sum")
    if lt.rank() == 1:
        raise ValueError("bad batch 7")
    torch.distributed.barrier()

if __name__ == "__main__":
    try:
        lt.launch(work, devices=2, max_restarts=1)
    except lt.LaunchError as error:
        print(error)
"""


def test_after_a_restart_the_last_attempt_is_summarised_and_the_restart_noted_in_one_line(tmp_path):
    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=environ)
    message = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""  # gloo may print before
    assert re.match(f"lt.launch: {FIRST}ValueError: bad batch 7", message), done.stderr[-3000:]
    assert "/attempt_1/1/error.json" in message  # the second attempt's traceback
    noted = [line for line in done.stderr.splitlines() if "failed (exitcode: " in line]
    assert len(noted) == 1, done.stderr[-3000:]  # the agent's note of the failure it restarted after only
    assert "ProcessRaisedException" not in done.stderr, done.stderr[-3000:]  # without torch's internals


SCRIPT = """
import os, signal, sys, torch, ltransform as lt

lt.all_reduce(torch.tensor([1.0]), "sum")
if lt.rank() == 1:
    if sys.argv[1:] == ["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError("bad batch 7")
torch.distributed.barrier()
"""


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ltransform", "run", "--devices", "2", str(script), *args],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=environ)


def summary_of(done: subprocess.CompletedProcess[str]) -> str:
    """The last paragraph of stderr, checked to be ours and the only story of the launcher itself."""
    err = done.stderr
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("ltransform run: "), err[-3000:]
    tracebacks = [line for line in err.splitlines() if "Traceback (most recent call last)" in line]
    assert all(line.startswith("[rank") for line in tracebacks), err[-3000:]  # the workers' own, not the CLI's
    assert "Root Cause" not in err and "ChildFailedError" not in err, err[-3000:]  # torchrun's summary replaced
    return last


def test_cli_names_the_rank_that_raised_first(tmp_path):
    done = run_cli(tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    last = summary_of(done)
    assert re.match(f"ltransform run: {FIRST}ValueError: bad batch 7 \\(train.py:8, in <module>\\)\\.", last), last
    assert "[rank1]: ValueError: bad batch 7" in done.stderr  # the rank's own traceback stays
    assert "Full traceback: " in last


def test_cli_names_the_rank_killed_by_sigkill(tmp_path):
    done = run_cli(tmp_path, "kill")
    assert done.returncode == 128 + signal.SIGKILL, done.stderr[-3000:]
    last = summary_of(done)
    assert re.match(f"ltransform run: {FIRST}killed by signal SIGKILL\\.", last), last


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    sharded = lt.save(root / "sharded", lt.State(model=torch.nn.Linear(2, 1)), sharded=True)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    for file in Path(sharded).iterdir():
        data = bytearray(file.read_bytes())
        if file.suffix == ".distcp":
            data[len(data) // 2] ^= 0xFF
        (corrupt / file.name).write_bytes(bytes(data))
    (root / "junk.pt").write_text("hello\n")
    return root


@pytest.mark.parametrize("args, message", [
    (["consolidate", "{root}/missing", "{root}/out.pt"], r"'\S+/missing' is not a complete sharded ltransform "
                                                         r"checkpoint \(no common.pt\)"),
    (["consolidate", "{root}/junk.pt", "{root}/out.pt"], r"'\S+/junk.pt' is not a complete sharded"),
    (["consolidate", "{root}/corrupt", "{root}/out.pt"], r"its file '__0_0.distcp' does not match its checksum"),
    (["consolidate", "{root}/sharded", "{root}/out.bin"], r"OUT must end in .pt, .pth, .ckpt \(a full checkpoint\) "
                                                          r"or .safetensors \(the weights only\), got '\S+/out.bin'"),
    (["consolidate", "{root}/sharded", "{root}/junk.pt/out.pt"], r"\[Errno \d+\] .*junk.pt"),  # cannot write
    (["inspect", "{root}/missing"], r"'\S+/missing' does not exist"),
    (["inspect", "{root}/junk.pt"], r"'\S+/junk.pt' is not an ltransform checkpoint"),
])
def test_checkpoint_commands_fail_in_one_line(checkpoints, args, message):
    with pytest.raises(SystemExit) as caught:
        main([arg.format(root=checkpoints) for arg in args])
    text = str(caught.value.code)
    assert text.startswith(f"ltransform {args[0]}: ") and "\n" not in text, text
    assert not text.startswith(f"ltransform {args[0]}: {args[0]}:"), text  # the command named once
    assert re.search(message, text), text


def test_a_checkpoint_command_prints_no_traceback(checkpoints):
    done = subprocess.run([sys.executable, "-m", "ltransform", "consolidate", str(checkpoints / "corrupt"),
                           str(checkpoints / "out.pt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ltransform consolidate: the sharded "), done.stderr
