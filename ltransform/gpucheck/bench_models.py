"""The GPU benchmark's parts: GPT presets, data, FLOPs, the measured bf16 matmul peak, and the
three training loops (raw PyTorch, ltransform, Lightning Fabric) doing identical math.

Each loop is a :class:`Loop`: ``train(batches)`` runs one optimizer step per batch and returns
the last loss (a tensor, left on the device). The models start from one seeded build, copied;
all three train under bf16 autocast with the same AdamW and the same regional compile.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import nn

import ltransform as lt
from ltransform.examples.gpt import GPT, Block, GPTConfig, loss_fn, preset

Batch = tuple[torch.Tensor, torch.Tensor]


class Skipped(Exception):
    """A part of the benchmark that cannot run here; the message is the reason."""


def importable(module: str, top: str) -> Any:
    """``import module`` and return the package ``top``, or :class:`Skipped` with why: a build for
    another torch or CUDA can fail as it imports (AttributeError, RuntimeError, OSError, ...)."""
    try:
        importlib.import_module(module)
        return importlib.import_module(top)
    except Exception as error:  # noqa: BLE001  (whatever the import raises: this part cannot run here)
        raise Skipped(f"{top} does not import here ({type(error).__name__}: {str(error)[:300]})") from None


def failure(error: BaseException) -> dict[str, str]:
    """What a part or loop that raised records instead of figures, so the rest still runs."""
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}


@attrs.frozen(kw_only=True)
class Preset:
    name: str
    config: GPTConfig
    batch: int


PRESETS = (  # GPT-2's small and medium sizes, vocabulary padded to 50304, sequence 1024
    Preset(name="gpt-124m", batch=16, config=preset("gpt-124m")),
    Preset(name="gpt-350m", batch=16, config=preset("gpt-350m")),
)
SMOKE_PRESETS = (  # width and vocab multiples of 16, so fp8 layers can take every Linear
    Preset(name="smoke", batch=4, config=GPTConfig(vocab=256, block=32, n_layer=2, n_head=4, n_embd=64)),
)


@attrs.frozen(kw_only=True)
class Settings:
    """How much to run: untimed warm-up steps (they include compiling), then ``rounds`` rounds
    of ``steps`` timed steps per loop, the loops taking turns within each round."""

    warmup: int
    rounds: int
    steps: int
    compile: bool
    compile_options: dict[str, Any] = attrs.field(factory=dict)
    peak_size: int = 8192
    part_s: dict[str, float] = attrs.field(factory=dict)  # the least time left to start a part, by kind
    # ("model", "fp8", "qlora"); a kind not named may start with any time left
    lr: float = 6e-4

    def optimizer(self, params: Any, device: torch.device) -> torch.optim.Optimizer:
        """The same AdamW for every loop (fused on CUDA, torch's default implementation elsewhere)."""
        return torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                 fused=True if device.type == "cuda" else None)


@attrs.define
class Loop:
    name: str
    model: nn.Module  # the plain module (not Fabric's wrapper), for memory and evaluation
    optimizer: torch.optim.Optimizer
    train: Callable[[Sequence[Batch]], torch.Tensor]
    note: str = ""
    clock: StepClock | None = None  # times the steps inside ``train`` (set-up and tear-down left out)


class StepClock:
    """The seconds from the first step's start to the last step's end inside one ``lt.run``
    call: the clock starts (the device synchronized) when ``lt.run`` asks for the first batch
    of :meth:`data` and stops in a hook after the step that reaches ``end`` (synchronized),
    so ``lt.run``'s set-up and tear-down, paid once per call, stay outside the timed region
    as they are for a hand-written loop. ``seconds`` is None until a call finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started: float | None = None
        self.seconds: float | None = None
        self.end = 0

    def data(self, batches: Sequence[Batch], end: int) -> _Clocked:
        self.started, self.seconds, self.end = None, None, end
        return _Clocked(batches, self)

    def hook(self, state: Any) -> None:
        if self.started is not None and state.step >= self.end:
            sync(self.device)
            self.seconds = time.perf_counter() - self.started


class _Clocked:
    def __init__(self, batches: Sequence[Batch], clock: StepClock) -> None:
        self.batches, self.clock = batches, clock

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        sync(self.clock.device)
        self.clock.started = time.perf_counter()
        yield from self.batches


def build(cfg: GPTConfig, device: torch.device, seed: int) -> GPT:
    """The seeded model, built directly on ``device`` (no slow CPU init for the big presets)."""
    torch.manual_seed(seed)
    with device:
        return GPT(cfg)


def make_data(cfg: GPTConfig, batch: int, count: int, device: torch.device, seed: int) -> list[Batch]:
    """``count`` batches of random tokens, generated on ``device`` once."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(cfg.vocab, (count, batch, cfg.block + 1), generator=gen, device=device)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def matmul_params(cfg: GPTConfig) -> int:
    """Weights that multiply activations: every block's four Linear layers and the head."""
    return cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab * cfg.n_embd


def flops_per_step(cfg: GPTConfig, batch: int) -> float:
    """Forward and backward FLOPs of one step: 6 per matmul weight per token, plus attention's
    two T×T products (12·L·d·T per token, counted in full although causal, as PaLM's MFU does)."""
    per_token = 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_embd * cfg.block
    return float(per_token * batch * cfg.block)


def counted_flops(model: nn.Module, data: Batch, batch: int, device: torch.device) -> float | None:
    """FLOPs of one forward and backward as ``torch.utils.flop_counter`` counts them (one
    sequence, scaled to the batch), for comparison with :func:`flops_per_step`; None if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = data
    try:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model, (x[:1], y[:1]))
            loss.backward()
    except Exception:  # noqa: BLE001  (an op without a formula must not stop the benchmark)
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops() * batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, size: int, repeats: int = 5, iters: int = 10) -> float:
    """The best bf16 matmul throughput (FLOP/s) of ``size``³ products measured on ``device``."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * iters / best


def compile_blocks(model: nn.Module, settings: Settings, *, through_lt: bool) -> str:
    """Regional compile of every ``Block`` in place (one graph shared by all of them); returns
    how. ltransform's loop uses ``lt.compile``; the others, and ltransform where it has none,
    call ``block.compile()`` by hand with the same options."""
    if not settings.compile:
        return "eager"
    lt_compile = getattr(lt, "compile", None) if through_lt else None
    if lt_compile is not None:
        lt_compile(model, policy={Block}, **settings.compile_options)
        return "lt.compile"
    for block in model.modules():
        if isinstance(block, Block):
            block.compile(**settings.compile_options)
    return "block.compile"


def raw_loop(base: nn.Module, device: torch.device, settings: Settings) -> Loop:
    model = copy.deepcopy(base)
    how = compile_blocks(model, settings, through_lt=False)
    optimizer = settings.optimizer(model.parameters(), device)

    def train(batches: Sequence[Batch]) -> torch.Tensor:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Loop(name="raw", model=model, optimizer=optimizer, train=train, note=how)


def lt_loop(base: nn.Module, device: torch.device, settings: Settings, *, precision: str = "bf16-mixed",
            model: nn.Module | None = None, name: str = "ltransform") -> Loop:
    """``lt.run`` of ``train_step(loss_fn)`` with ``with_precision``, as a user writes it: no
    progress bar, one logger (it sees the loss once, at the end of each call)."""
    model = copy.deepcopy(base) if model is None else model
    how = compile_blocks(model, settings, through_lt=True)
    optimizer = settings.optimizer(model.parameters(), device)
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision(precision))
    state = lt.State(model=model, optimizer=optimizer)
    seen: list[float] = []
    clock = StepClock(device)

    def train(batches: Sequence[Batch]) -> torch.Tensor:
        nonlocal state
        end = state.step + len(batches)
        state = lt.run(step, state, clock.data(batches, end), max_steps=end, progress=False, hooks=[clock.hook],
                       loggers=[lambda metrics, at: seen.append(metrics["loss"])])
        return torch.tensor(seen[-1])

    return Loop(name=name, model=model, optimizer=optimizer, train=train, note=how, clock=clock)


def fabric_loop(base: nn.Module, device: torch.device, settings: Settings) -> Loop:
    """Lightning Fabric's loop: ``Fabric(precision="bf16-mixed")``, ``setup``, ``backward``."""
    if importlib.util.find_spec("lightning") is None:
        raise Skipped("lightning is not installed (pip install lightning)")
    lightning = importable("lightning.fabric", "lightning")
    Fabric = lightning.fabric.Fabric

    model = copy.deepcopy(base)
    how = compile_blocks(model, settings, through_lt=False)
    devices: Any = 1 if device.type != "cuda" or not device.index else [device.index]
    fabric = Fabric(accelerator=device.type, devices=devices, precision="bf16-mixed")
    wrapped, optimizer = fabric.setup(model, settings.optimizer(model.parameters(), device))

    def train(batches: Sequence[Batch]) -> torch.Tensor:
        for batch in batches:
            loss = loss_fn(wrapped, batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return Loop(name="fabric", model=model, optimizer=optimizer, train=train,
                note=f"{how}, lightning {lightning.__version__}")


LOOPS: dict[str, Callable[[nn.Module, torch.device, Settings], Loop]] = {
    "raw": raw_loop, "ltransform": lt_loop, "fabric": fabric_loop}


def resident_bytes(loop: Loop) -> int:
    """Parameters and optimizer state of one loop (what stays allocated between its steps)."""
    tensors: list[torch.Tensor] = list(loop.model.parameters())
    for per_param in loop.optimizer.state.values():
        tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def measure(loops: list[Loop], data: list[Batch], settings: Settings, device: torch.device,
            tokens_per_step: int) -> dict[str, dict[str, Any]]:
    """Warm each loop up (untimed: compiling happens here), then time ``settings.rounds``
    rounds in which every loop runs the same ``settings.steps`` batches, the loops taking
    turns and the first place rotating; the GPU is synchronized around each timed run. A loop
    with a :class:`StepClock` (``lt.run``) is timed from its first step's start to its last
    step's end, as the hand-written loops are; the rest of its call is ``call_overhead_ms``.

    Returns, per loop: tokens/s and step time (medians over rounds), each round's final loss,
    the warm-up time, and on CUDA the step's peak memory above what was allocated before it; a
    loop that raised in its warm-up is left out of the rounds and reported with its error.
    """
    out: dict[str, dict[str, Any]] = {}
    working = []
    for loop in loops:  # the first to run compiles; the others find dynamo's cache
        sync(device)
        start = time.perf_counter()
        try:
            loss = loop.train(data[:settings.warmup])
            sync(device)
        except Exception as error:  # noqa: BLE001  (a loop that cannot compile or step is reported, not fatal)
            out[loop.name] = failure(error)
            continue
        working.append(loop)
        out[loop.name] = {"note": loop.note, "warmup_s": time.perf_counter() - start,
                          "warmup_loss": float(loss), "seconds": [], "losses": [], "step_peak_bytes": 0,
                          "call_overhead_s": []}
    loops = working
    batches = data[:settings.steps]
    for r in range(settings.rounds):
        turn = r % len(loops) if loops else 0
        for loop in loops[turn:] + loops[:turn]:
            record = out[loop.name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync(device)
            start = time.perf_counter()
            loss = loop.train(batches)
            sync(device)
            outside = time.perf_counter() - start
            inside = loop.clock.seconds if loop.clock is not None else None
            record["seconds"].append(outside if inside is None else inside)
            if inside is not None:
                record["call_overhead_s"].append(outside - inside)
            record["losses"].append(float(loss))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - before
                record["step_peak_bytes"] = max(record["step_peak_bytes"], peak)
    for loop in loops:
        record = out[loop.name]
        median = statistics.median(record["seconds"])
        record["step_ms"] = 1e3 * median / settings.steps
        record["tokens_per_s"] = tokens_per_step * settings.steps / median
        record["rounds_tokens_per_s"] = [tokens_per_step * settings.steps / s for s in record.pop("seconds")]
        record["final_loss"] = record["losses"][-1]
        overhead = record.pop("call_overhead_s")
        if overhead:  # lt.run's set-up and tear-down per call, outside the timed steps
            record["call_overhead_ms"] = 1e3 * statistics.median(overhead)
        resident = resident_bytes(loop)
        record["resident_gib"] = resident / 2 ** 30
        step_peak = record.pop("step_peak_bytes")
        record["peak_gib"] = (resident + step_peak) / 2 ** 30 if device.type == "cuda" else None
        record["step_peak_gib"] = step_peak / 2 ** 30 if device.type == "cuda" else None
    return out
