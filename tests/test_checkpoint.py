"""lt.save / lt.load / lt.checkpoint_sharded / lt.load_raw / conversions, in one process."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ltransform as lt
from helpers import make_model
from ltransform.checkpoint.sharded import write_manifest

DATA = TensorDataset(torch.randn(40, 4, generator=torch.Generator().manual_seed(1)),
                     torch.randn(40, 1, generator=torch.Generator().manual_seed(2)))


def dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def fresh_state():
    model = dropout_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return lt.State(model=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


STEP = lt.pipe(lt.train_step(loss_fn), lt.with_precision("16-mixed"), lt.accumulate(2))


def loader():
    return DataLoader(DATA, batch_size=4, shuffle=True)


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("how", ["sharded-hook", "full-file"])
def test_resume_mid_epoch_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, how):
    # 10 batches per epoch, 2 per step: step 7 is mid-way through epoch 1
    torch.manual_seed(5)
    straight = lt.run(STEP, fresh_state(), loader(), max_steps=9, progress=False)
    torch.manual_seed(5)
    if how == "sharded-hook":
        hook, resume = lt.every(7, lt.checkpoint_sharded(dir=tmp_path)), "latest"
    else:
        hook = lt.every(7, lambda s, run: lt.save(tmp_path / "ckpt.pt", s, run=run) and None)
        resume = tmp_path / "ckpt.pt"
    first = lt.run(STEP, fresh_state(), loader(), max_steps=7, progress=False, hooks=[hook])
    assert first.step == 7
    torch.manual_seed(123)  # a new process: other RNG states, which the checkpoint replaces
    resumed = lt.run(STEP, fresh_state(), loader(), max_steps=9, progress=False, resume=resume,
                     hooks=[hook] if resume == "latest" else [])
    assert (resumed.step, resumed.micro_step, resumed.epoch) == (straight.step, straight.micro_step, straight.epoch)
    assert same(resumed.model, straight.model)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 9
    assert resumed.extra["grad_scaler"].get_scale() == straight.extra["grad_scaler"].get_scale()
    exp_avg = straight.optimizer.state_dict()["state"][0]["exp_avg"]
    assert resumed.optimizer.state_dict()["state"][0]["exp_avg"].equal(exp_avg)


def test_resume_latest_with_no_checkpoint_yet_starts_from_the_beginning(tmp_path):
    state = lt.run(STEP, fresh_state(), loader(), max_steps=2, progress=False, resume="latest",
                   hooks=[lt.every(5, lt.checkpoint_sharded(dir=tmp_path / "none-yet"))])
    assert state.step == 2
    with pytest.raises(ValueError, match="resume='latest' looks in the directory of the run's checkpoint hook"):
        lt.run(STEP, fresh_state(), loader(), max_steps=2, progress=False, resume="latest")


@pytest.mark.parametrize("sharded", [False, True])
def test_contents_round_trip(tmp_path, sharded):
    state = lt.run(STEP, fresh_state(), loader(), max_steps=3, progress=False)
    state = lt.State(**{**{f: getattr(state, f) for f in ("model", "optimizer", "scheduler", "step", "micro_step")},
                        "epoch": 4, "extra": {**state.extra, "note": "hello", "best": torch.tensor(0.5)}})
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), state, sharded=sharded)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    target = lt.prepare(STEP, fresh_state())
    loaded = lt.load(path, target)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # RNG states restored
    assert (loaded.step, loaded.micro_step, loaded.epoch) == (state.step, state.micro_step, 4)
    assert same(loaded.model, state.model)
    exp_avg = state.optimizer.state_dict()["state"][0]["exp_avg"]
    assert loaded.optimizer.state_dict()["state"][0]["exp_avg"].equal(exp_avg)
    assert loaded.scheduler.state_dict() == state.scheduler.state_dict()
    assert loaded.extra["grad_scaler"] is target.extra["grad_scaler"]  # loaded in place
    assert loaded.extra["grad_scaler"].state_dict() == state.extra["grad_scaler"].state_dict()
    assert loaded.extra["note"] == "hello" and loaded.extra["best"].item() == 0.5
    meta = torch.load(path / "common.pt" if sharded else path, weights_only=True)["meta"]
    assert meta["format"] == "ltransform-checkpoint" and meta["version"] == 2
    assert meta["torch"] == str(torch.__version__) and meta["world_size"] == 1 and meta["sharded"] == sharded
    assert {"ltransform", "time", "precision"} <= set(meta)


def test_checkpoint_metadata_records_the_runs_precision(tmp_path):
    lt.run(STEP, fresh_state(), loader(), max_steps=2, progress=False,
           hooks=[lt.every(2, lt.checkpoint_sharded(dir=tmp_path))])
    assert torch.load(tmp_path / "step-00000002" / "common.pt", weights_only=True)["meta"]["precision"] == "16-mixed"


@pytest.mark.parametrize("sharded", [False, True])
def test_filter_and_strict(tmp_path, sharded):
    model = make_model()
    path = lt.save(tmp_path / ("part" if sharded else "part.pt"), lt.State(model=model), sharded=sharded,
                   filter=lambda name, t: name.startswith("2."))
    with pytest.raises(KeyError, match=r"model 'model' does not match the checkpoint: missing keys \['0.bias', "
                                       r"'0.weight'\], unexpected keys \[\]; pass strict=False"):
        lt.load(path, lt.State(model=make_model(seed=1)))
    other = make_model(seed=1)
    lt.load(path, lt.State(model=other), strict=False)
    assert torch.equal(other[2].weight, model[2].weight) and not torch.equal(other[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="filter names \\['decoder'\\], which are not models of the state"):
        lt.save(tmp_path / "x.pt", lt.State(model=model), filter={"decoder": lambda n, t: True})


def test_load_raw_reads_plain_pytorch_files(tmp_path):
    model, opt_model = make_model(), make_model()
    optimizer = torch.optim.Adam(opt_model.parameters())
    F.mse_loss(opt_model(torch.ones(2, 4)), torch.zeros(2, 1)).backward()
    optimizer.step()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    target = lt.load_raw(tmp_path / "weights.pt", make_model(seed=3))
    assert same(target, model)
    fresh = torch.optim.Adam(make_model().parameters())
    lt.load_raw(tmp_path / "optim.pt", fresh)
    assert fresh.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(KeyError, match=r"missing keys \[\], unexpected keys \['extra.weight'\]"):
        torch.save({**model.state_dict(), "extra.weight": torch.ones(1)}, tmp_path / "more.pt")
        lt.load_raw(tmp_path / "more.pt", make_model())
    with pytest.raises(ValueError, match="is an ltransform checkpoint; use lt.load"):
        lt.load_raw(lt.save(tmp_path / "ours.pt", lt.State(model=model)), make_model())
    with pytest.raises(ValueError, match="not an ltransform checkpoint.*use lt.load_raw"):
        lt.load(tmp_path / "weights.pt", lt.State(model=make_model()))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_a_malicious_pickle_runs_nothing_and_is_refused(tmp_path):
    Evil.marker = tmp_path / "pwned"
    torch.save({"meta": {}, "x": Evil()}, tmp_path / "evil.pt")
    for load in (lambda: lt.load(tmp_path / "evil.pt", lt.State(model=make_model())),
                 lambda: lt.load_raw(tmp_path / "evil.pt", make_model())):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load .*evil.pt.*weights_only=True"):
            load()
    # a sharded checkpoint's DCP metadata is unpickled through an allowlist too
    path = lt.save(tmp_path / "sharded", lt.State(model=make_model()), sharded=True)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(lt.CheckpointError, match="sharded'?: its file '.metadata' has .* bytes, .* when saved"):
        lt.load(path, lt.State(model=make_model()))  # its manifest tells first
    write_manifest(path)  # as a crafted checkpoint would: then the allowlist refuses it
    with pytest.raises(pickle.UnpicklingError, match="refusing to load the sharded checkpoint .*'.metadata' holds "
                                                     "objects other than DCP's own records .*'posix.system'"):
        lt.load(path, lt.State(model=make_model()))
    assert not Evil.marker.exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_format_1_checkpoint_without_checksums_still_loads(tmp_path, sharded):
    """Written before checksums (format 1: no per-tensor CRCs in a file, no manifest.pt beside
    shards): loaded unchecked, as before."""
    model = make_model()
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), lt.State(model=model, step=4), sharded=sharded)
    file = path / "common.pt" if sharded else path
    payload = torch.load(file, weights_only=True)
    payload.pop("checksums", None)
    payload["meta"]["version"] = 1
    torch.save(payload, file)
    if sharded:
        (path / "manifest.pt").unlink()
    loaded = lt.load(path, lt.State(model=make_model(seed=1)))
    assert same(loaded.model, model) and loaded.step == 4
    payload["meta"]["version"] = 2  # the same file claiming format 2 lacks what format 2 has
    torch.save(payload, file)
    missing = "has no 'manifest.pt'" if sharded else "ckpt.pt' records no checksums"
    with pytest.raises(lt.CheckpointError, match=missing):
        lt.load(path, lt.State(model=make_model(seed=1)))


def test_truncated_or_missing_files_name_the_file(tmp_path):
    path = lt.save(tmp_path / "ckpt.pt", lt.State(model=make_model()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="checkpoint file .*ckpt.pt' is truncated or corrupt"):
        lt.load(path, lt.State(model=make_model()))
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pt' does not exist") as raised:
        lt.load(tmp_path / "nope.pt", lt.State(model=make_model()))
    assert isinstance(raised.value, lt.CheckpointError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        lt.load(tmp_path / "empty", lt.State(model=make_model()))


def test_keep_last_k_and_partial_saves_are_not_latest(tmp_path):
    saver = lt.checkpoint_sharded(dir=tmp_path, keep=2)
    state = lt.State(model=make_model())
    for step in (1, 2, 3):
        saver(lt.State(model=state.model, step=step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    (tmp_path / ".step-00000009.partial").mkdir()  # a save killed half-way
    assert lt.latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(ValueError, match="keep must be a positive int"):
        lt.checkpoint_sharded(dir=tmp_path, keep=0)


def test_async_save_equals_a_sync_save_and_is_waited_for_before_the_next_update(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    state = lt.State(model=model, optimizer=optimizer)
    step = lt.train_step(lambda m, b: m(b).pow(2).mean())
    state, _ = step(state, torch.ones(8, 4))
    lt.save(tmp_path / "sync", state, sharded=True)
    lt.save(tmp_path / "async", state, sharded=True, async_save=True)
    state, _ = step(state, torch.ones(8, 4))  # changes the parameters: waits for the save first
    assert not (tmp_path / ".async.partial").exists() and (tmp_path / "async").is_dir()
    a = lt.load(tmp_path / "sync", lt.State(model=make_model(9)))
    b = lt.load(tmp_path / "async", lt.State(model=make_model(9)))
    assert same(a.model, b.model) and not same(a.model, model)
    with pytest.raises(ValueError, match="async_save=True needs sharded=True"):
        lt.save(tmp_path / "x.pt", state, async_save=True)


def test_a_raw_optimizer_step_waits_for_an_async_save_and_the_wait_is_removed_once_published(tmp_path, monkeypatch):
    """The wait is an optimizer step pre-hook on the saved state's optimizers (no global list)."""
    import ltransform.checkpoint.api as api

    model = make_model()
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    published = []
    real = api._publish
    monkeypatch.setattr(api, "_publish", lambda path: published.append(path) or real(path))
    lt.save(tmp_path / "async", state, sharded=True, async_save=True)
    assert published == [] and getattr(model, api._PENDING)
    model(torch.ones(2, 4)).sum().backward()
    state.optimizer.step()  # the user's own step(), not lt.optimizer_step
    assert published == [tmp_path / "async"] and (tmp_path / "async" / "common.pt").exists()
    state.optimizer.step()
    assert published == [tmp_path / "async"]  # the hook removed itself
    assert not getattr(model, api._PENDING) and not getattr(state.optimizer, api._PENDING)


def test_an_async_save_from_a_hook_is_published_when_the_run_ends(tmp_path):
    lt.run(STEP, fresh_state(), loader(), max_steps=3, progress=False,
           hooks=[lt.every(3, lt.checkpoint_sharded(dir=tmp_path, async_save=True))])
    assert (tmp_path / "step-00000003" / "common.pt").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_consolidate_and_safetensors(tmp_path):
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    state = lt.run(lt.train_step(lambda m, b: m(b).pow(2).mean()), lt.State(model=model, optimizer=opt),
                   [torch.ones(2, 4)] * 3, progress=False)
    lt.save(tmp_path / "sharded", state, sharded=True)
    out = subprocess.run([sys.executable, "-m", "ltransform", "consolidate", str(tmp_path / "sharded"),
                          str(tmp_path / "full.pt")], capture_output=True, text=True, check=True).stdout
    assert "wrote" in out
    target = lt.State(model=make_model(4), optimizer=torch.optim.Adam(make_model(4).parameters()))
    target = lt.State(model=target.model, optimizer=torch.optim.Adam(target.model.parameters()))
    loaded = lt.load(tmp_path / "full.pt", target)
    assert same(loaded.model, model) and loaded.step == 3
    lt.consolidate(tmp_path / "sharded", tmp_path / "weights.safetensors")
    assert same(lt.load_raw(tmp_path / "weights.safetensors", make_model(5)), model)
    lt.export_safetensors(model, tmp_path / "direct.safetensors")
    lt.export_safetensors(tmp_path / "full.pt", tmp_path / "from_file.safetensors")
    for name in ("direct", "from_file"):
        assert same(lt.load_raw(tmp_path / f"{name}.safetensors", make_model(6)), model)


KILLED_SAVE = """
import sys, torch, ltransform as lt
model = torch.nn.Linear(2, 2)
state = lt.State(model=model, extra={"big": torch.zeros(1)})
lt.save(sys.argv[1], state, sharded=sys.argv[2] == "1")
print("first saved", flush=True)
big = torch.randn(80_000_000)  # 320 MB: slow enough to kill mid-write
lt.save(sys.argv[1], lt.State(model=torch.nn.Linear(2, 2), extra={"big": big}), sharded=sys.argv[2] == "1")
print("second saved", flush=True)
"""


@pytest.mark.parametrize("sharded", [False, True])
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, sharded):
    path = tmp_path / ("ckpt" if sharded else "ckpt.pt")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path), "1" if sharded else "0"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first saved"
    first = lt.load(path, lt.State(model=torch.nn.Linear(2, 2), extra={}))
    partial = tmp_path / (".ckpt.partial" if sharded else ".ckpt.pt.partial")
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert partial.exists(), "the second save was not caught in progress"
    again = lt.load(path, lt.State(model=torch.nn.Linear(2, 2), extra={}))  # still the first one
    assert torch.equal(again.model.weight, first.model.weight)
    assert again.extra["big"].numel() == 1


def test_a_resumed_run_says_where_it_resumed_from(tmp_path, capsys):
    hook = lt.every(3, lt.checkpoint_sharded(dir=tmp_path))
    lt.run(STEP, fresh_state(), loader(), max_steps=2, progress=False, resume="latest", hooks=[hook])
    assert f"lt.run: no checkpoint in {str(tmp_path)!r} yet: starting from step 0" in capsys.readouterr().err
    lt.run(STEP, fresh_state(), loader(), max_steps=3, progress=False, hooks=[hook])
    lt.run(STEP, fresh_state(), loader(), max_steps=4, progress=False, resume="latest", hooks=[hook])
    said = capsys.readouterr().err
    assert f"lt.run: resumed from {str(tmp_path / 'step-00000003')!r} (step 3, epoch 0)" in said, said


@pytest.mark.parametrize("sharded", [False, True])
def test_inspect_lists_every_tensor_without_loading_and_the_cli_prints_it(tmp_path, sharded):
    import subprocess
    import sys

    state = lt.run(STEP, fresh_state(), loader(), max_steps=3, progress=False)
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), state, sharded=sharded)
    text = lt.describe_checkpoint(path)
    assert ("sharded directory" if sharded else "full file") in text
    assert f"step {state.step}, micro-step {state.micro_step}, epoch {state.epoch}" in text
    assert f"torch {torch.__version__}" in text
    assert "  models.model.0.weight  [16, 4]  torch.float32  256 B" in text
    assert "optimizers.optimizer.state.0.weight.exp_avg  [16, 4]  torch.float32  256 B" in text
    count = sum(1 for _ in state.model.parameters())
    names = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert sum(n.startswith("models.") for n in names) == count  # every parameter
    assert sum(n.endswith(("exp_avg", "exp_avg_sq")) for n in names) == 2 * count  # Adam's two moments of each
    shown = subprocess.run([sys.executable, "-m", "ltransform", "inspect", str(path)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == text
    missing = subprocess.run([sys.executable, "-m", "ltransform", "inspect", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("sharded", [False, True])
def test_a_save_after_an_evaluation_forward_holds_the_shards(one_rank_group, tmp_path, sharded):
    """FSDP2 leaves the root's parameters gathered after a forward without backward (the default
    reshard_after_forward); a save then must still see a sharded model and write whole tensors."""
    torch.manual_seed(0)
    model = lt.shard(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1))
    step = lt.pipe(lt.train_step(lambda m, b: m(b).square().mean()), lt.distribute("fsdp"))
    state, _ = step(state, torch.randn(3, 4))
    with torch.no_grad():
        model(torch.randn(3, 4))  # an evaluation: the root stays gathered
    assert {type(p).__name__ for p in model.parameters()} == {"Parameter"}
    path = lt.save(tmp_path / ("ckpt" if sharded else "ckpt.pt"), state, sharded=sharded)
    assert {type(p).__name__ for p in model.parameters()} == {"DTensor"}  # the save resharded it
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loaded = lt.load(path, lt.State(model=plain, optimizer=torch.optim.AdamW(plain.parameters(), lr=0.1)))
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.full_tensor(), q), name
    assert loaded.step == 1 and len(loaded.optimizer.state) == 4
