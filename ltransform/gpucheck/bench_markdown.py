"""Markdown tables of :func:`ltransform.gpucheck.bench.run_benchmark`'s result."""

from __future__ import annotations

from typing import Any

_PACKAGES = ("lightning", "torchao", "bitsandbytes", "transformer_engine", "triton")


def to_markdown(result: dict[str, Any]) -> str:
    """The benchmark's result as Markdown: a header, one table per model, the fp8 and QLoRA
    tables and the targets."""
    result = settle(result)
    dev, s = result["device"], result["settings"]
    versions = ", ".join([f"torch {dev['torch']}", *(f"{name} {dev.get(name) or '-'}" for name in _PACKAGES)])
    lines = [f"## GPU benchmark ({result['mode']}): {dev['name']}",
             "",
             f"{versions}; measured {s['peak_matmul']} matmul peak **{result['peak_tflops']:.4g} TFLOP/s**; "
             f"{s['warmup_steps']} warm-up steps (excluded), then {s['rounds']} interleaved rounds x "
             f"{s['steps_per_round']} steps per loop (medians); compile: "
             f"{_options(s['compile_options']) if s['compile'] else 'off'}; {result['elapsed_s']:.0f} s in all.", ""]
    if result.get("cut_short"):
        lines += [f"**Cut short: {result['cut_short']}**; the parts that finished are below.", ""]
    for model in result["models"]:
        lines += _model(model)
    lines += _fp8(result["fp8"]) + _qlora(result["qlora"]) + _targets(result)
    return "\n".join(lines) + "\n"


def settle(result: dict[str, Any]) -> dict[str, Any]:
    """A result cut short (``result["cut_short"]``: why) or in progress, its parts that did not
    run marked as skipped with the reason: the one running when it stopped, those not started."""
    why = result.get("cut_short")

    def one(part: dict[str, Any]) -> dict[str, Any]:
        if "running" in part:
            rest = {k: v for k, v in part.items() if k != "running"}
            return {**rest, "skipped": f"cut short ({why})" if why else f"running ({part['running']})"}
        if "pending" in part:
            rest = {k: v for k, v in part.items() if k != "pending"}
            return {**rest, "skipped": f"not started ({why})" if why else "not started yet"}
        return part

    return {**result, "models": [one(m) for m in result["models"]], "fp8": one(result["fp8"]),
            "qlora": one(result["qlora"])}


def _model(m: dict[str, Any]) -> list[str]:
    if "variants" not in m:
        return [f"### {m['name']}", "", _not_run(m), ""]
    counted = f", FlopCounterMode {m['flops_counted'] / 1e12:.4g}" if m.get("flops_counted") else ""
    out = [f"### {m['name']}: {m['params'] / 1e6:.1f}M parameters, {m['layers']} layers x {m['width']} wide, "
           f"{m['heads']} heads, batch {m['batch']} x {m['seq']} tokens, "
           f"{m['flops_per_step'] / 1e12:.4g} TFLOP/step (6N + attention{counted})", "",
           "| loop | tokens/s | step ms | TFLOP/s | MFU | peak GiB | warm-up s | final loss | how |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in m["variants"].items():
        if "tokens_per_s" not in v:
            out.append(f"| {name} | {_not_run(v)} |||||||")
            continue
        how = v["note"] + (f"; lt.run set-up + tear-down {v['call_overhead_ms']:.1f} ms per call, not timed"
                           if v.get("call_overhead_ms") is not None else "")
        out.append(f"| {name} | {v['tokens_per_s']:,.0f} | {v['step_ms']:.2f} | {v['tflops']:.4g} | "
                   f"{100 * v['mfu']:.1f}% | {_num(v['peak_gib'], '.2f')} | {v['warmup_s']:.1f} | "
                   f"{v['final_loss']:.4f} | {how} |")
    r = m["ratios"]
    agree = ", ".join(f"{k} {d:.1e}" for k, d in m["loss_rel_diff"].items()) or "-"
    out += ["", f"ltransform / raw **{_num(r['lt_over_raw'], '.3f')}**, ltransform / Fabric "
            f"**{_num(r['lt_over_fabric'], '.3f')}**, Fabric / raw {_num(r['fabric_over_raw'], '.3f')}; "
            f"largest relative loss difference to raw over all steps: {agree}", ""]
    return out


def _fp8(block: dict[str, Any]) -> list[str]:
    if "rows" not in block:
        return ["### fp8", "", _not_run(block), ""]
    out = [f"### fp8: {block['model']}, {block['steps']} steps each", "",
           "| precision | tokens/s | step ms | vs bf16 | final loss | loss diff vs bf16 | how |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for name, v in block["rows"].items():
        if "tokens_per_s" not in v:
            out.append(f"| {name} | {_not_run(v)} ||||||")
            continue
        out.append(f"| {name} | {v['tokens_per_s']:,.0f} | {v['step_ms']:.2f} | "
                   f"{_num(v.get('speedup_vs_bf16'), '.3f')}x | {v['final_loss']:.4f} | "
                   f"{_num(v.get('loss_rel_diff_vs_bf16'), '.2%')} | {v['note']} |")
    return out + [""]


def _qlora(block: dict[str, Any]) -> list[str]:
    if "rows" not in block:
        return ["### nf4 QLoRA", "", _not_run(block), ""]
    out = [f"### nf4 QLoRA: {block['model']}, eager, bf16-mixed", "",
           "| step | step ms | tokens/s | peak GiB | trainable params | final loss |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, v in block["rows"].items():
        out.append(f"| {name} | {v['step_ms']:.2f} | {v['tokens_per_s']:,.0f} | {_num(v['peak_gib'], '.2f')} | "
                   f"{v['trainable_params'] / 1e6:.2f}M | {v['final_loss']:.4f} |")
    last = list(block["rows"].values())[-1]
    memory = f", memory {last['memory_vs_full']:.2f}x" if "memory_vs_full" in last else ""
    return out + ["", f"QLoRA against the full finetune: step time {last['time_vs_full']:.2f}x{memory}", ""]


def _targets(result: dict[str, Any]) -> list[str]:
    note = "" if result["targets_apply"] else " (not binding: smoke run or no GPU)"
    out = [f"### Targets{note}", "", "| target | value | goal | met |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        out.append(f"| {t['what']} | {_num(t['value'], '.3f')} | >= {t['target']} | {met} |")
    return out


def _not_run(part: dict[str, Any]) -> str:
    if "skipped" in part:
        return f"skipped: {part['skipped']}"
    return f"error: {part.get('error', 'no result')}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _options(options: dict[str, Any]) -> str:
    return "regional, " + ", ".join(f"{k}={v!r}" for k, v in options.items()) if options else "regional"
