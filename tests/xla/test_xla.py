"""XLA on torch_xla's SPMD, on PJRT's CPU devices: each check of ``checks.py`` in its own process
(the SPMD runtime is process-global), with a timeout. Run by ``scripts/test-xla.sh`` in its own
venv (torch 2.9 + torch_xla 2.9); the main suite leaves this folder out (``tests/conftest.py``).

Never ``torch_xla.launch`` with more than one CPU device (it aborts), nor torchrun: PJRT's
multi-process collectives cannot run on the CPU, so every multi-device check here is SPMD.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("checks.py")
ROOT = CHECKS.parents[2]
NOISE = ("WARNING", "I0000", "E0000", "GSPMD sharding propagation")


def run_check(name: str, *args: str, devices: int | None = 4, timeout: int = 240) -> str:
    """Run one check in a fresh process on ``devices`` PJRT CPU devices (None: plain CPU, no XLA)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_DEVICE", "CPU_NUM_DEVICES",
                                                            "LTRANSFORM_ACCELERATOR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if devices is not None:
        env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices))
    done = subprocess.run([sys.executable, str(CHECKS), name, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    out = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if not line.startswith(NOISE))
    assert done.returncode == 0 and "OK" in done.stdout, f"check {name} {args} failed:\n{out[-4000:]}"
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("every", ["1", "2"])
def test_distribute_matches_one_cpu_process_with_the_full_batch(devices, every):
    print(run_check("distribute", every, "none", devices=devices))


def test_distribute_with_global_norm_clipping():
    print(run_check("distribute", "2", "0.5"))


def test_distribute_auto_picks_xla():
    print(run_check("distribute", "2", "none", "32-true", "auto"))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_precisions_within_the_cpus_own_drift(precision):
    print(run_check("distribute", "1", "1.0", precision))


def test_a_dataloader_is_split_over_the_mesh_like_any_batch():
    print(run_check("loader"))


@pytest.mark.parametrize("shard", ["no", "yes"])
def test_a_hugging_face_gpt2_trains_on_xla_like_on_one_cpu_process(shard):
    pytest.importorskip("transformers")
    print(run_check("hf", shard, timeout=400))


def test_each_batch_is_split_over_the_devices_and_parameters_replicated():
    print(run_check("batch_split"))


@pytest.mark.parametrize("mesh,ckpt,init", [("none", "no", "plain"), ("2x2", "no", "plain"), ("none", "yes", "plain"),
                                            ("2x2", "yes", "plain"), ("none", "no", "meta"),
                                            ("none", "no", "meta-then-shard")])
def test_shard_is_fsdpv2_and_matches_one_cpu_process(mesh, ckpt, init):
    print(run_check("shard", mesh, ckpt, init))


def test_order_and_strategy_errors():
    print(run_check("order"))


@pytest.mark.parametrize("kind", ["sharded", "full"])
@pytest.mark.parametrize("model", ["shard", "plain"])
def test_save_on_2_devices_loads_on_4_and_on_plain_cpu_and_resumes_exactly(tmp_path, kind, model):
    print(run_check("save", str(tmp_path), kind, model, devices=2))
    print(run_check("load", str(tmp_path), "xla", model, devices=4))
    print(run_check("load", str(tmp_path), "cpu", model, devices=None))


def test_strict_false_loads_what_the_checkpoint_has(tmp_path):
    print(run_check("save", str(tmp_path), "sharded", "shard", devices=2))
    print(run_check("partial", str(tmp_path)))


def test_a_checkpoint_saved_on_plain_cpu_loads_sharded_on_xla(tmp_path):
    print(run_check("save", str(tmp_path), "sharded", "shard", devices=None))
    print(run_check("load", str(tmp_path), "xla", "shard", devices=4))


def test_version_mismatch_is_refused_with_both_versions_and_the_pip_command():
    print(run_check("versions", devices=1))


@pytest.mark.parametrize("every,strategy", [("1", "xla"), ("2", "xla"), ("2", "none")])
def test_no_recompilation_after_warm_up_and_one_program_per_micro_step(every, strategy):
    print(run_check("compiles", every, strategy))


def test_graph_per_update_cuts_once_per_window():
    print(run_check("window", "2"))


def test_a_step_without_distribute_trains_on_xla_replicated():
    print(run_check("distribute", "2", "none", "32-true", "none"))


def test_launch_runs_in_process_on_xla():
    print(run_check("launch"))


def test_cli_run_on_xla_says_to_run_the_script_itself(tmp_path):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "4", "PYTHONPATH": str(ROOT)}
    script = tmp_path / "train.py"
    script.write_text("print('should not run')\n")
    done = subprocess.run([sys.executable, "-m", "ltransform", "run", "--devices", "4", str(script)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "one process per host" in done.stderr and "python train.py" in done.stderr, \
        done.stderr[-2000:]
    assert "should not run" not in done.stdout
