"""Checkpoint benchmarks: save/load time of a ~500 MB state, sharded on 2 ranks vs one full file,
what verifying the checksums costs a load, and the peak memory of loading a full file lazily
(mmap) vs a naive torch.load.

    python tests/benchmarks/checkpoint.py [--params-m 125] [--dir /tmp/ltransform-bench]

Each figure comes from fresh processes (lt.launch), so peak RSS is that of the load alone.
The model is a stack of 2048x2048 float32 linear layers; the state adds SGD without momentum
(no optimizer tensors), so its size is the model's: --params-m 125 is 500 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import ltransform as lt
from ltransform.distributed.env import ensure_process_group

WIDTH = 2048


def build(params_m: int) -> torch.nn.Module:
    layers = max(1, round(params_m * 1e6 / (WIDTH * WIDTH)))
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _state(model: torch.nn.Module) -> lt.State:
    return lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


LOADS = 3  # loads of each kind (verified or not), alternating; the median is reported


@contextlib.contextmanager
def _unverified() -> Iterator[None]:
    """lt.load without its checksum checks (for this comparison only: lt.load always checks)."""
    from ltransform import io
    from ltransform.checkpoint import sharded

    saved = io.verify_checksums, sharded.verify_files
    io.verify_checksums, sharded.verify_files = (lambda *args: None), (lambda path: True)
    try:
        yield
    finally:
        io.verify_checksums, sharded.verify_files = saved


def save_and_load(kind: str, params_m: int, directory: str) -> dict[str, float]:
    """On each rank: build (sharded on 2 ranks for 'sharded'), save, then load back, with and
    without verifying checksums (alternating, the page cache warm after the first); seconds."""
    ensure_process_group()
    torch.manual_seed(0)
    model = build(params_m)
    if kind == "sharded":
        model = lt.shard(model, policy={torch.nn.Linear})
    state = _state(model)
    path = Path(directory) / ("sharded" if kind == "sharded" else "full.pt")
    lt.barrier()
    t0 = time.perf_counter()
    lt.save(path, state, sharded=kind == "sharded")
    lt.barrier()
    t1 = time.perf_counter()
    lt.load(path, state)  # (the first load reads the file from disk into the page cache)
    lt.barrier()
    t2 = time.perf_counter()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(LOADS):
        for verify in (False, True):
            with contextlib.nullcontext() if verify else _unverified():
                start = time.perf_counter()
                lt.load(path, state)
                lt.barrier()
                times[verify].append(time.perf_counter() - start)
    return {"save_s": t1 - t0, "load_s": t2 - t1, "verified_s": statistics.median(times[True]),
            "unverified_s": statistics.median(times[False]), "checks_s": _checks_alone(path)}


def _checks_alone(path: Path) -> float:
    """Seconds of the checksum checks alone (median of LOADS): a file's tensors, or this rank's
    share of a sharded checkpoint's files; steadier than the difference of two loads."""
    from ltransform import io
    from ltransform.checkpoint import sharded
    from ltransform.checkpoint.read import CHECKSUMS

    seconds = []
    for _ in range(LOADS):
        lt.barrier()
        start = time.perf_counter()
        if path.is_dir():
            sharded.verify_files(path)
        else:
            payload = io.read_file(path)
            io.verify_checksums({k: v for k, v in payload.items() if k != CHECKSUMS}, payload[CHECKSUMS], path)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def load_memory(how: str, params_m: int, path: str) -> dict[str, float]:
    """Peak memory growth while loading the full file into an already allocated model:
    anonymous memory (what the process really holds) and all resident pages (which also
    counts the file's pages mapped by mmap: page cache the kernel can drop at any time)."""
    import threading

    model = lt.materialize(lt.init_module(build, params_m, empty=True))  # allocated before measuring
    anon0, rss0 = _status_mb("RssAnon"), _status_mb("VmRSS")
    peak = {"anon": anon0, "rss": rss0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_mb("RssAnon"))
            peak["rss"] = max(peak["rss"], _status_mb("VmRSS"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    if how == "lazy":
        lt.load(path, _state(model))
    else:  # what plain PyTorch code does: read everything, then copy into the model
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["models"]["model"])
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"anon_mb": peak["anon"] - anon0, "rss_mb": peak["rss"] - rss0, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params-m", type=int, default=125, help="millions of float32 parameters")
    p.add_argument("--dir", default="/tmp/ltransform-checkpoint-bench")
    args = p.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    Path(args.dir).mkdir(parents=True)
    size_mb = round(args.params_m * 1e6 / (WIDTH * WIDTH)) * WIDTH * WIDTH * 4 / 2**20
    print(f"state of {size_mb:.0f} MB ({args.params_m}M float32 parameters)")
    full = lt.launch(save_and_load, "full", args.params_m, args.dir, devices=2)
    sharded = lt.launch(save_and_load, "sharded", args.params_m, args.dir, devices=2)
    print(f"  full file (gathered to rank 0, one writer): save {full['save_s']:.2f} s, load {full['load_s']:.2f} s")
    print(f"  sharded on 2 ranks (DCP, each writes its half): save {sharded['save_s']:.2f} s, "
          f"load {sharded['load_s']:.2f} s   (save {full['save_s'] / sharded['save_s']:.2f}x faster, "
          f"load {full['load_s'] / sharded['load_s']:.2f}x)")
    from ltransform import io

    print(f"  checksum verification on load (median of {LOADS}, page cache warm; CRC-32 of "
          f"{io.crc32().__module__ or 'zlib'}):")
    for name, r in (("full file", full), ("sharded on 2 ranks", sharded)):
        cost = r["verified_s"] - r["unverified_s"]
        print(f"    {name:20s} verified {r['verified_s']:.3f} s, unverified {r['unverified_s']:.3f} s "
              f"({cost:+.3f} s); the checks alone {r['checks_s']:.3f} s = "
              f"{100 * r['checks_s'] / r['unverified_s']:.1f}% of the unverified load")
    path = str(Path(args.dir) / "full.pt")
    lazy = lt.launch(load_memory, "lazy", args.params_m, path, devices=1)
    naive = lt.launch(load_memory, "naive", args.params_m, path, devices=1)
    print("  load the full file into an allocated model, peak growth (anonymous / all resident incl. mapped file):")
    for name, r in (("lt.load (mmap)", lazy), ("naive torch.load + load_state_dict", naive)):
        print(f"    {name:36s} {r['anon_mb']:5.0f} MB / {r['rss_mb']:5.0f} MB in {r['seconds']:.2f} s")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
