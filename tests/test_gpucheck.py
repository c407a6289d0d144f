"""The GPU check's own code, on the CPU: the smoke run of every check, the report, the supervisor
(a check that hangs, one that kills its worker, the budget), and that ``import ltransform`` stays
without it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltransform.gpucheck.checks import CHECKS
from ltransform.gpucheck.common import SMOKE, Skip

CUDA_ONLY = {c.name for c in CHECKS if c.cuda_only}
CPU_CAPABLE = [c.name for c in CHECKS if not c.cuda_only]
HERE = Path(__file__).parent


def _cpu_env() -> dict[str, str]:
    root = str(HERE.parent)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [root, str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    started = time.monotonic()  # through the script, which writes to $OUT (the device runner's folder)
    done = subprocess.run(["bash", str(HERE.parent / "scripts" / "gpu-check.sh"), "--smoke", "--device", "cpu",
                           "--no-bench", "--budget", "100"], capture_output=True, text=True, timeout=120,
                          env={**_cpu_env(), "OUT": str(out), "PYTHON": sys.executable})
    return done, out, time.monotonic() - started


def test_the_smoke_run_passes_every_cpu_check_and_skips_the_cuda_ones(smoke):
    done, out, seconds = smoke
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    results = {r["name"]: r for r in report["checks"]}
    assert list(results) == [c.name for c in CHECKS]  # in the registry's order
    failed = {n: r.get("reason") for n, r in results.items() if r["status"] != "pass" and n not in CUDA_ONLY}
    assert not failed, failed
    for name in CUDA_ONLY:
        assert results[name]["status"] == "skip" and "CUDA" in results[name]["reason"], results[name]
    assert all(isinstance(r["duration_s"], float) for r in results.values())
    assert results["bf16-mixed"]["numbers"]["bitwise"] is True  # on the CPU the two loops agree bit for bit
    assert results["16-mixed"]["numbers"]["skipped_steps"] >= 1  # the inf step
    assert results["launch"]["numbers"]["backend"] == "gloo"
    assert report["summary"] == {"pass": len(CPU_CAPABLE), "fail": 0, "skip": len(CUDA_ONLY), "benchmark": None}
    env = report["environment"]
    assert env["torch"] == torch.__version__ and "bitsandbytes" in env["packages"] and env["cuda_available"] is False
    assert report["mode"] == "smoke" and report["finished"] is not None
    text = (out / "gpu-check.md").read_text()
    assert all(f"| {c.name} | {results[c.name]['status'].upper()} |" in text for c in CHECKS)
    assert "Not run (`--no-bench`" in text and (out / "worker.log").exists()
    assert f"{len(CPU_CAPABLE)} passed, 0 failed" in done.stdout


# --- the supervisor: checks of this module, run by the real worker ------------------------------

def passes(device, size):
    """A check that passes."""
    return {"device": str(device), "size": size.name}


def hangs(device, size):
    """A check that never returns (a collective waiting for a peer that never comes)."""
    time.sleep(600)


def crashes(device, size):
    """A check that kills its process (a segfault in a kernel)."""
    os.kill(os.getpid(), signal.SIGSEGV)


def fails(device, size):
    """A check whose result differs."""
    raise AssertionError("differs from the reference by 0.5")


def skips(device, size):
    raise Skip("needs a GPU")


def test_a_hang_and_a_crash_are_recorded_and_the_other_checks_still_run(tmp_path, monkeypatch):
    from ltransform.gpucheck.runner import Supervisor

    monkeypatch.setenv("PYTHONPATH", _cpu_env()["PYTHONPATH"])
    results = []
    jobs = {f"test_gpucheck:{name}": 60.0 for name in ("passes", "hangs", "crashes", "fails", "skips", "passes")}
    jobs["test_gpucheck:hangs"] = 2.0
    supervisor = Supervisor(device="cpu", size="smoke", out_dir=tmp_path, deadline=time.monotonic() + 100,
                            on_result=results.append, bench_budget=lambda: 0.0)
    supervisor.run(jobs)
    by_name = {r["name"].partition(":")[2]: r for r in results}
    assert [r["name"].partition(":")[2] for r in results] == ["passes", "hangs", "crashes", "fails", "skips"]
    assert by_name["passes"]["status"] == "pass" and by_name["passes"]["numbers"] == {"device": "cpu",
                                                                                       "size": "smoke"}
    assert by_name["hangs"]["status"] == "fail" and "timed out after 2 s" in by_name["hangs"]["reason"]
    assert by_name["crashes"]["status"] == "fail" and "SIGSEGV" in by_name["crashes"]["reason"]
    assert "log_tail" in by_name["crashes"]
    assert by_name["fails"]["status"] == "fail" and "differs from the reference" in by_name["fails"]["reason"]
    assert "AssertionError" in by_name["fails"]["traceback"]
    assert by_name["skips"] == {**by_name["skips"], "status": "skip", "reason": "needs a GPU"}
    assert supervisor.workers == 3  # a fresh worker after the hang and after the crash
    assert (tmp_path / "worker.log").exists()


def test_jobs_left_when_the_budget_is_spent_are_skipped_with_the_reason(tmp_path):
    from ltransform.gpucheck.runner import Supervisor

    results = []
    Supervisor(device="cpu", size="smoke", out_dir=tmp_path, deadline=time.monotonic() + 1,
               on_result=results.append, bench_budget=lambda: 0.0).run({"bf16-mixed": 60.0, "fsdp": 60.0})
    assert [(r["name"], r["status"]) for r in results] == [("bf16-mixed", "skip"), ("fsdp", "skip")]
    assert "budget" in results[0]["reason"]


def test_unknown_check_names_are_refused_with_the_valid_ones(capsys):
    from ltransform.gpucheck.__main__ import main

    assert main(["--checks", "bf16-mixed,bf17", "--out", "unused"]) == 2
    assert "unknown check(s) bf17; expected some of: bf16-mixed, 16-mixed" in capsys.readouterr().err


def test_torchao_float8_check_runs_emulated_on_the_cpu():
    pytest.importorskip("torchao.float8")
    from ltransform.gpucheck.lowbit import check_torchao_float8

    with pytest.raises(Skip, match="needs a CUDA GPU of compute capability 8.9"):
        check_torchao_float8(torch.device("cpu"), SMOKE)
    numbers = check_torchao_float8(torch.device("cpu"), SMOKE, emulate=True)
    assert numbers["emulated"] and numbers["max_relative_loss_gap_to_bf16"] < 0.05


def test_import_ltransform_does_not_import_the_gpu_check():
    code = ("import sys, ltransform as lt; lt.State; lt.run; lt.quantize; "
            "print([m for m in sys.modules if m.startswith('ltransform.gpucheck')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_cpu_env())
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
