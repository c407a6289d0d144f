"""Train a small character-level GPT on the Python standard library's own sources.

    python -m ltransform.examples.gpt [--precision bf16-mixed] [--accumulate 2] [--clip 1.0] [--compile]
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python -m ltransform.examples.gpt --strategy xla  # (torch_xla)

Every machine with Python has the corpus: the ``.py`` files of the standard library. The
run shows a progress bar, prints the falling loss, writes CSV (and TensorBoard, if
installed) logs to a run directory, and ends with a generated sample.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import ltransform as lt


@attrs.frozen(kw_only=True)
class GPTConfig:
    vocab: int = 256  # bytes
    block: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128


# GPT-2's sizes (the vocabulary padded to a multiple of 64, as nanoGPT does), for
# ``lt.estimate_memory`` / ``ltransform estimate`` and benchmarks
PRESETS: dict[str, GPTConfig] = {
    "gpt-124m": GPTConfig(vocab=50304, block=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt-350m": GPTConfig(vocab=50304, block=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt-774m": GPTConfig(vocab=50304, block=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt-1.5b": GPTConfig(vocab=50304, block=1024, n_layer=48, n_head=25, n_embd=1600),
}


def preset(name: str) -> GPTConfig:
    """The :class:`GPTConfig` of a named size: ``"gpt-124m"``, ``"gpt-350m"``, ``"gpt-774m"``, ``"gpt-1.5b"``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.

    Example:
        >>> preset("gpt-124m").n_layer
        12
    """
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; expected one of: {', '.join(map(repr, PRESETS))}")
    return PRESETS[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # qkv's features are grouped per head ([q k v] of head 0, then of head 1, ...) and the head count is
        # read from its output, not self.heads: split column-wise (lt.parallelize, lt.plans.gpt), each rank's
        # part is whole heads, and the same code runs on them
        q, k, v = rearrange(self.qkv(x), "b t (h three d) -> three b h t d", three=3, d=self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        hidden = 4 * cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.GELU(), nn.Linear(hidden, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block, cfg.n_embd)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(rearrange(logits, "b t v -> (b t) v").float(), rearrange(y, "b t -> (b t)"))


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The standard library's ``.py`` files, in sorted order, as a tensor of bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()


class Windows:
    """``batches`` random (input, target) windows per pass; a new draw each pass, seeded."""

    def __init__(self, data: torch.Tensor, block: int, batch: int, batches: int, seed: int) -> None:
        self.data, self.block, self.batch, self.batches, self.seed = data, block, batch, batches, seed
        self._passes = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed + self._passes)
        self._passes += 1
        for _ in range(self.batches):
            starts = torch.randint(len(self.data) - self.block - 1, (self.batch,), generator=gen)
            window = torch.stack([self.data[s:s + self.block + 1] for s in starts.tolist()])
            yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def generate(model: GPT, prompt: str, chars: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Sample ``chars`` bytes after ``prompt``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long, device=next(model.parameters()).device)
    for _ in range(chars):
        logits = model(idx[:, -model.cfg.block:])[:, -1].float() / temperature
        full = getattr(logits, "full_tensor", None)  # (--loss-parallel: logits split over the vocabulary)
        logits = full() if callable(full) else logits
        probs = F.softmax(logits, dim=-1).cpu()  # sampled on the CPU: one generator everywhere
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen).to(idx.device)], dim=1)
    model.train(was_training)
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default = GPTConfig()
    p = argparse.ArgumentParser(description="Train a character-level GPT on Python's own sources.")
    p.add_argument("--max-steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--precision", default="32-true",
                   help="e.g. 32-true, bf16-mixed, 16-mixed, bf16-true, torchao-float8")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch size")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-layer", type=int, default=default.n_layer)
    p.add_argument("--n-embd", type=int, default=default.n_embd)
    p.add_argument("--block", type=int, default=default.block)
    p.add_argument("--corpus-mb", type=float, default=4.0, help="MB of standard-library source to read")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--sample-chars", type=int, default=300)
    p.add_argument("--run-dir", default=None, help="default: runs/gpt-<time>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="compile each block (lt.compile: regional torch.compile)")
    p.add_argument("--devices", type=int, default=1, help="processes to train on (lt.launch)")
    p.add_argument("--strategy", default="auto",
                   help="auto, ddp, fsdp or hsdp (with --devices > 1); xla (torch_xla's SPMD over every XLA "
                        "device of this host, e.g. PJRT_DEVICE=TPU, or PJRT_DEVICE=CPU CPU_NUM_DEVICES=4); "
                        "xla-fsdp (the same with the blocks sharded: FSDPv2)")
    p.add_argument("--tp", type=_positive, default=1,
                   help="tensor-parallel size (lt.parallelize with lt.plans.gpt): a 2-D mesh of devices/tp "
                        "data-parallel groups of tp ranks; with more than one group, --strategy fsdp shards over them")
    p.add_argument("--loss-parallel", action="store_true",
                   help="with --tp: split the output projection too, the loss computed on logits split over the "
                        "vocabulary (lt.plans.gpt(model, loss_parallel=True)); pays for a large vocabulary")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def check_tensor_parallel(args: argparse.Namespace) -> None:
    """``--tp`` needs several processes, a size dividing them, and a strategy that composes with it
    (a clear one-line error here, rather than deep inside the first step)."""
    if args.tp == 1:
        if args.loss_parallel:
            raise SystemExit("gpt: --loss-parallel splits the output projection over the tensor-parallel ranks; "
                             "give --tp too")
        return
    devices = int(os.environ.get("WORLD_SIZE", args.devices))  # (under torchrun, --devices is not given)
    if args.tp < 1 or devices == 1 or devices % args.tp:
        raise SystemExit(f"gpt: --tp {args.tp} needs several processes, a multiple of it (e.g. --devices "
                         f"{2 * max(args.tp, 1)} --tp {max(args.tp, 1)}); got {devices} process(es)")
    if args.strategy not in ("auto", "fsdp"):
        raise SystemExit(f"gpt: --tp composes with --strategy fsdp (FSDP over the data-parallel groups) or auto "
                         f"(tensor parallel alone, --tp equal to --devices), not {args.strategy!r}")
    if devices > args.tp and args.strategy != "fsdp":
        raise SystemExit(f"gpt: --tp {args.tp} on {devices} processes leaves {devices // args.tp} data-parallel "
                         f"groups, which need --strategy fsdp to share their gradients")


def main(argv: list[str] | None = None) -> lt.State | None:
    """Train on one process, or on ``--devices`` processes started by ``lt.launch``."""
    args = parse_args(argv)
    check_tensor_parallel(args)
    if args.strategy.startswith("xla"):
        lt.use_accelerator("xla")  # one process drives every device of the host: no lt.launch
        return train(args)
    if args.devices > 1:
        lt.launch(train, args, devices=args.devices)  # under torchrun it just calls train
        return None
    return train(args)


def train(args: argparse.Namespace) -> lt.State | None:
    """The training script itself: the same on one process or many."""
    lt.seed_everything(args.seed)  # the same initial weights on every rank
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    say = print if lt.rank() == 0 else (lambda *a, **k: None)
    run_dir = Path(args.run_dir or f"runs/gpt-{time.strftime('%Y%m%d-%H%M%S')}")
    corpus = load_corpus(int(args.corpus_mb * 1e6))
    split = int(0.95 * len(corpus))
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, block=args.block)

    model = lt.init_module(GPT, cfg, precision=args.precision)
    if args.tp > 1:  # tensor parallel first: a ("dp", "tp") mesh, the blocks' layers split over "tp"
        model = lt.parallelize(model, functools.partial(lt.plans.gpt, loss_parallel=args.loss_parallel),
                               mesh=args.tp)
    if lt.PRECISIONS.get(args.precision) is not None and lt.PRECISIONS[args.precision].fp8:
        model = lt.to_precision(model, args.precision)  # fp8 layers go in before sharding
    if args.compile:  # after the fp8 swap, before sharding: the one order of model transforms
        model = lt.compile(model, policy={Block})
    if args.strategy in ("fsdp", "hsdp", "xla-fsdp"):  # FSDP2 takes its mixed-precision policy when sharding
        # (on a tensor-parallel model, over the mesh's "dp" dimension)
        model = lt.shard(model, policy={Block}, mesh=(lt.world_size(), 1) if args.strategy == "hsdp" else None,
                         precision=args.precision)
    strategy = "xla" if args.strategy == "xla-fsdp" else args.strategy
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(30, args.max_steps))
    state = lt.State(model=model, optimizer=optimizer, scheduler=scheduler)

    transforms = [lt.with_precision(args.precision), lt.accumulate(args.accumulate), lt.distribute(strategy)]
    if args.clip > 0:
        transforms.append(lt.clip_gradients(max_norm=args.clip))
    step = lt.pipe(lt.train_step(loss_fn), *transforms)
    eval_step = lt.pipe(lt.eval_step(loss_fn), lt.with_precision(args.precision), lt.distribute(strategy))

    n_params = sum(p.numel() for p in model.parameters())
    say(f"ltransform GPT: {n_params / 1e6:.2f}M parameters, {len(corpus) / 1e6:.1f} MB of Python "
          f"standard library source, precision {args.precision}, accumulate {args.accumulate}, "
          f"clip {args.clip or 'off'}, {'compiled, ' if args.compile else ''}{lt.world_size()} "
          f"{'XLA device' if lt.accelerator() == 'xla' else 'process'}"
          f"(s), strategy {args.strategy}{f', tensor parallel {args.tp}' if args.tp > 1 else ''}; "
          f"logs in {run_dir}/")
    loggers: list[Callable[[Mapping[str, float], int], Any]] = [lt.CSVLogger(run_dir), _print_loss]
    try:
        loggers.append(lt.TensorBoardLogger(run_dir))
    except ImportError:
        pass
    batches = args.max_steps * args.accumulate
    # each data-parallel rank draws its own windows (a different seed), so together they see world / tp × batch;
    # the tp ranks of one group (consecutive ranks: parallelize's mesh is (dp, tp)) must see the same
    seed = args.seed + 1000 * (lt.rank() // args.tp)
    data = Windows(corpus[:split], cfg.block, args.batch, batches=batches, seed=seed)
    val = list(Windows(corpus[split:], cfg.block, args.batch, batches=4, seed=seed + 1))
    started = time.perf_counter()
    state = lt.run(step, state, data, max_steps=args.max_steps, log_every=args.log_every, loggers=loggers,
                   eval_step=eval_step, eval_data=val, eval_every=args.eval_every,
                   progress=not args.no_progress)
    for logger in loggers:
        close = getattr(logger, "close", None)
        if callable(close):
            close()
    say(f"trained {state.step} steps in {time.perf_counter() - started:.0f} s")
    rule = "-" * 60
    sampler = model
    if lt.accelerator() == "xla":  # each new length would compile a new XLA program: sample on the CPU
        sampler = GPT(cfg)
        sampler.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    sample = generate(sampler, "def ", args.sample_chars, seed=args.seed)  # every rank: FSDP gathers
    say(f"sample:\n{rule}\n{sample}\n{rule}")
    return state if lt.world_size() == 1 or lt.accelerator() == "xla" else None


def _print_loss(metrics: Mapping[str, float], step: int) -> None:
    from tqdm.auto import tqdm

    shown = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("loss", "val_loss"))
    if shown:
        tqdm.write(f"step {step:5d}  {shown}")


if __name__ == "__main__":
    main()
