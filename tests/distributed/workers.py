"""What each of the 2 ranks runs in the distributed tests; results go back to the test.

Every scenario trains with ltransform on 2 ranks (batch B each) and, in the same process,
a plain single-process PyTorch reference on the concatenated batch 2·B; the test compares.
"""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ltransform as lt

B = 4


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                               torch.nn.Tanh(), torch.nn.Linear(16, 1))


def batches(n: int, size: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=gen), torch.randn(size, 1, generator=gen)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    out = model(x)  # half under FSDP's 16-mixed policy outside autocast, and y float32: newer torch
    dtype = torch.promote_types(out.dtype, y.dtype)  # promotes them itself, but torch 2.9's mse_loss
    return F.mse_loss(out.to(dtype), y.to(dtype))  # backward refuses mixed dtypes


def my_part(batch):
    r = lt.rank()
    return tuple(t[r * B:(r + 1) * B] for t in batch)


def full_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def reference(steps: int, accumulate: int = 1, clip: float | None = None, precision: str | None = None):
    """One process, full batch 2·B, plain PyTorch: the result N ranks must reproduce."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = batches(steps * accumulate, 2 * B)
    for i, batch in enumerate(data):
        if precision == "bf16-mixed":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mse(model, batch)
        else:
            loss = mse(model, batch)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def train(strategy: str, *, steps=3, accumulate=1, clip=None, precision=None, mesh=None, policy=None,
          checkpointed=False, via_to_precision=False, **shard_options):
    model = make_model()
    if checkpointed:
        model = lt.checkpoint_activations(model, policy={torch.nn.Linear})
    if strategy in ("fsdp", "hsdp"):
        if via_to_precision:  # the precision recorded on the model decides FSDP2's policy
            model = lt.to_precision(model, precision)
        model = lt.shard(model, policy=policy or {torch.nn.Linear}, mesh=mesh,
                         precision=None if via_to_precision else precision, **shard_options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = lt.pipe(lt.train_step(mse), lt.distribute(strategy))
    if accumulate > 1:
        step = lt.accumulate(step, accumulate)
    if clip is not None:
        step = lt.clip_gradients(step, max_norm=clip)
    if precision is not None:
        step = lt.with_precision(step, precision)
    state = lt.State(model=model, optimizer=opt)
    norms = []
    for batch in batches(steps * accumulate, 2 * B):
        state, metrics = step(state, my_part(batch))
        if "grad_norm" in metrics:
            norms.append(metrics["grad_norm"])
    return model, full_params(model), norms


def equivalence() -> dict[str, float]:
    """Max parameter difference to the single-process reference, per configuration."""
    out = {}
    for name, options in {
        "ddp": {},
        "ddp-accumulate-clip": dict(accumulate=2, clip=0.05),
        "fsdp": {},
        "fsdp-accumulate-clip": dict(accumulate=2, clip=0.05),
        "fsdp-root-only": dict(policy=lambda m: False),
        "fsdp-min-params": dict(policy=100),
        "fsdp-no-reshard": dict(reshard_after_forward=False),
        "fsdp-offload": dict(offload=True),
        "fsdp-checkpointed": dict(checkpointed=True, accumulate=2),
        "ddp-checkpointed": dict(checkpointed=True),
        "hsdp-2x1": dict(mesh=(2, 1)),
        "hsdp-2x1-accumulate": dict(mesh=(2, 1), accumulate=2, clip=0.05),
    }.items():
        strategy = name.split("-")[0]
        ref_options = {k: v for k, v in options.items() if k in ("accumulate", "clip")}
        _, params, _ = train(strategy, **options)
        out[name] = max_diff(params, reference(3, **ref_options))
    return out


def clip_norm() -> dict[str, float]:
    """grad_norm reported under FSDP is the global norm, the reference's total norm."""
    _, _, norms = train("fsdp", steps=1, clip=1e-3)
    model = make_model()
    loss = mse(model, batches(1, 2 * B)[0])
    loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    return {"fsdp": norms[0].item(), "expected": expected.item(), "is_dtensor": hasattr(norms[0], "to_local")}


def no_sync_on_micro_steps() -> dict[str, bool]:
    """A non-boundary micro-step does not communicate: under DDP each rank keeps its own
    gradient; under FSDP2 nothing is reduce-scattered into the sharded .grad yet."""
    out = {}
    for strategy in ("ddp", "fsdp", "fsdp-sync"):
        model = make_model()
        if strategy != "ddp":
            model = lt.shard(model, policy={torch.nn.Linear})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record = lt.Strategy(name=strategy.split("-")[0], sync_micro_steps=strategy == "fsdp-sync")
        step = lt.pipe(lt.train_step(mse), lt.distribute(record), lt.accumulate(2))
        state = lt.State(model=model, optimizer=opt)
        batch = batches(1, 2 * B)[0]
        state, _ = step(state, my_part(batch))
        if strategy == "ddp":
            grads = [lt.all_gather(p.grad) for p in model.parameters()]
            out["ddp-ranks-differ-after-micro-step"] = all(not torch.equal(g[0], g[1]) for g in grads)
        else:
            out[f"{strategy}-reduced-after-micro-step"] = all(p.grad is not None for p in model.parameters())
        out[f"{strategy}-sync-restored"] = lt_sync(model)
        state, _ = step(state, my_part(batch))
        out[f"{strategy}-stepped"] = state.step == 1
    return out


def lt_sync(model) -> bool:
    from ltransform.distributed import wrappers

    return wrappers.gradient_sync(model)


def sharded_memory() -> dict[str, float]:
    """Each rank holds about half of the parameter bytes; meta init allocates nothing."""
    big = lambda: torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])  # noqa: E731
    full = sum(p.numel() * p.element_size() for p in big().parameters())
    model = lt.shard(big(), policy={torch.nn.Linear})
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    empty = lt.init_module(big, empty=True)
    empty = lt.shard(empty, policy={torch.nn.Linear})
    on_meta = all(p.is_meta for p in empty.parameters())
    lt.materialize(empty)
    materialized_local = sum(p.to_local().numel() * p.element_size() for p in empty.parameters())
    devices = {p.to_local().device.type for p in empty.parameters()}
    return {"full": full, "local": local, "meta_before": on_meta, "materialized_local": materialized_local,
            "devices": sorted(devices)}


def precision_fsdp() -> dict[str, float]:
    """bf16-mixed on a model lt.shard sharded with precision='bf16-mixed' (or after
    lt.to_precision('bf16-mixed')) is FSDP2's MixedPrecisionPolicy; equals a hand-written
    fully_shard(mp_policy=...) + autocast loop bitwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    sharded, ours, _ = train("fsdp", precision="bf16-mixed")
    _, recorded, _ = train("fsdp", precision="bf16-mixed", via_to_precision=True)
    gathered = []  # the weight FSDP2 all-gathered for the forward (its own pre-forward hook runs first)
    sharded[0].register_forward_pre_hook(lambda module, args: gathered.append(module.weight.dtype))
    with torch.no_grad():
        sharded(my_part(batches(1, 2 * B)[0])[0])
    model = make_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in batches(3, 2 * B):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model, my_part(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"vs_hand_written": max_diff(ours, full_params(model)), "to_precision_vs_shard": max_diff(recorded, ours),
            "vs_single_process_bf16": max_diff(ours, reference(3, precision="bf16-mixed")),
            "param_dtype": str(gathered[0]), "weight_dtype": str(sharded[0].weight.dtype)}


def float8() -> dict[str, object] | None:
    """torchao-float8, converted before shard: FSDP2 all-gathers the weights in fp8 and trains
    as DDP does (both scale each rank's own batch dynamically, so neither is bitwise one
    process with the double batch: that one is compared within a tolerance)."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return None

    def wide():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))

    data = [(torch.randn(2 * B, 16, generator=torch.Generator().manual_seed(i)),
             torch.randn(2 * B, 16, generator=torch.Generator().manual_seed(100 + i))) for i in range(3)]

    def run(strategy):
        model = lt.to_precision(wide(), "torchao-float8")
        if strategy == "fsdp":
            model = lt.shard(model, policy=lambda m: type(m).__name__ == "Float8Linear")
        state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        step = lt.pipe(lt.train_step(mse), lt.with_precision("torchao-float8"), lt.distribute(strategy))
        for batch in data:
            state, _ = step(state, my_part(batch))
        return model, full_params(model)

    sharded, fsdp = run("fsdp")
    _, ddp = run("ddp")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def hand_written(sharded):  # torchao's recipe for FSDP2, and one process on the double batch
        model = wide()
        convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=sharded))
        if sharded:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in (model[0], model[2], model):
                fully_shard(layer, mp_policy=policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for batch in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = mse(model, my_part(batch) if sharded else batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return full_params(model)

    one = hand_written(False)
    unconverted = lt.shard(wide(), policy={torch.nn.Linear})
    late = _error(lambda: lt.with_precision(lt.train_step(mse), "torchao-float8")(
        lt.State(model=unconverted, optimizer=torch.optim.SGD(unconverted.parameters())), my_part(data[0])))
    return {"late_error": late, "vs_hand_written": max_diff(fsdp, hand_written(True)),
            "vs_one_process": max_diff(fsdp, one), "ddp_vs_one_process": max_diff(ddp, one),
            "local_weight": type(sharded[0].weight.to_local()).__name__}


def float8_checkpoint(tmp: str) -> dict[str, object] | None:
    """A float8 model sharded with fp8 all-gather saves sharded and full; both load back."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return None

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        model = lt.shard(lt.to_precision(model, "torchao-float8"), policy=lambda m: type(m).__name__ == "Float8Linear")
        return lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1))

    step = lt.pipe(lt.train_step(mse), lt.with_precision("torchao-float8"), lt.distribute("fsdp"))
    state, _ = step(build(0), (torch.randn(B, 16), torch.randn(B, 16)))
    lt.save(os.path.join(tmp, "float8"), state, sharded=True)
    lt.save(os.path.join(tmp, "float8.pt"), state)
    before = max_diff(full_params(build(1).model), full_params(state.model))  # another model: differs
    loaded = {name: lt.load(os.path.join(tmp, name), build(1)) for name in ("float8", "float8.pt")}
    return {"before": before, **{name: max_diff(full_params(s.model), full_params(state.model))
                                 for name, s in loaded.items()}}


class Bumped(torch.nn.Linear):
    """A linear layer whose weight gradient gets inf in its last row when ``bump`` is set."""

    bump = False

    def forward(self, x):
        weight = self.weight
        if self.bump and weight.requires_grad:
            weight = weight * 1.0
            weight.register_hook(_inf_last_row)
        return F.linear(x, weight, self.bias)


def _inf_last_row(grad):
    grad = grad.clone()
    grad[-1] = float("inf")
    return grad


def fp16_inf_on_one_shard() -> dict[str, object]:
    """16-mixed under FSDP: an inf gradient in rank 1's shard only makes *every* rank skip the
    update (the grad scaler's found-inf is reduced across the mesh), so ranks never diverge."""
    out = {}
    for strategy in ("ddp", "fsdp"):
        model = make_model()
        model[2].__class__ = Bumped  # its last weight row gets an inf gradient on rank 1 only
        model[2].bump = lt.rank() == 1
        if strategy == "fsdp":
            model = lt.shard(model, policy={torch.nn.Linear}, precision="16-mixed")
        step = lt.pipe(lt.train_step(mse), lt.distribute(strategy), lt.with_precision("16-mixed"))
        state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        before = full_params(model)
        state, _ = step(state, my_part(batches(1, 2 * B)[0]))
        out[strategy] = {"step": state.step, "scale": state.extra["grad_scaler"].get_scale(),
                         "changed": max_diff(before, full_params(model))}
        state, _ = step(state, my_part(batches(2, 2 * B)[1]))  # rank 1 still bumps: skipped again
        out[strategy]["second_step"] = state.step
        if strategy == "fsdp":  # the construction: after backward only rank 1's shard holds inf
            mse(model, my_part(batches(1, 2 * B)[0])).backward()
            out["local_shard_finite"] = bool(model[2].weight.grad.to_local().isfinite().all())
    return out


def errors() -> dict[str, str]:
    out = {}
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lt.shard(model, policy={torch.nn.Linear})
    step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
    out["stale"] = _error(lambda: step(lt.State(model=model, optimizer=opt), my_part(batches(1, 2 * B)[0])))
    model = make_model()
    lt.shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lt.pipe(lt.train_step(mse), lt.distribute("ddp"))
    out["ddp_on_sharded"] = _error(lambda: lt.prepare(step, lt.State(model=model, optimizer=opt)))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
    out["fsdp_unsharded"] = _error(lambda: lt.prepare(step, lt.State(model=model, optimizer=opt)))
    step = lt.pipe(lt.train_step(mse), lt.distribute("single"))
    out["single"] = _error(lambda: lt.prepare(step, lt.State(model=model, optimizer=opt)))
    out["mesh"] = _error(lambda: lt.shard(make_model(), mesh=(2, 2)))
    model = lt.shard(make_model(), policy={torch.nn.Linear})  # no precision: no mixed-precision policy
    step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"), lt.distribute("fsdp"))
    out["precision"] = _error(lambda: lt.prepare(step, lt.State(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1))))
    return out


def _error(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test reads the message
        return f"{type(error).__name__}: {error}"
    return "no error"


def collectives() -> dict[str, object]:
    r = lt.rank()
    t = torch.tensor([1.0 + r, 10.0 * r])
    lt.barrier()
    return {
        "rank": r, "world": lt.world_size(), "local_rank": lt.local_rank(), "device": str(lt.device()),
        "mean": lt.all_reduce(t, "mean").tolist(), "sum": lt.all_reduce(t, "sum").tolist(),
        "max": lt.all_reduce(t, "max").tolist(), "min": lt.all_reduce(t, "min").tolist(),
        "input_unchanged": t.tolist(),
        "gather": [g.tolist() for g in lt.all_gather(t)],
        "broadcast": lt.broadcast({"from": r}), "broadcast_tensor": lt.broadcast(t).tolist(),
    }


def run_loader() -> dict[str, object]:
    """lt.run on 2 ranks with a DataLoader: DistributedSampler, averaged metrics, rank-0 logs."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))
    evals = TensorDataset(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))
    model = make_model()
    logged: list[tuple[int, dict]] = []
    seen: list[list[int]] = []
    calls = {"mean_across_ranks": 0}
    from ltransform.runner.hooks import logs as run_module

    original = run_module.mean_across_ranks

    def counting(metrics):
        calls["mean_across_ranks"] += 1
        return original(metrics)

    run_module.mean_across_ranks = counting
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    step = lt.pipe(lt.train_step(mse), lt.distribute("ddp"))
    state = lt.run(step, state, DataLoader(data, batch_size=B), max_epochs=1, log_every=2,
                   loggers=[lambda m, s: logged.append((s, dict(m)))], progress=False,
                   eval_step=lt.eval_step(mse), eval_data=DataLoader(evals, batch_size=B))
    run_module.mean_across_ranks = original
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_losses = []
    for batch in DataLoader(data, batch_size=2 * B):
        # DistributedSampler gives rank r samples r, r+2, ...; their union per step is one
        # contiguous batch of 2*B, the same samples in another order
        loss = mse(ref, batch)
        ref_losses.append(loss.item())
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref_val = mse(ref, evals.tensors).item()
    # shuffled, 2 epochs: what each rank sees
    shuffled = DataLoader(TensorDataset(torch.arange(16.0).unsqueeze(1)), batch_size=2, shuffle=True)
    model2 = torch.nn.Linear(1, 1)

    def record(m, batch):
        seen.append(batch[0].squeeze(1).long().tolist())
        return m(batch[0]).pow(2).mean()

    lt.run(lt.pipe(lt.train_step(record), lt.distribute("ddp")),
           lt.State(model=model2, optimizer=torch.optim.SGD(model2.parameters(), lr=0.0)),
           shuffled, max_epochs=2, progress=False, log_every=None)
    return {"params": max_diff(full_params(model), [p.detach() for p in ref.parameters()]),
            "logged": logged, "ref_losses": ref_losses, "ref_val": ref_val, "averages": calls["mean_across_ranks"],
            "seen": seen}


def meta_init_peak_memory() -> dict[str, float]:
    """Peak RSS growth of meta init → shard → materialize for a 64 MB model on 2 ranks."""
    lt.shard(torch.nn.Linear(8, 8))  # FSDP2 imports and mesh set-up happen before measuring
    build = lambda: torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(4)])  # noqa: E731
    lt.barrier()
    before = peak_rss_mb()
    model = lt.materialize(lt.shard(lt.init_module(build, empty=True), policy={torch.nn.Linear}))
    growth = peak_rss_mb() - before
    return {"growth_mb": growth, "full_mb": 4 * 2048 * 2048 * 4 / 2**20,
            "finite": all(bool(p.to_local().isfinite().all()) for p in model.parameters())}


def uneven_data() -> dict[str, str]:
    """Lists of different lengths per rank would hang at the extra step: a clear error instead."""
    model = make_model()
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    data = batches(3 + lt.rank(), B)
    step = lt.pipe(lt.train_step(mse), lt.distribute("ddp"))
    out = {"error": _error(lambda: lt.run(step, state, data, progress=False))}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lt.run(lt.train_step(mse), state, batches(2, B), progress=False)  # no distribute
        wrapped = torch.nn.parallel.DistributedDataParallel(make_model())
        lt.run(lt.train_step(mse), lt.State(model=wrapped, optimizer=torch.optim.SGD(wrapped.parameters())),
               batches(2, B), progress=False)  # the user's own DDP: no warning
    out["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    return out


def checkpoints(tmp: str) -> dict[str, object]:
    """Save on 2 ranks (sharded and full) for the test to load on 1; load the 1-process
    checkpoint the test saved, resharded onto 2 ranks."""
    from pathlib import Path

    model = lt.shard(make_model(), policy={torch.nn.Linear})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = lt.pipe(lt.train_step(mse), lt.distribute("fsdp"))
    state = lt.State(model=model, optimizer=opt)
    for batch in batches(2, 2 * B):
        state, _ = step(state, my_part(batch))
    lt.save(Path(tmp) / "two_ranks", state, sharded=True)
    lt.save(Path(tmp) / "two_ranks_full.pt", state)
    saved = [p.detach().clone() for p in full_params(model)]
    fresh = lt.shard(make_model(seed=7), policy={torch.nn.Linear})
    target = lt.State(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-2))
    loaded = lt.load(Path(tmp) / "one_rank", target)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full_optim = get_optimizer_state_dict(fresh, target.optimizer, options=StateDictOptions(full_state_dict=True))
    return {"saved": saved, "loaded_params": full_params(fresh), "loaded_step": loaded.step,
            "loaded_exp_avg": full_optim["state"]["0.weight"]["exp_avg"].full_tensor()
            if hasattr(full_optim["state"]["0.weight"]["exp_avg"], "full_tensor")
            else full_optim["state"]["0.weight"]["exp_avg"]}


def exact_resume(tmp: str) -> dict[str, bool]:
    """DDP on 2 ranks with a shuffled DataLoader (DistributedSampler): 5 steps, a sharded
    checkpoint, a resume to 8 equals 8 straight, across the epoch end (6 batches per epoch)."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(9)
    data = TensorDataset(torch.randn(48, 4, generator=gen), torch.randn(48, 1, generator=gen))

    def fresh():
        model = make_model()
        return lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))

    step = lt.pipe(lt.train_step(mse), lt.distribute("ddp"))
    hook = lt.every(5, lt.checkpoint_sharded(dir=f"{tmp}/resume"))
    straight = lt.run(step, fresh(), DataLoader(data, batch_size=B, shuffle=True), max_steps=8, progress=False)
    lt.run(step, fresh(), DataLoader(data, batch_size=B, shuffle=True), max_steps=5, progress=False, hooks=[hook])
    torch.manual_seed(100 + lt.rank())
    resumed = lt.run(step, fresh(), DataLoader(data, batch_size=B, shuffle=True), max_steps=8, progress=False,
                     hooks=[hook], resume="latest")
    return {"equal": all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters())),
            "counters": (resumed.step, resumed.epoch) == (straight.step, straight.epoch) == (8, 1)}


def eval_run(batch: int = 4) -> dict[str, object]:
    """lt.run's evaluation of a sharded bf16-mixed model (lr 0: the weights stay the initial ones)
    over 13 samples in loader batches of ``batch``; also run in one process by the test."""
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen))
    evals = TensorDataset(torch.randn(13, 16, generator=gen), torch.randn(13, 1, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    model = lt.shard(model, precision="bf16-mixed")
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    step = lt.pipe(lt.train_step(mse), lt.with_precision("bf16-mixed"), lt.distribute("auto"))
    logged: list[dict] = []
    seen: list[int] = []

    def val(model, batch):
        seen.append(len(batch[0]))
        return mse(model, batch)

    class Record:  # a hook object: its end() runs after the epoch's evaluation
        def __call__(self, state, run):
            pass

        def end(self, state, run):
            logged.append(dict(run.evaluated))

    lt.run(step, state, DataLoader(data, batch_size=4), max_epochs=1, log_every=None, progress=False,
           eval_step=lt.eval_step(val), eval_data=DataLoader(evals, batch_size=batch), hooks=[Record()])
    return {"val": logged, "seen": seen}


def all_scenarios(tmp: str | None = None) -> dict[str, object]:
    results = {}
    if tmp is not None:
        results["checkpoints"] = checkpoints(tmp)
        results["exact_resume"] = exact_resume(tmp)
        results["float8_checkpoint"] = float8_checkpoint(tmp)
    for fn in (meta_init_peak_memory, equivalence, clip_norm, no_sync_on_micro_steps, sharded_memory, precision_fsdp,
               float8, fp16_inf_on_one_shard, errors, collectives, run_loader, uneven_data, eval_run):
        results[fn.__name__] = fn()
    gathered = [None] * lt.world_size()
    dist.all_gather_object(gathered, results)  # every rank's results, so the test sees rank 1's too
    return gathered


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pid() -> int:
    return os.getpid()


class Noise(torch.utils.data.Dataset):
    """A random augmentation's stand-in: every item is a fresh draw from the worker's torch RNG."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)


def worker_seeds() -> list[list[float]]:
    """lt.run on 2 ranks over a DataLoader with 2 workers, after seed_everything(0) on each rank:
    the numbers each rank's step saw, per rank."""
    from torch.utils.data import DataLoader

    lt.seed_everything(0)
    seen: list[float] = []

    def record(m, batch):
        seen.extend(batch.flatten().tolist())
        return m(batch).pow(2).mean()

    model = torch.nn.Linear(1, 1)
    lt.run(lt.pipe(lt.train_step(record), lt.distribute("ddp")),
           lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0)),
           DataLoader(Noise(), batch_size=2, num_workers=2), distributed_sampler=True, progress=False,
           log_every=None)
    gathered = [None] * lt.world_size()
    dist.all_gather_object(gathered, seen)
    return gathered
