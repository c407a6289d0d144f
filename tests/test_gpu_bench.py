"""The GPU benchmark's code, run small on the CPU (``run_benchmark(smoke=True)``): every part
present with figures or a reason, the ratios and targets computed, the three loops training
alike, the FLOP formula against torch's counter, and the Markdown."""

from __future__ import annotations

import copy
import json
import time

import attrs
import pytest
import torch

from ltransform.examples.gpt import GPT
from ltransform.gpucheck.bench import SMOKE, run_benchmark, to_markdown
from ltransform.gpucheck.bench_models import (SMOKE_PRESETS, Loop, build, flops_per_step, make_data, matmul_params,
                                              measure, raw_loop)

LOOPS = ("raw", "ltransform", "fabric")
# The three loops run the same ops in the same order on the same data from the same weights (Fabric
# casts the bf16 logits to fp32 inside its wrapper, the loss function does the same cast itself), so
# on the CPU their losses agree to the last bit (measured: 0.0). 1e-6, a few float32 ulps of a loss
# near 5, leaves room for a different reduction order only: on this model a loop without bf16
# autocast differs by 7e-6 to 4e-5 after 1 to 4 steps, and a step more or less by ~2e-2.
LOSS_TOLERANCE = 1e-6


PROGRESS = []  # (running, the result so far) as run_benchmark reports them


@pytest.fixture(scope="module")
def result():
    return run_benchmark(smoke=True, progress=lambda so_far, running: PROGRESS.append((running, so_far)))


def _errors(part, path="result"):
    if isinstance(part, dict):
        if "error" in part:
            yield f"{path}: {part['error']}\n{part.get('traceback', '')}"
        for key, value in part.items():
            yield from _errors(value, f"{path}.{key}")
    elif isinstance(part, list):
        for i, value in enumerate(part):
            yield from _errors(value, f"{path}[{i}]")


def test_smoke_runs_every_part_without_errors(result):
    assert list(_errors(result)) == []
    assert result["mode"] == "smoke" and result["device"]["type"] == "cpu"
    assert result["peak_tflops"] > 0
    assert [m["name"] for m in result["models"]] == [p.name for p in SMOKE_PRESETS]
    json.dumps(result)  # what gpu-check.json holds: plain data only


def test_every_loop_has_figures(result):
    for model in result["models"]:
        assert list(model["variants"]) == list(LOOPS)
        for name in LOOPS:
            row = model["variants"][name]
            assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["tflops"] > 0 and 0 < row["mfu"]
            assert row["warmup_s"] > 0 and len(row["rounds_tokens_per_s"]) == result["settings"]["rounds"]
            assert row["peak_gib"] is None and row["step_peak_gib"] is None  # measured on CUDA only
            assert row["resident_gib"] > 0 and "step_peak_bytes" not in row
        assert model["variants"]["ltransform"]["note"] in ("lt.compile", "block.compile")
        ratios = model["ratios"]
        speed = {name: model["variants"][name]["tokens_per_s"] for name in LOOPS}
        assert ratios["lt_over_raw"] == pytest.approx(speed["ltransform"] / speed["raw"])
        assert ratios["lt_over_fabric"] == pytest.approx(speed["ltransform"] / speed["fabric"])


def test_the_three_loops_train_alike(result):
    for model in result["models"]:
        assert set(model["loss_rel_diff"]) == {"ltransform", "fabric"}
        assert max(model["loss_rel_diff"].values()) <= LOSS_TOLERANCE
        losses = [model["variants"][name]["final_loss"] for name in LOOPS]
        assert losses[0] < model["variants"]["raw"]["warmup_loss"]  # it did train


def test_flops_formula_matches_torchs_counter_on_the_matmuls(result):
    """On the CPU torch's counter has no formula for SDPA's CPU kernel, so it counts the matmuls
    only: exactly 6 FLOPs per matmul weight per token."""
    preset = SMOKE_PRESETS[0]
    model = result["models"][0]
    cfg = preset.config
    assert model["params"] == sum(p.numel() for p in GPT(cfg).parameters())
    tokens = preset.batch * cfg.block
    assert model["flops_counted"] == 6 * matmul_params(cfg) * tokens
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block * tokens
    assert model["flops_per_step"] == flops_per_step(cfg, preset.batch) == model["flops_counted"] + attention


def test_lowbit_rows_have_figures_or_reasons(result):
    fp8 = result["fp8"]["rows"]
    assert list(fp8) == ["bf16-mixed", "torchao-float8", "transformer-engine"]
    assert fp8["bf16-mixed"]["tokens_per_s"] > 0
    assert "CUDA" in fp8["transformer-engine"]["skipped"] or "importable" in fp8["transformer-engine"]["skipped"]
    ao = fp8["torchao-float8"]
    if "skipped" in ao:
        assert "torchao" in ao["skipped"]
    else:  # emulated on the CPU: close to bf16 after the same steps
        assert ao["tokens_per_s"] > 0 and ao["loss_rel_diff_vs_bf16"] < 0.01
    qlora = result["qlora"]
    if "skipped" in qlora:
        assert "bitsandbytes" in qlora["skipped"]
    else:
        full, low = qlora["rows"].values()
        assert full["step_ms"] > 0 and low["step_ms"] > 0 and low["time_vs_full"] > 0
        assert low["trainable_params"] < full["trainable_params"] / 4


def test_targets_listed_but_not_binding_in_smoke(result):
    assert result["targets_apply"] is False
    names = [t["what"] for t in result["targets"]]
    assert any("MFU" in n for n in names) and sum("ltransform tokens/s" in n for n in names) == 2
    for target in result["targets"]:
        assert target["met"] == (target["value"] >= target["target"])


def test_markdown_renders_tables_and_reasons(result):
    text = to_markdown(result)
    assert "| raw |" in text and "| ltransform |" in text and "| fabric |" in text
    assert "ltransform / raw **" in text and "### fp8" in text and "### nf4 QLoRA" in text
    assert "skipped: " in text  # Transformer Engine, at least
    broken = copy.deepcopy(result)
    broken["models"][0] = {"name": "smoke", "error": "RuntimeError: boom"}
    broken["qlora"] = {"skipped": "bitsandbytes is not installed"}
    text = to_markdown(broken)
    assert "error: RuntimeError: boom" in text and "skipped: bitsandbytes is not installed" in text


def test_each_part_is_reported_as_it_starts_and_ends(result):
    assert [running for running, _ in PROGRESS] == ["smoke", None, "fp8", None, "qlora", None]
    first, after_first = PROGRESS[0][1], PROGRESS[1][1]
    assert "running" in first["models"][0] and "pending" in first["fp8"] and "pending" in first["qlora"]
    assert after_first["models"][0]["variants"].keys() == result["models"][0]["variants"].keys()
    assert PROGRESS[-1][1]["fp8"].keys() == result["fp8"].keys()
    json.dumps(PROGRESS)
    cut = {**PROGRESS[2][1], "cut_short": "killed at the deadline (--budget) during qlora"}
    text = to_markdown(cut)
    assert "Cut short: killed at the deadline" in text and "| raw |" in text
    assert "skipped: cut short (killed" in text and "skipped: not started (killed" in text


def test_lt_run_is_timed_from_its_first_step_to_its_last(result):
    """lt.run's set-up and tear-down per call are left out of the timed steps, and reported."""
    for model in result["models"]:
        ours = model["variants"]["ltransform"]
        assert ours["call_overhead_ms"] > 0 and "call_overhead_ms" not in model["variants"]["raw"]
    assert "lt.run set-up + tear-down" in to_markdown(result)


def test_a_part_that_does_not_fit_its_minimum_time_is_skipped(monkeypatch):
    from ltransform.gpucheck import bench

    monkeypatch.setattr(bench, "SMOKE", attrs.evolve(SMOKE, part_s={"model": 1e6, "qlora": 1e6, "fp8": 1e6}))
    result = run_benchmark(smoke=True, deadline=time.time() + 3600)
    parts = [*result["models"], result["fp8"], result["qlora"]]
    assert all("needs about 1000000 s" in part["skipped"] for part in parts), parts


def test_a_spent_budget_skips_every_part_with_the_reason():
    result = run_benchmark(smoke=True, budget_s=0)
    parts = [*result["models"], result["fp8"], result["qlora"]]
    assert all("time budget" in part["skipped"] for part in parts)
    assert all(t["met"] is None for t in result["targets"])
    assert "skipped: time budget" in to_markdown(result)


def test_a_loop_that_fails_is_reported_and_the_others_measured():
    settings, cfg, cpu = attrs.evolve(SMOKE, compile=False), SMOKE_PRESETS[0].config, torch.device("cpu")
    good = raw_loop(build(cfg, cpu, seed=0), cpu, settings)

    def broken(batches):
        raise RuntimeError("no kernel for this GPU")

    bad = Loop(name="bad", model=good.model, optimizer=good.optimizer, train=broken)
    out = measure([bad, good], make_data(cfg, 2, 2, cpu, seed=1), settings, cpu, tokens_per_step=2 * cfg.block)
    assert out["bad"]["error"] == "RuntimeError: no kernel for this GPU" and "broken" in out["bad"]["traceback"]
    assert out["raw"]["tokens_per_s"] > 0 and len(out["raw"]["losses"]) == settings.rounds
