"""``python -m ltransform.gpucheck``: run the GPU checks (or their CPU smoke run) and the benchmark."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

from ltransform.gpucheck import report as report_module
from ltransform.gpucheck.runner import Supervisor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltransform.gpucheck",
        description="Check ltransform's CUDA paths against hand-written PyTorch, then run the GPU benchmark; "
                    "write gpu-check.json and gpu-check.md. Exit code 1 if a check failed or a part of the "
                    "benchmark did; a benchmark cut short at the end of the budget keeps the parts that "
                    "finished and does not fail the run by itself.")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU smoke run; forced without a GPU)")
    parser.add_argument("--device", default=None, help="'cuda' or 'cpu' (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="output directory")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--checks", default=None, help="comma-separated names of the checks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    return parser


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the supervisor, which stops its worker


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = _parser().parse_args(argv)
    import torch

    from ltransform.gpucheck import environment

    try:
        from ltransform.gpucheck import checks
    except Exception:  # noqa: BLE001  (ltransform itself does not import here: say so in the report)
        return _import_failed(args, traceback.format_exc(), start)
    if args.list:
        for check in checks.CHECKS:
            print(f"{check.name:24} {(check.fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    names = [c.name for c in checks.CHECKS]
    chosen = names if args.checks is None else [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in checks.BY_NAME]
    if unknown:
        print(f"unknown check(s) {', '.join(unknown)}; expected some of: {', '.join(names)}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda", "cuda:0"):  # ltransform trains on cuda:<local rank>, 0 in one process
        print(f"--device {device}: use 'cuda' or 'cpu' (for another GPU: CUDA_VISIBLE_DEVICES=N)", file=sys.stderr)
        return 2
    smoke = args.smoke or not device.startswith("cuda")
    if not args.smoke and smoke:
        print("no CUDA device: running the CPU smoke mode (--smoke)")
    mode = "smoke" if smoke else "full"
    report = report_module.Report(args.out, mode=mode, device=device, order=[*names, report_module.BENCHMARK],
                                  args={k: str(v) for k, v in vars(args).items()})
    report.data["environment"] = environment.collect(device)
    report.write()
    env = report.data["environment"]
    print(f"ltransform GPU check ({mode}) on {env.get('gpu') or device}, torch {env['torch']}, "
          f"budget {args.budget:.0f} s -> {args.out}/", flush=True)

    def on_result(result: dict) -> None:
        report.add(result)
        said = result["status"] != "pass" or result.get("cut_short")
        reason = f": {str(result.get('reason', ''))[:200]}" if said else ""
        print(f"[{time.monotonic() - start:6.1f}s] {result['name']:24} {result['status'].upper():4} "
              f"({result.get('duration_s', 0)} s){reason}", flush=True)

    deadline = start + args.budget
    supervisor = Supervisor(device=device, size=mode, out_dir=args.out, deadline=deadline, on_result=on_result)
    jobs = {name: checks.BY_NAME[name].timeout_s for name in chosen}
    if not args.no_bench:  # in the checks' worker (no second start-up); its limit: the budget's end, which it
        jobs[report_module.BENCHMARK] = float("inf")  # is told, and a kill there keeps the parts that finished
    supervisor.run(jobs)
    report.finish(time.monotonic() - start)
    summary = report.data["summary"]
    print(f"{summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped; benchmark: "
          f"{summary['benchmark'] or 'not run'}; see {args.out / report_module.MARKDOWN_NAME}", flush=True)
    return 1 if report.failed() else 0


def _import_failed(args: argparse.Namespace, error: str, start: float) -> int:
    import torch

    from ltransform.gpucheck import environment

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = report_module.Report(args.out, mode="smoke" if args.smoke else "full", device=device, order=[],
                                  args={k: str(v) for k, v in vars(args).items()})
    report.data["environment"] = environment.collect(device)
    report.add({"name": "import", "status": "fail", "duration_s": 0.0, "traceback": error,
                "reason": "the checks do not import: " + error.strip().splitlines()[-1]})
    report.finish(time.monotonic() - start)
    print(error, file=sys.stderr)
    return 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
