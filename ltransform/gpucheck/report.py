"""The results: ``gpu-check.json`` (everything) and ``gpu-check.md`` (a summary to read), rewritten
after every job, so a run cut short still leaves what it found."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

JSON_NAME, MARKDOWN_NAME = "gpu-check.json", "gpu-check.md"
STATUSES = ("pass", "fail", "skip")
BENCHMARK = "benchmark"


class Report:
    """The run's record: its arguments, the environment, each check's result, the benchmark's."""

    def __init__(self, out_dir: Path, *, mode: str, device: str, args: dict[str, Any], order: list[str]) -> None:
        self.out_dir, self.order = out_dir, order
        self.data: dict[str, Any] = {
            "format": "ltransform-gpucheck", "version": 1, "started": _now(), "finished": None,
            "mode": mode, "device": device, "args": args, "environment": {}, "summary": {},
            "checks": [], "benchmark": None}

    def add(self, result: dict[str, Any]) -> None:
        if result["name"] == BENCHMARK:
            self.data["benchmark"] = result
        else:
            self.data["checks"] = sorted([*self.data["checks"], result], key=lambda r: self._rank(r["name"]))
        self.write()

    def _rank(self, name: str) -> int:
        return self.order.index(name) if name in self.order else len(self.order)

    def failed(self) -> bool:
        bench = self.data["benchmark"]
        return any(r["status"] == "fail" for r in self.data["checks"]) or bool(bench and bench["status"] == "fail")

    def finish(self, duration_s: float) -> None:
        self.data.update(finished=_now(), duration_s=round(duration_s, 2))
        self.write()

    def write(self) -> None:
        counts = {s: sum(1 for r in self.data["checks"] if r["status"] == s) for s in STATUSES}
        self.data["summary"] = {**counts, "benchmark": (self.data["benchmark"] or {}).get("status")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic(self.out_dir / JSON_NAME, json.dumps(self.data, indent=2, default=str) + "\n")
        _atomic(self.out_dir / MARKDOWN_NAME, markdown(self.data))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _numbers(numbers: dict[str, Any] | None, limit: int = 400) -> str:
    """The measured numbers on one line (lists shortened, None left out), for the table."""
    parts = []
    for key, value in (numbers or {}).items():
        if value is None:
            continue
        if isinstance(value, list) and len(value) > 4:
            value = f"[{value[0]}, ..., {value[-1]}] ({len(value)})"
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[:limit] + " ..."


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(data: dict[str, Any]) -> str:
    env, summary = data["environment"], data["summary"]
    lines = [f"# ltransform GPU check ({data['mode']}, {data['device']})", "",
             f"Started {data['started']}, finished {data['finished'] or '(running)'}"
             + (f" in {data['duration_s']} s" if data.get("duration_s") is not None else "") + ".", "",
             f"**{summary.get('pass', 0)} passed, {summary.get('fail', 0)} failed, {summary.get('skip', 0)} skipped**;"
             f" benchmark: {summary.get('benchmark') or 'not run'}.", "", "## Environment", "",
             "| | |", "|---|---|"]
    for key in ("gpu", "capability", "gpu_memory_bytes", "driver", "torch", "cuda_runtime", "cudnn", "nccl", "python",
                "platform", "cuda_error"):
        if env.get(key) is not None:
            lines.append(f"| {key} | {_cell(env[key])} |")
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    missing = ", ".join(k for k, v in (env.get("packages") or {}).items() if not v)
    lines += [f"| packages | {_cell(packages)} |", f"| not installed | {_cell(missing)} |", "", "## Checks", "",
              "| check | status | seconds | peak GiB | numbers / reason |", "|---|---|---|---|---|"]
    for r in data["checks"]:
        detail = r.get("reason") if r["status"] != "pass" else _numbers(r.get("numbers"))
        peak = r.get("peak_memory_bytes")
        peak_text = "" if peak is None else f"{peak / 2**30:.2f}"
        lines.append(f"| {r['name']} | {r['status'].upper()} | {r.get('duration_s', '')} | {peak_text} | "
                     f"{_cell(detail)} |")
    failures = [r for r in data["checks"] if r["status"] == "fail"]
    bench = data.get("benchmark")
    if bench and bench["status"] == "fail":
        failures.append(bench)
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines += [f"### {r['name']}", "", _cell(r.get("reason", "")), "", "```",
                      (r.get("traceback") or r.get("log_tail") or "").rstrip(), "```", ""]
    if bench and isinstance(bench.get("results"), dict):  # finished, failed in a part, or cut short
        if bench["status"] != "pass" or bench.get("cut_short"):
            lines += ["", f"Benchmark: **{bench['status']}**: {_cell(bench.get('reason', ''))}"]
        lines += ["", _benchmark_markdown(bench["results"])]  # its own "## GPU benchmark" section
    else:
        lines += ["", "## Benchmark", "", f"{bench['status']}: {bench.get('reason', '')}" if bench
                  else "Not run (`--no-bench`, or the budget ran out)."]
    lines += ["", f"Everything measured is in `{JSON_NAME}`; the worker's output is in `worker.log`.", ""]
    return "\n".join(lines)


def _benchmark_markdown(results: Any) -> str:
    """The benchmark's own tables (``bench_markdown.to_markdown``) if it has them, else its JSON."""
    try:
        from ltransform.gpucheck.bench_markdown import to_markdown

        return to_markdown(results)
    except Exception as error:  # noqa: BLE001  (its tables failing must not lose the results)
        dumped = json.dumps(results, indent=2, default=str)[:20000]
        return (f"## Benchmark\n\n(its tables could not be made: {type(error).__name__}: {error})\n\n"
                f"```json\n{dumped}\n```")
