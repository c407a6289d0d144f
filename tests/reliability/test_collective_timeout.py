"""A collective that never completes ends in an error naming the rank and the operation, after the
configured timeout, and the launcher reports it: never an endless hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ltransform as lt
from ltransform.distributed import env

SCRIPT = Path(__file__).with_name("faulty_train.py")
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
TIMEOUT = 3


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", ["lt.launch", "ltransform run"])
def test_a_stuck_rank_ends_the_other_with_the_timeout_error_and_the_launcher_reports_it(tmp_path, launcher):
    # rank 1 sleeps for an hour after step 5; rank 0 waits in step 6's gradient all-reduce
    args = [str(tmp_path), "--steps", "40", "--hang-at", "5", "--stop-within", "2"]
    command = ([sys.executable, str(SCRIPT), *args, "--devices", "2", "--timeout", str(TIMEOUT)]
               if launcher == "lt.launch" else
               [sys.executable, "-m", "ltransform", "run", "--devices", "2", "--timeout", str(TIMEOUT), str(SCRIPT),
                *args])
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)
    assert done.returncode != 0
    hang_started = (tmp_path / "progress-rank1").stat().st_mtime  # written just before the sleep
    when, error = (tmp_path / "error-rank0").read_text().split(" ", 1)
    waited = float(when) - hang_started
    assert TIMEOUT - 0.5 <= waited <= TIMEOUT + 15, waited  # the configured time, with a margin for a busy CPU
    assert error.startswith(f"CollectiveError: rank 0: a collective of the step call (step 6) did not complete "
                            f"within {TIMEOUT} s: another rank is stuck or gone"), error
    assert "LTRANSFORM_COLLECTIVE_TIMEOUT=SECONDS" in error and "Timed out" in error
    # the launcher names the rank and the error
    if launcher == "lt.launch":
        assert "LaunchError: lt.launch: rank 0 failed first (local rank 0 on node 0), at " in done.stderr
        assert "CollectiveError: rank 0: a collective of the step call (step 6) did not complete" in done.stderr
    else:
        assert "CollectiveError: rank 0: a collective of the step call (step 6)" in done.stderr
        # ltransform's one paragraph comes last, instead of torchrun's ChildFailedError report
        assert done.stderr.rstrip().splitlines()[-1].startswith("ltransform run: rank 0 failed first"), done.stderr
        assert "ChildFailedError" not in done.stderr


def test_the_timeout_option_and_variable_are_checked(monkeypatch):
    with pytest.raises(ValueError, match=r"lt.launch: timeout must be a positive number of seconds or None, got 0"):
        lt.launch(print, devices=1, timeout=0)
    monkeypatch.setenv("LTRANSFORM_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"LTRANSFORM_COLLECTIVE_TIMEOUT='soon': expected a positive number"):
        env.collective_timeout()
    monkeypatch.setenv("LTRANSFORM_COLLECTIVE_TIMEOUT", "2.5")
    assert env.collective_timeout().total_seconds() == 2.5
    monkeypatch.delenv("LTRANSFORM_COLLECTIVE_TIMEOUT")
    assert env.collective_timeout() is None


def test_only_errors_of_collectives_are_wrapped(one_rank_group):
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation")
    wrapped = env.collective_error(timed_out, "all_reduce")
    assert isinstance(wrapped, lt.CollectiveError) and wrapped.rank == 0 and wrapped.operation == "all_reduce"
    assert str(wrapped).startswith("rank 0: all_reduce did not complete within the process group's timeout")
    gone = env.collective_error(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"), "barrier")
    assert "another rank closed its connection (it died or exited)" in str(gone)
    assert env.collective_error(RuntimeError("my own code timed out"), "x") is None  # not from torch.distributed
    assert env.collective_error(ValueError("gloo Timed out"), "x") is None


def test_cli_passes_the_timeout_to_the_ranks(monkeypatch):
    from ltransform.cli import _parser

    assert _parser().parse_args(["run", "--timeout", "30", "train.py"]).timeout == 30.0
    with pytest.raises(SystemExit, match="--timeout must be a positive number of seconds, got -1"):
        from ltransform.cli import main
        main(["run", "--timeout", "-1", "x.py"])
