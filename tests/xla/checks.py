"""The XLA checks, one per process (torch_xla's SPMD runtime is process-global): run as
``python tests/xla/checks.py NAME [ARG...]`` with ``PJRT_DEVICE=CPU CPU_NUM_DEVICES=N``; prints
``OK ...`` and exits 0, or fails with an assertion naming what differs.

Each training check compares ltransform on N XLA devices with a hand-written plain-PyTorch loop
on the CPU, one process, the full batch. The XLA runtime is started first: torch's autograd
engine sizes its per-device queues when it first runs, so a CPU backward before torch_xla's
devices exist would leave XLA without one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import ltransform as lt
from ltransform.distributed import wrappers

TOL = {"32-true": 1e-6}  # bf16: the CPU's own bf16-vs-fp32 drift (reference_drift)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, width)
        self.blocks = torch.nn.Sequential(*(Block(width) for _ in range(depth)))
        self.out = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(n: int = 6, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


SEEN: list[str] = []  # the sharding of every batch the loss saw on XLA


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    if x.device.type == "xla":
        SEEN.append(spec_of(x))
    return F.mse_loss(model(x).float(), y)


def spec_of(tensor: torch.Tensor) -> str:
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def split(spec: str, devices: int | None = None) -> bool:
    """An XLA sharding that splits the tensor (over ``devices`` along its first dimension, if given)."""
    if "devices=[" not in spec or spec.startswith("{replicated"):
        return False
    return devices is None or spec.startswith(f"{{devices=[{devices},")


def check_batches_split(strategy: str) -> str:
    """Every batch the step saw was split over all devices (or, with no distribute, replicated)."""
    assert SEEN, "the loss saw no XLA batch"
    if strategy == "none":
        assert all(not split(s) for s in SEEN), SEEN[:3]
        return "batches replicated"
    assert all(split(s, lt.world_size()) for s in SEEN), SEEN[:3]
    return f"batches {SEEN[0]}"


def reference(data, *, every: int = 1, clip: float | None = None, precision: str = "32-true") -> dict:
    """The plain-PyTorch loop on the CPU: full batches, the same accumulation, clipping, precision."""
    model = net()
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    half = precision == "16-mixed"
    scaler = torch.amp.GradScaler("cpu", enabled=half)
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16 if half else torch.bfloat16,
                            enabled=precision in ("bf16-mixed", "16-mixed")):
            out = model(x.to(torch.bfloat16) if precision == "bf16-true" else x)
        loss = F.mse_loss(out.float(), y) / every
        scaler.scale(loss).backward()
        if (i + 1) % every == 0:
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().float() for k, v in model.state_dict().items()}


def compare(got: dict, want: dict, tol: float, what: str) -> float:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= tol, f"{what}: max |difference| {worst:.3g} > {tol:g}"
    return worst


def trained(step, model, data, *, opt=None) -> lt.State:
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    return lt.run(step, lt.State(model=model, optimizer=opt), data, progress=False)


def step_of(*, every: int = 1, clip: float | None = None, precision: str = "32-true", strategy: str = "xla"):
    transforms = [lt.with_precision(precision)]
    if every > 1:
        transforms.append(lt.accumulate(every))
    if clip is not None:
        transforms.append(lt.clip_gradients(max_norm=clip))
    if strategy != "none":  # (none: a step with no distribute; on XLA its graph is cut all the same)
        transforms.append(lt.distribute(strategy))
    return lt.pipe(lt.train_step(loss_fn), *transforms)


# --- checks ---------------------------------------------------------------------------------------


def check_distribute(every: str = "1", clip: str = "none", precision: str = "32-true", strategy: str = "xla"):
    every_, clip_ = int(every), None if clip == "none" else float(clip)
    data = batches()
    model = net()
    if precision == "bf16-true":
        model = lt.to_precision(model, "bf16-true")
    state = trained(step_of(every=every_, clip=clip_, precision=precision, strategy=strategy), model, data)
    assert next(state.model.parameters()).device.type == "xla"
    want = reference(data, every=every_, clip=clip_, precision=precision)
    got = cpu_state(state.model)
    what = f"distribute({strategy!r}) on {lt.world_size()} devices, {precision}"
    if precision == "32-true":
        worst = compare(got, want, TOL[precision], what)
    else:  # no further from fp32 than twice the CPU's own bf16 drift, and not fp32 itself
        exact = reference(data, every=every_, clip=clip_)
        drift = max((want[k] - exact[k]).abs().max().item() for k in exact)
        worst = compare(got, exact, 2 * drift, what + " vs fp32")
        assert worst > 1e-5, f"{what}: equals fp32 ({worst:.2g}): the precision did not apply"
    split_text = check_batches_split(strategy)
    return (f"{lt.world_size()} devices, accumulate {every_}, clip {clip_}, {precision}: max diff {worst:.2e}; "
            f"{split_text}")


def check_loader():
    """A DataLoader (lt.run's usual input): its batches are split over the mesh the same way."""
    from torch.utils.data import DataLoader, TensorDataset

    data = batches()
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    state = trained(step_of(), net(), loader)
    worst = compare(cpu_state(state.model), reference(data), TOL["32-true"], "DataLoader on XLA")
    return f"DataLoader batches on {lt.world_size()} devices: max diff {worst:.2e}; {check_batches_split('xla')}"


def check_hf(shard: str = "yes"):
    """A Hugging Face model (GPT-2, tied embedding and head): its ModelOutput's loss, FSDPv2 on its
    blocks, against the same model trained by a plain loop on the CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 64, (8, 16), generator=g) for _ in range(4)]

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)

    def hf_loss(model, ids):
        return model(input_ids=ids, labels=ids).loss

    model = build()
    if shard == "yes":
        model = lt.shard(model, policy={GPT2Block})
    state = lt.run(lt.pipe(lt.train_step(hf_loss), lt.distribute("xla")),
                   lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3)), data,
                   progress=False)
    plain = state.model.module if shard == "yes" else state.model
    assert plain.lm_head.weight is plain.transformer.wte.weight, "the tied embedding and head came apart"
    got = cpu_state(state.model)
    ref = build()  # (after the XLA run: a first backward on the CPU once transformers is imported leaves
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)  # torch's autograd engine without XLA queues)
    for ids in data:
        hf_loss(ref, ids).backward()
        opt.step()
        opt.zero_grad()
    # (fp32, 4 AdamW steps through GELU, softmax and layer norms: XLA's CPU kernels round differently)
    worst = compare(got, {k: v.float() for k, v in ref.state_dict().items()}, 1e-5, "GPT-2 on XLA")
    return f"GPT-2 (shard={shard}) on {lt.world_size()} devices: max diff {worst:.2e}"


def check_batch_split():
    """The batch really is split over the devices (and parameters replicated)."""
    import torch_xla

    from ltransform.distributed import xla

    state = trained(step_of(), net(), batches(n=1))
    seen = []
    move = xla.batch_mover(lt.device())
    x = move(torch.randn(16, 8))
    spec = torch_xla._XLAC._get_xla_sharding_spec(x)
    seen.append(spec)
    assert "devices=[" in spec and spec.startswith("{devices=[" + str(lt.world_size())), spec
    weight = torch_xla._XLAC._get_xla_sharding_spec(state.model.inp.weight)
    assert weight in ("", "{replicated}"), weight
    odd = move(torch.randn(3, 8))  # the mesh's size does not divide 3: replicated
    assert torch_xla._XLAC._get_xla_sharding_spec(odd) in ("", "{replicated}")
    return f"batch {spec}, weight {weight or 'replicated'}"


def check_shard(mesh: str = "none", ckpt: str = "no", init: str = "plain"):
    shape = None if mesh == "none" else tuple(int(n) for n in mesh.split("x"))
    data = batches()
    if init in ("meta", "meta-then-shard"):  # materialize before shard, or after (the order on GPUs)
        torch.manual_seed(0)
        model = lt.init_module(Net, empty=True)
        assert next(model.parameters()).device.type == "meta"
        if init == "meta":
            model = lt.materialize(model)
            assert next(model.parameters()).device.type == "xla"
        state = net().state_dict()  # the reference's weights, loaded once materialized
    else:
        model = net()
    if ckpt == "yes":
        model = lt.checkpoint_activations(model, policy={Block})
    model = lt.shard(model, policy={Block}, mesh=shape)
    if init.startswith("meta"):
        model = lt.materialize(model)  # (after shard: allocated already, so nothing happens)
        first = model.module.blocks[0].module
        assert not any(p.isnan().any().item() for p in model.parameters()), "a sentinel survived"
        assert torch.equal(first.norm.weight.cpu(), torch.ones(16)), "LayerNorm was not initialised"
        assert first.up.weight.std().item() > 0, "Linear was not initialised"
        model.load_state_dict(state)
    from ltransform.distributed import xla

    assert xla.is_fsdp(model) and sum(xla.is_fsdp(m) for m in model.modules()) == 3, "root + 2 blocks wrapped"
    assert set(model.state_dict()) == set(net().state_dict()), "the wrapper's keys are the plain model's"
    import torch_xla

    spec = torch_xla._XLAC._get_xla_sharding_spec(model.module.blocks[0].module.up.weight)
    assert "devices=" in spec and "replicated" not in spec.split("last_tile")[0], spec
    state = trained(step_of(), model, data)
    worst = compare(cpu_state(state.model), reference(data), TOL["32-true"],
                    f"shard(mesh={shape}, checkpoint={ckpt}, init={init})")
    return f"FSDPv2 mesh {shape or (1, lt.world_size())}, checkpoint {ckpt}, {init}: max diff {worst:.2e}; {spec}"


def check_order():
    """checkpoint_activations and lt.compile after shard are refused on XLA too, lt.compile leaves the model
    to XLA's own compiler, and a wrong strategy names the fix."""
    model = lt.shard(net(), policy={Block})
    try:
        lt.checkpoint_activations(model, policy={Block})
    except RuntimeError as error:
        assert "must be applied before shard" in str(error), error
    else:
        raise AssertionError("checkpoint_activations after shard was accepted")
    try:
        lt.compile(model, policy={Block})
    except RuntimeError as error:
        assert "torch.compile must be applied before shard" in str(error), error
    else:
        raise AssertionError("lt.compile after shard was accepted")
    compiled = net()  # torch_xla traces and compiles the whole step already: lt.compile leaves the model eager
    assert lt.compile(compiled, policy={Block}) is compiled
    assert not any(wrappers.is_compiled_in_place(m) for m in compiled.modules())
    plain = net()
    step = lt.pipe(lt.train_step(loss_fn), lt.distribute("ddp"))
    try:
        step(lt.State(model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.1)), batches(1)[0])
    except RuntimeError as error:
        assert "distribute('xla')" in str(error), error
    else:
        raise AssertionError("distribute('ddp') on XLA was accepted")
    return "order and strategy errors"


def check_save(directory: str, kind: str = "sharded", model_kind: str = "shard"):
    """Train 3 steps, save (sharded or full), write the expected values for the loaders."""
    data = batches()
    model = net()
    if model_kind == "shard":
        model = lt.shard(model, policy={Block})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = step_of(strategy="auto")  # the same script on XLA and on the CPU
    state = lt.run(step, lt.State(model=model, optimizer=opt), data[:3], progress=False)
    path = Path(directory) / "ckpt"
    lt.save(path, state, sharded=kind == "sharded")
    straight = lt.run(step, state, data[3:], progress=False)  # the run that goes on: what a resume must equal
    torch.save({"at_save": reference(data[:3]), "straight": cpu_state(straight.model)}, Path(directory) / "expected.pt")
    if kind == "sharded":  # the manifest records every file (each host hashes its share of them)
        from ltransform.checkpoint.sharded import manifest_files

        recorded = set(manifest_files(path))
        present = {p.name for p in path.iterdir() if p.name != "manifest.pt"}
        assert recorded == present, f"the manifest records {sorted(recorded)}, the directory holds {sorted(present)}"
    else:
        assert path.is_file()
    return f"saved {kind} on {lt.world_size()} devices"


def check_load(directory: str, where: str = "xla", model_kind: str = "shard"):
    """Load what check_save wrote (on another device count, or on plain CPU), then resume exactly."""
    expected = torch.load(Path(directory) / "expected.pt", weights_only=True)
    model = net(seed=7)  # other weights: the load must replace them
    if model_kind == "shard" and where == "xla":
        model = lt.shard(model, policy={Block})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = lt.load(Path(directory) / "ckpt", lt.State(model=model, optimizer=opt))
    worst = compare(cpu_state(state.model), expected["at_save"], 1e-6, f"load on {where}")
    assert state.step == 3, state.step
    if where == "cpu":
        assert "torch_xla" not in sys.modules, "a plain CPU load imported torch_xla"
        assert next(state.model.parameters()).device.type == "cpu"
        return f"loaded on plain CPU without torch_xla: max diff {worst:.2e}"
    if model_kind == "shard":  # still split over the devices after the copy-in, and so is Adam's state
        weight = state.model.module.blocks[0].module.up.weight
        assert split(spec_of(weight), lt.world_size()), f"the loaded parameter is no longer sharded: {spec_of(weight)}"
        moment = state.optimizer.state[weight]["exp_avg"]
        assert split(spec_of(moment), lt.world_size()), f"the loaded Adam state is replicated: {spec_of(moment)}"
    resumed = lt.run(step_of(strategy="auto"), state, batches()[3:], progress=False)
    exact = compare(cpu_state(resumed.model), expected["straight"], 0.0, "resume vs the straight run")
    return f"loaded on {lt.world_size()} devices: max diff {worst:.2e}; resumed exactly ({exact:.1e})"


def check_partial(directory: str):
    """strict=False on XLA: a model with a layer the checkpoint lacks loads what it has."""
    expected = torch.load(Path(directory) / "expected.pt", weights_only=True)
    model = net(seed=7)
    model.extra = torch.nn.Linear(2, 2)
    model = lt.shard(model, policy={Block})
    state = lt.load(Path(directory) / "ckpt", lt.State(model=model), strict=False)
    got = cpu_state(state.model)
    assert "extra.weight" in got
    worst = compare({k: v for k, v in got.items() if not k.startswith("extra.")}, expected["at_save"], 1e-6,
                    "strict=False load on XLA")
    return f"strict=False: loaded what the checkpoint has, max diff {worst:.2e}"


def check_versions():
    from ltransform.distributed import xla

    try:
        xla.check_versions("2.13.0+cpu", "2.9.0")
    except ImportError as error:
        text = str(error)
        assert "2.13.0" in text and "2.9" in text and "pip install" in text, text
    else:
        raise AssertionError("a torch 2.13 / torch_xla 2.9 pair was accepted")
    xla.check_versions()  # this venv's pair matches
    return "mismatch refused; installed pair accepted"


def check_half():
    """16-mixed on XLA: float16 autocast with torch's GradScaler, against the same on the CPU."""
    return check_distribute("1", "none", "16-mixed")


def check_window(every: str = "2"):
    """graph_per_update=True: one cut per accumulation window, and the same training."""
    import torch_xla.debug.metrics as met

    data = batches(n=8)
    step = lt.pipe(lt.train_step(loss_fn), lt.accumulate(int(every)),
                   lt.distribute(lt.Strategy(name="xla", graph_per_update=True)))
    cuts = met.counter_value("MarkStep") or 0
    state = trained(step, net(), data)
    runs = met.counter_value("MarkStep") - cuts
    assert runs == len(data) // int(every), f"{runs} graph cuts for {len(data) // int(every)} updates"
    worst = compare(cpu_state(state.model), reference(data, every=int(every)), TOL["32-true"], "graph_per_update")
    return f"one cut per window of {every}: {runs} cuts for {len(data)} micro-steps; max diff {worst:.2e}"


def check_compiles(every: str = "1", strategy: str = "xla"):
    """No recompilation per step after warm-up: the compile count stays flat."""
    import torch_xla.debug.metrics as met

    data = batches(n=12)
    model = net()
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    step, every_ = step_of(every=int(every), strategy=strategy), int(every)

    def more(state, part):  # (lt.run's max_epochs=1 would stop a second call at once)
        out = lt.run(step, state, part, max_steps=state.step + len(part) // every_, progress=False)
        assert out.step == state.step + len(part) // every_, (state.step, out.step)
        return out

    state = more(state, data[:4])
    before = met.metric_data("CompileTime")[0]
    state = more(state, data[4:8])
    after = met.metric_data("CompileTime")[0]
    assert after == before, f"{after - before} compilations in 4 micro-steps after warm-up"
    cuts = met.counter_value("MarkStep")
    state = more(state, data[8:12])
    runs = met.counter_value("MarkStep") - cuts
    assert runs == 4, f"{runs} graph cuts for 4 micro-steps: not one per micro-step"
    return f"{before} compilations in warm-up, 0 after (accumulate {every}, {strategy}); one program per micro-step"


def check_launch():
    """lt.launch runs fn in this process on XLA (SPMD drives every device from it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lt.launch(lambda: (os.getpid(), lt.world_size()), devices=4)
    assert got == (os.getpid(), lt.world_size()), got
    assert any("one process" in str(w.message) for w in caught), [str(w.message) for w in caught]
    try:
        lt.launch(lambda: None, num_nodes=2, master_port=1234)
    except ValueError as error:
        assert "one process per host" in str(error), error
    else:
        raise AssertionError("lt.launch(num_nodes=2) on XLA was accepted")
    return "lt.launch in-process; num_nodes refused"


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    name, *args = sys.argv[1:]
    if os.environ.get("PJRT_DEVICE"):
        lt.device()  # start XLA's runtime before any CPU backward (see the module's docstring)
    print("OK", CHECKS[name](*args), flush=True)
