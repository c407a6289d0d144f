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
    for mode in ("nf4", "nf4-dq", "fp4", "fp4-dq"):  # ltransform's 4-bit forward is the dequantized MLP's
        numbers = results[f"quantize-{mode}"]["numbers"]
        assert numbers["relative_error_vs_dequantized"] < 5e-3 < numbers["relative_error"], numbers
    saved = results["checkpoint-async"]["numbers"]
    assert 0 < saved["save_call_s"] <= saved["save_done_with_next_step_s"]


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
                            on_result=results.append)
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
               on_result=results.append).run({"bf16-mixed": 60.0, "fsdp": 60.0})
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


# --- the benchmark under the supervisor: a fake one (LTRANSFORM_GPUCHECK_BENCH=test_gpucheck) ----

def _fake_results(parts: dict) -> dict:
    return {"mode": "smoke", "device": {"type": "cpu", "name": "fake", "torch": torch.__version__},
            "settings": {"warmup_steps": 1, "rounds": 1, "steps_per_round": 1, "compile": False,
                         "compile_options": {}, "peak_matmul": "bf16 1x1x1"},
            "peak_tflops": 1.0, "models": [], "targets": [], "targets_apply": False, "elapsed_s": 1.0,
            "qlora": {"pending": "not started"}, "fp8": {"pending": "not started"}, **parts}


QLORA_DONE = {"model": "fake", "rows": {
    "bf16 full finetune": {"step_ms": 2.0, "tokens_per_s": 10.0, "peak_gib": None, "trainable_params": 4e6,
                           "final_loss": 1.0},
    "nf4 QLoRA r16": {"step_ms": 1.0, "tokens_per_s": 20.0, "peak_gib": None, "trainable_params": 1e5,
                      "final_loss": 1.1, "time_vs_full": 0.5}}}


def run_benchmark(*, smoke, device, deadline, progress):
    """A fake benchmark: the QLoRA part finishes, then the fp8 part outlasts the deadline
    (FAKE_BENCH=slow), or fails (FAKE_BENCH=error)."""
    assert deadline > time.time()
    progress(_fake_results({"qlora": {"running": "now"}}), "qlora")
    progress(_fake_results({"qlora": QLORA_DONE}), None)
    progress(_fake_results({"qlora": QLORA_DONE, "fp8": {"running": "now"}}), "fp8")
    if os.environ.get("FAKE_BENCH") == "slow":
        time.sleep(600)
    return _fake_results({"qlora": QLORA_DONE, "fp8": {"error": "RuntimeError: no fp8 kernel"}})


def test_a_benchmark_killed_at_the_deadline_keeps_the_finished_parts_and_passes(tmp_path, monkeypatch):
    from ltransform.gpucheck.__main__ import main

    monkeypatch.setenv("PYTHONPATH", _cpu_env()["PYTHONPATH"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("LTRANSFORM_GPUCHECK_BENCH", "test_gpucheck")
    monkeypatch.setenv("FAKE_BENCH", "slow")
    # the budget's end less the 10 s kept for the report: the worker is killed ~14 s in, during "fp8"
    code = main(["--smoke", "--device", "cpu", "--checks", "bf16-mixed", "--budget", "24", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    bench = report["benchmark"]
    assert code == 0 and bench["status"] == "pass", bench
    assert "killed at the deadline (--budget) during fp8" in bench["reason"]
    assert bench["results"]["qlora"] == QLORA_DONE and bench["results"]["fp8"] == {"running": "now"}
    assert [r["status"] for r in report["checks"]] == ["pass"]
    text = (tmp_path / "gpu-check.md").read_text()
    assert "Cut short: killed at the deadline (--budget) during fp8" in text and "| nf4 QLoRA r16 | 1.00 |" in text
    assert "skipped: cut short (killed at the deadline" in text  # the fp8 row


def test_a_benchmark_part_that_failed_fails_the_job(monkeypatch):
    from ltransform.gpucheck import worker

    monkeypatch.setattr(worker, "BENCH_MODULE", "test_gpucheck")
    monkeypatch.setenv("FAKE_BENCH", "error")
    events = []
    record = worker.run_benchmark_job(torch.device("cpu"), True, time.time() + 60, events.append)
    assert record["status"] == "fail" and "fp8: RuntimeError: no fp8 kernel" in record["reason"], record
    assert record["results"]["qlora"] == QLORA_DONE
    assert [(e["event"], e["running"]) for e in events] == [("partial", "qlora"), ("partial", None),
                                                             ("partial", "fp8")]


def test_a_cut_short_benchmark_fails_only_for_a_failed_part(tmp_path):
    from ltransform.gpucheck.runner import Supervisor

    results = []
    supervisor = Supervisor(device="cpu", size="smoke", out_dir=tmp_path, deadline=time.monotonic(),
                            on_result=results.append)
    failed = _fake_results({"qlora": {"error": "RuntimeError: boom"}, "fp8": {"running": "now"}})
    supervisor._cut_short("benchmark", time.monotonic(), {"results": failed, "running": "fp8"})
    supervisor._cut_short("benchmark", time.monotonic(), {"results": _fake_results({}), "running": "qlora"})
    supervisor._cut_short("benchmark", time.monotonic(), None)
    assert [r["status"] for r in results] == ["fail", "skip", "skip"]
    assert "qlora: RuntimeError: boom" in results[0]["reason"] and "before any part finished" in results[1]["reason"]


def test_the_startup_timer_restarts_after_each_result(tmp_path, monkeypatch):
    """A job that ran longer than STARTUP_S, then a pause before the next job starts: not killed."""
    from ltransform.gpucheck import runner

    monkeypatch.setattr(runner, "STARTUP_S", 1.0)
    events = tmp_path / "events.jsonl"
    script = f"""
import json, time
def emit(**event):
    with open({str(events)!r}, "a") as out:
        out.write(json.dumps(event) + "\\n")
emit(event="ready")
emit(event="start", name="a")
time.sleep(1.5)
emit(event="result", name="a", status="pass", duration_s=1.5)
time.sleep(0.6)
emit(event="start", name="b")
emit(event="result", name="b", status="pass", duration_s=0.0)
"""
    results = []
    supervisor = runner.Supervisor(device="cpu", size="smoke", out_dir=tmp_path, deadline=time.monotonic() + 60,
                                   on_result=results.append)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        done = supervisor._watch(process, events, {"a": 60.0, "b": 60.0})
    finally:
        process.kill()
    assert done == ["a", "b"] and [r["status"] for r in results] == ["pass", "pass"], results


def test_a_check_whose_clean_up_raises_is_recorded_as_failed(monkeypatch):
    """A sticky CUDA error raises again in the clean-up after the check: the result is still recorded."""
    from ltransform.gpucheck import checks

    calls = []

    def cleanup(device):
        calls.append(device)
        if len(calls) % 2 == 0:  # after the check
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(checks, "cleanup", cleanup)
    record = checks.run_check(checks.Check("passes", passes, 60), torch.device("cpu"), SMOKE)
    assert record["status"] == "fail" and "illegal memory access" in record["reason"], record
    assert record["numbers"] == {"device": "cpu", "size": "smoke"}
    calls.append(None)  # now the clean-up before the next check raises
    record = checks.run_check(checks.Check("passes", passes, 60), torch.device("cpu"), SMOKE)
    assert record["status"] == "fail" and "before the check" in record["reason"], record


def test_a_package_that_fails_to_import_skips_with_the_reason(tmp_path, monkeypatch):
    from ltransform.gpucheck.common import require

    (tmp_path / "broken_for_this_torch.py").write_text("import torch\ntorch.no_such_attribute\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(Skip, match="does not import \\(AttributeError: module 'torch' has no attribute"):
        require("broken_for_this_torch", "broken")
