"""fp8 and 4-bit on a GPU: loss against bf16 and step time of a GPT-sized MLP block.

    python tests/benchmarks/lowbit.py [--width 4096] [--steps 50]      # on an fp8 GPU (H100/H200)
    python tests/benchmarks/lowbit.py --width 64 --steps 5             # smoke run on the CPU

For each precision the same block (LayerNorm → Linear(d, 4d) → GELU → Linear(4d, d), plus a
residual) trains on the same batches from the same weights; the script prints the loss after
the first and last step, the largest loss difference to bf16-mixed over the run, and the
median step time (steps timed after a warm-up, with a device sync). Precisions whose library
is missing (or that need an fp8 GPU) are reported as skipped with the reason. Then
bitsandbytes: nf4 forward error against bf16, and the step time of a QLoRA step (frozen nf4
block plus rank-16 adapters) against a bf16 step with the same adapters.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import ltransform as lt


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x).float(), y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(precision: str, base: torch.nn.Module, data, device) -> tuple[list[float], float]:
    model = copy.deepcopy(base).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision(precision))
    state = lt.State(model=model, optimizer=optimizer)
    losses, times = [], []
    for batch in data:
        sync(device)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    warm = len(times) // 5
    return [float(x) for x in losses], statistics.median(times[warm:])


def precisions(device, data, width):
    torch.manual_seed(0)
    base = Block(width)
    results = {}
    for precision in ("bf16-mixed", "torchao-float8", "transformer-engine"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[precision] = run(precision, base, data, device)
        except (ImportError, RuntimeError) as error:
            results[precision] = str(error).splitlines()[0][:160]
    reference, ref_time = results["bf16-mixed"]
    for precision, result in results.items():
        if isinstance(result, str):
            print(f"{precision:>20}: skipped ({result})")
            continue
        losses, seconds = result
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference))
        print(f"{precision:>20}: loss {losses[0]:.5f} -> {losses[-1]:.5f}, max relative loss difference to "
              f"bf16-mixed {diff:.4f}, step {seconds * 1e3:.2f} ms ({seconds / ref_time:.3f}x bf16-mixed)")


def qlora(device, data, width):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes: skipped (not installed)")
        return
    torch.manual_seed(0)
    base = Block(width).to(device)
    x = data[0][0]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        expected = base(x).float()
        nf4 = lt.quantize(copy.deepcopy(base), "nf4", compute_dtype=torch.bfloat16)
        error = ((nf4(x).float() - expected).norm() / expected.norm()).item()
    print(f"{'nf4 forward':>20}: relative error {error:.4f} against the bf16 block")
    times = {}
    for name, model in (("bf16 + adapters", copy.deepcopy(base)), ("nf4 + adapters", nf4)):
        model = lt.add_adapters(model, rank=16)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed"))
        state, spent = lt.State(model=model, optimizer=optimizer), []
        for batch in data:
            sync(device)
            start = time.perf_counter()
            state, _ = step(state, batch)
            sync(device)
            spent.append(time.perf_counter() - start)
        times[name] = statistics.median(spent[len(spent) // 5:])
    print(f"{'QLoRA step':>20}: nf4 {times['nf4 + adapters'] * 1e3:.2f} ms against bf16 "
          f"{times['bf16 + adapters'] * 1e3:.2f} ms ({times['nf4 + adapters'] / times['bf16 + adapters']:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192, help="rows per batch (batch x sequence)")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, block width {args.width}, {args.tokens} rows per batch")
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.tokens, args.width, generator=gen).to(device),
             torch.randn(args.tokens, args.width, generator=gen).to(device)) for _ in range(args.steps)]
    precisions(device, data, args.width)
    qlora(device, data, args.width)


if __name__ == "__main__":
    main()
