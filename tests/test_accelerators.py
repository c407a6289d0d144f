"""Accelerator choice (lt.accelerator / lt.use_accelerator / lt.device), the XLA guards of launch,
distribute, the process group and the CLI, torch_xla's version check, and MPS precision limits.

MPS, XPU, CUDA and XLA cannot run here: their availability is patched, and torch_xla is not
installed in this python (tests/xla runs the real thing in its own venv).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ltransform as lt
from ltransform.core.precisions import resolve_precision
from ltransform.distributed import env, xla
from ltransform.steps.precision import check_supported
from helpers import make_model, mse, sgd

ROOT = Path(__file__).resolve().parents[1]
VALID = ("'auto'", "'cpu'", "'cuda'", "'xla'", "'mps'", "'xpu'")
XLA_MISSING = sys.modules.get("torch_xla") is None and __import__("importlib.util").util.find_spec("torch_xla") is None
needs_no_torch_xla = pytest.mark.skipif(not XLA_MISSING, reason="torch_xla is installed in this python")
_MAJOR_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No accelerator variable from outside, and whatever a test (or use_accelerator) sets is undone:
    setenv first records the original value, so monkeypatch restores it even after a direct write."""
    for key in ("LTRANSFORM_ACCELERATOR", "PJRT_DEVICE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


@pytest.fixture
def available(monkeypatch):
    """Patch which accelerators torch reports available: ``available("cuda", "mps")``."""

    def set_available(*names):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: "cuda" in names)
        monkeypatch.setattr(torch.xpu, "is_available", lambda: "xpu" in names)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: "mps" in names)

    set_available()
    return set_available


def _subprocess_env(**extra):
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("LTRANSFORM_ACCELERATOR", "PJRT_DEVICE", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environment.update(extra)
    return environment


def _python(code, timeout=120, **extra):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_subprocess_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


# --- 1. the accelerator rule ---------------------------------------------------------------------


@pytest.mark.parametrize(("present", "expected"), [
    (("cuda", "xpu", "mps"), "cuda"),
    (("xpu", "mps"), "xpu"),
    (("mps",), "mps"),
    ((), "cpu"),
])
def test_rule_takes_the_first_available_of_cuda_xpu_mps_cpu(available, present, expected):
    available(*present)
    assert lt.accelerator() == expected


def test_pjrt_device_wins_over_every_other_accelerator(available, monkeypatch):
    available("cuda", "xpu", "mps")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert lt.accelerator() == "xla"
    assert "torch_xla" not in sys.modules  # the rule reads the variable; torch_xla is not imported


def test_empty_pjrt_device_is_not_xla(available, monkeypatch):
    available()
    monkeypatch.setenv("PJRT_DEVICE", "")
    assert lt.accelerator() == "cpu"


@pytest.mark.parametrize(("value", "expected"), [
    ("cpu", "cpu"), ("mps", "mps"), ("xpu", "xpu"), ("cuda", "cuda"), ("xla", "xla"),
    ("gpu", "cuda"), ("tpu", "xla"), ("rocm", "cuda"),
])
def test_override_variable_beats_the_rule_and_resolves_aliases(available, monkeypatch, value, expected):
    available("cuda", "xpu", "mps")
    monkeypatch.setenv("PJRT_DEVICE", "TPU")  # would be xla by the rule
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", value)
    assert lt.accelerator() == expected


@pytest.mark.parametrize(("present", "expected"), [(("xpu", "mps"), "xpu"), ((), "cpu")])
def test_override_auto_is_the_rule(available, monkeypatch, present, expected):
    available(*present)
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "auto")
    assert lt.accelerator() == expected


def test_unknown_override_variable_lists_the_valid_names(monkeypatch):
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "quantum")
    with pytest.raises(ValueError, match="LTRANSFORM_ACCELERATOR='quantum'") as info:
        lt.accelerator()
    for name in VALID:
        assert name in str(info.value)
    assert "'gpu'" in str(info.value) and "'tpu'" in str(info.value)


def test_use_accelerator_unknown_name_lists_the_valid_names_and_sets_nothing():
    with pytest.raises(ValueError, match=r"lt.use_accelerator\('bogus'\): unknown accelerator") as info:
        lt.use_accelerator("bogus")
    for name in VALID:
        assert name in str(info.value)
    assert "LTRANSFORM_ACCELERATOR" not in os.environ


def test_use_accelerator_cuda_without_a_gpu_says_not_available(available):
    available()  # as on this machine, also where a GPU exists
    with pytest.raises(RuntimeError, match=r"accelerator 'cuda' is not available on this machine.*cpu only"):
        lt.use_accelerator("cuda")
    with pytest.raises(RuntimeError, match="accelerator 'cuda' is not available"):
        lt.use_accelerator("gpu")
    assert "LTRANSFORM_ACCELERATOR" not in os.environ  # a refused choice leaves the rule in place


def test_not_available_message_names_what_is_available(available):
    available("mps")
    with pytest.raises(RuntimeError, match=r"'xpu' is not available .*available: mps$"):
        lt.use_accelerator("xpu")


def test_use_accelerator_cpu_overrides_an_available_gpu(available):
    available("cuda", "mps")
    assert lt.use_accelerator("cpu") == "cpu"
    assert os.environ["LTRANSFORM_ACCELERATOR"] == "cpu"
    assert lt.accelerator() == "cpu"
    assert lt.device() == torch.device("cpu")


def test_use_accelerator_auto_returns_the_rule_and_clears_an_earlier_choice(available):
    available("mps")
    lt.use_accelerator("cpu")
    assert lt.use_accelerator("auto") == "mps"
    assert os.environ["LTRANSFORM_ACCELERATOR"] == "auto"
    assert lt.accelerator() == "mps"


def test_device_on_mps_is_the_mps_device(available):
    available("mps")
    device = lt.device()
    assert device == torch.device("mps")
    assert device.type == "mps" and device.index is None


def test_device_on_mps_chosen_but_unavailable_raises(available, monkeypatch):
    available()
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "mps")
    with pytest.raises(RuntimeError, match="accelerator 'mps' is not available"):
        lt.device()


@pytest.mark.parametrize("name", ["cuda", "xpu"])
def test_device_on_cuda_or_xpu_is_the_local_ranks_device(available, monkeypatch, name):
    available(name)
    monkeypatch.setattr(getattr(torch, name), "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert lt.accelerator() == name
    assert lt.device() == torch.device(name, 1)  # local rank modulo the devices


def test_process_count_and_index_off_xla_follow_the_launcher(monkeypatch):
    from ltransform.distributed import env

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert (env.process_count(), env.process_index()) == (3, 2)


def test_process_count_and_index_off_xla_are_world_size_and_rank(available):
    available()
    assert (env.process_count(), env.process_index()) == (1, 0)


# --- 2. torch_xla's version check ----------------------------------------------------------------


def test_check_versions_mismatch_names_both_versions_and_the_pip_command():
    with pytest.raises(ImportError) as info:
        xla.check_versions("2.13.0+cpu", "2.9.0")
    message = str(info.value)
    assert "torch_xla 2.9.0" in message and "torch 2.13.0+cpu" in message
    assert "pip install 'torch==2.9.*' 'torch_xla==2.9.*'" in message
    assert "pip install 'torch==2.13.*' 'torch_xla==2.13.*'" in message


@pytest.mark.parametrize(("torch_version", "xla_version"), [
    ("2.9.0", "2.9.0"), ("2.9.1+cu121", "2.9.0"), ("2.13.0+cpu", "2.13.0+libtpu"),
])
def test_check_versions_matching_major_minor_passes(torch_version, xla_version):
    assert xla.check_versions(torch_version, xla_version) is None


@needs_no_torch_xla
def test_check_versions_without_torch_xla_names_the_install_for_this_torch():
    with pytest.raises(ImportError, match="torch_xla, which is not installed") as info:
        xla.check_versions()
    assert f"pip install 'torch=={_MAJOR_MINOR}.*' 'torch_xla=={_MAJOR_MINOR}.*'" in str(info.value)
    assert torch.__version__ in str(info.value)


@needs_no_torch_xla
def test_use_accelerator_xla_without_torch_xla_raises_the_install_message():
    with pytest.raises(ImportError, match=rf"torch_xla=={_MAJOR_MINOR}\.\*"):
        lt.use_accelerator("tpu")
    assert "LTRANSFORM_ACCELERATOR" not in os.environ


def test_use_accelerator_xla_checks_torch_xla_only(monkeypatch):
    """With a matching torch_xla (stood in for), "tpu" is chosen without PJRT_DEVICE (torch_xla then
    picks a TPU if there is one, else the CPU), and the choice is what the rule answers from then on."""
    checked = []
    monkeypatch.setattr(xla, "check_versions", lambda *a: checked.append(a))
    assert lt.use_accelerator("tpu") == "xla"
    assert checked == [()]
    assert os.environ["LTRANSFORM_ACCELERATOR"] == "xla" and "PJRT_DEVICE" not in os.environ
    assert lt.accelerator() == "xla"


@needs_no_torch_xla
def test_device_with_pjrt_device_but_no_torch_xla_fails_with_the_install_message():
    result = _python("import ltransform as lt; lt.device()", PJRT_DEVICE="CPU")
    assert result.returncode != 0
    assert "ImportError: XLA needs torch_xla, which is not installed" in result.stderr, result.stderr
    assert f"pip install 'torch=={_MAJOR_MINOR}.*' 'torch_xla=={_MAJOR_MINOR}.*'" in result.stderr


def test_importing_ltransform_does_not_import_torch_xla(tmp_path):
    """A torch_xla on the path that records being imported: ``import ltransform`` (even with
    PJRT_DEVICE set) and ``lt.accelerator()`` never import it."""
    fake = tmp_path / "torch_xla"
    fake.mkdir()
    marker = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      f"raise ImportError('fake torch_xla')\n")
    code = "import sys, ltransform as lt; print(lt.accelerator(), 'torch_xla' in sys.modules)"
    result = _python(code, PJRT_DEVICE="CPU", PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["xla", "False"]
    assert not marker.exists()


# --- 3. precisions MPS cannot run ----------------------------------------------------------------


def test_mps_refuses_float64():
    with pytest.raises(ValueError, match=r"with_precision\('64-true'\): Apple's MPS has no float64"):
        check_supported(resolve_precision("64-true"), "mps")


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16-true"])
def test_mps_refuses_bfloat16_before_macos_14(monkeypatch, name):
    asked = []
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: asked.append((major, minor)))
    with pytest.raises(ValueError, match=rf"with_precision\('{name}'\): MPS computes in bfloat16 only on macOS 14"):
        check_supported(resolve_precision(name), "mps")
    assert asked == [(14, 0)]


def test_mps_accepts_bfloat16_on_macos_14(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert check_supported(resolve_precision("bf16-mixed"), "mps") is None


def test_mps_refuses_fp8(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    with pytest.raises(ValueError, match="float8 training needs an NVIDIA GPU"):
        check_supported(resolve_precision("torchao-float8"), "mps")


@pytest.mark.parametrize("name", ["32-true", "16-mixed", "16-true"])
def test_mps_accepts_float32_and_float16(monkeypatch, name):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    assert check_supported(resolve_precision(name), "mps") is None


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "xla"])
@pytest.mark.parametrize("name", ["64-true", "bf16-mixed", "bf16-true", "16-mixed", "32-true"])
def test_other_devices_accept_every_non_fp8_precision(monkeypatch, device_type, name):
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    assert check_supported(resolve_precision(name), device_type) is None


@pytest.mark.parametrize("device_type,accepted", [("cpu", True), ("cuda", True), ("xla", False), ("mps", False)])
def test_fp8_is_refused_on_xla_and_mps(device_type, accepted):
    record = resolve_precision("torchao-float8")
    if accepted:
        assert check_supported(record, device_type) is None
    else:
        with pytest.raises(ValueError, match="float8 training needs an NVIDIA GPU"):
            check_supported(record, device_type)


@pytest.mark.parametrize("given", ["TPU", "Cuda", "GPU", "CPU"])
def test_accelerator_names_are_case_insensitive(monkeypatch, given):
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", given)
    assert lt.accelerator() == {"tpu": "xla", "gpu": "cuda"}.get(given.lower(), given.lower())


def test_float64_trains_on_the_cpu_through_with_precision(available):
    available()
    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model))
    x, y = torch.randn(4, 4), torch.randn(4, 1)
    first = next(model.parameters()).detach().clone()
    state, _ = lt.with_precision(lt.train_step(mse), "64-true")(state, (x, y))
    assert {p.dtype for p in state.model.parameters()} == {torch.float64}
    assert not torch.equal(next(state.model.parameters()).detach().float(), first)


# --- 4. distribute('xla') ------------------------------------------------------------------------


def test_distribute_xla_in_a_cpu_process_refuses_when_prepared(available):
    available()
    model = make_model()
    state = lt.State(model=model, optimizer=sgd(model))
    step = lt.pipe(lt.train_step(mse), lt.distribute("xla"))  # building is fine
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"distribute\('xla'\): this process is not on XLA.*PJRT_DEVICE"):
        step(state, (torch.randn(4, 4), torch.randn(4, 1)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained


def test_strategy_record_named_xla_is_valid():
    strategy = lt.Strategy(name="xla", sync_micro_steps=True)
    assert (strategy.name, strategy.sync_micro_steps, strategy.shards) == ("xla", True, False)


def test_unknown_strategy_lists_xla():
    with pytest.raises(ValueError, match="unknown strategy 'tpu'") as info:
        lt.distribute("tpu")
    assert "'xla'" in str(info.value) and "'ddp'" in str(info.value)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "hsdp"])
def test_torch_distributed_strategies_are_refused_on_xla(monkeypatch, strategy):
    """The refusal at prepare time; the XLA device is stood in for by the CPU (no torch_xla here),
    so the step's placement of the model, which comes first, has somewhere to put it."""
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "xla")
    monkeypatch.setattr(xla, "device", lambda: torch.device("cpu"))
    model = make_model()
    step = lt.pipe(lt.train_step(mse), lt.distribute(strategy))
    with pytest.raises(RuntimeError, match=rf"distribute\('{strategy}'\) runs on torch.distributed.*on XLA"):
        step(lt.State(model=model, optimizer=sgd(model)), (torch.randn(4, 4), torch.randn(4, 1)))
    assert not dist.is_initialized()


# --- 5. launch and the process group on XLA ------------------------------------------------------


def test_launch_on_xla_runs_fn_in_this_process(monkeypatch):
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "xla")
    pid = os.getpid()
    assert lt.launch(lambda: 41 + 1, devices=1) == 42
    assert lt.launch(lambda a, b=0: (os.getpid(), a + b), 40, b=2) == (pid, 42)


def test_launch_on_xla_refuses_several_nodes(monkeypatch):
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "xla")
    called = []
    with pytest.raises(ValueError, match=r"lt.launch\(num_nodes=2\) on XLA: .*one process per host"):
        lt.launch(lambda: called.append(1), num_nodes=2, node_rank=0, master_port=29555)
    assert called == []


@needs_no_torch_xla
def test_launch_accelerator_tpu_without_torch_xla_raises_before_running_fn():
    called = []
    with pytest.raises(ImportError, match="torch_xla, which is not installed"):
        lt.launch(lambda: called.append(1), accelerator="tpu")
    assert called == [] and "LTRANSFORM_ACCELERATOR" not in os.environ


def test_launch_unknown_accelerator_raises_before_starting_anything():
    called = []
    with pytest.raises(ValueError, match=r"lt.use_accelerator\('bogus'\): unknown accelerator.*'xla'"):
        lt.launch(lambda: called.append(1), accelerator="bogus")
    assert called == [] and "LTRANSFORM_ACCELERATOR" not in os.environ


def test_launch_accelerator_tpu_runs_fn_in_this_process(monkeypatch):
    """``accelerator="tpu"`` is checked (torch_xla's version) and then runs fn here; the check is
    stood in for where torch_xla is missing."""
    monkeypatch.setattr(xla, "check_versions", lambda *a: None)
    assert lt.launch(lambda: (os.getpid(), lt.accelerator()), accelerator="tpu") == (os.getpid(), "xla")
    assert os.environ["LTRANSFORM_ACCELERATOR"] == "xla"


def test_process_group_on_xla_with_a_world_size_refuses_with_the_xla_launch_text(monkeypatch):
    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "xla")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError) as info:
        env.ensure_process_group()
    assert str(info.value) == env.XLA_LAUNCH
    assert "one process per host" in env.XLA_LAUNCH and "python train.py" in env.XLA_LAUNCH
    assert not dist.is_initialized()


def test_process_group_on_one_xla_host_stays_a_plain_process(monkeypatch):
    """On XLA the group is one of hosts (torch_xla counts them): one host, no group."""
    from ltransform.distributed import xla

    monkeypatch.setenv("LTRANSFORM_ACCELERATOR", "xla")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(xla, "process_count", lambda: 1)
    assert env.ensure_process_group() is False
    assert not dist.is_initialized()


# --- 6. the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    marker = tmp_path / "ran"
    path.write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
    """))
    return path, marker


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ltransform", *map(str, args)], cwd=ROOT, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_accelerator_exits_with_the_valid_names(script):
    path, marker = script
    result = _cli("run", "--accelerator", "bogus", path)
    assert result.returncode != 0
    assert "ltransform run: --accelerator bogus: unknown accelerator" in result.stderr, result.stderr
    for name in VALID:
        assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@needs_no_torch_xla
def test_cli_accelerator_tpu_without_torch_xla_exits_with_the_install_message(script):
    path, marker = script
    result = _cli("run", "--accelerator", "tpu", path)
    assert result.returncode != 0
    assert "ltransform run: XLA needs torch_xla, which is not installed" in result.stderr, result.stderr
    assert f"torch_xla=={_MAJOR_MINOR}.*" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["auto", "cpu", "CPU"])
def test_cli_runs_the_script_with_auto_or_cpu(script, name):
    path, marker = script
    path.write_text(textwrap.dedent(f"""
        import os, ltransform as lt
        assert lt.accelerator() == "cpu", lt.accelerator()
        open({str(marker)!r}, "w").write(os.environ["LTRANSFORM_ACCELERATOR"])
    """))
    result = _cli("run", "--accelerator", name, path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.read_text() == ("auto" if name == "auto" else "cpu")  # the ranks inherit the choice
