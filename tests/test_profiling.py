"""lt.profile (torch.profiler traces of chosen steps) and lt.memory_snapshot (CUDA allocator history)."""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch

import ltransform as lt
from helpers import make_data, make_model, mse, sgd
from ltransform.runner.hooks.profiling import Profile


def train(hooks, steps=8):
    model = make_model()
    return lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), make_data(steps),
                  progress=False, hooks=hooks)


def profiler_steps(path):
    """The ``ProfilerStep#k`` numbers a Chrome trace file holds (it must parse as JSON)."""
    events = json.loads(path.read_text())["traceEvents"]
    return sorted({int(m.group(1)) for e in events if (m := re.fullmatch(r"ProfilerStep#(\d+)", e.get("name", "")))})


def test_profile_writes_a_chrome_trace_of_the_active_steps(tmp_path, capsys):
    hook = lt.profile(tmp_path, wait=1, warmup=1, active=3)
    train([hook])
    (trace,) = tmp_path.iterdir()
    assert re.fullmatch(r"rank0\.\d+\.pt\.trace\.json", trace.name)
    assert profiler_steps(trace) == [2, 3, 4]  # torch numbers the profiler's steps from 0: the run's steps 3-5
    assert hook.recorded() == [(3, 5)]
    assert "lt.profile: recorded steps 3-5 (ProfilerStep#0 is step 1)" in capsys.readouterr().err


def test_profile_is_due_only_while_it_runs(tmp_path):
    calls = []

    class Counted(Profile):  # the same hook, counting the steps the loop calls it at
        def __call__(self, state, run):
            calls.append(run.step)
            super().__call__(state, run)

    hook = lt.profile(tmp_path, wait=0, warmup=1, active=1, skip_first=3)
    assert hook.next_step(0) == math.inf  # not before the run starts
    hook.__class__ = Counted
    train([hook], steps=12)
    assert calls == [3, 4, 5]  # starts after step 3, profiles 4 (warmup) and 5 (active), then never again
    assert hook.next_step(12) == math.inf and hook.recorded() == [(5, 5)]


def test_profile_repeats_its_cycle_into_a_file_each(tmp_path):
    hook = lt.profile(tmp_path, wait=1, warmup=0, active=1, repeat=2)
    train([hook])
    assert sorted(profiler_steps(p) for p in tmp_path.iterdir()) == [[1], [3]]
    assert hook.recorded() == [(2, 2), (4, 4)]


def test_a_run_that_ends_inside_the_schedule_writes_what_was_recorded(tmp_path):
    hook = lt.profile(tmp_path, wait=0, warmup=1, active=10)
    train([hook], steps=4)  # profiler steps 1-3 recorded, then the run ends: close() writes them
    (trace,) = tmp_path.iterdir()
    assert profiler_steps(trace) == [1, 2, 3, 4]  # (#4: from the last step to the end of the run)
    assert hook.recorded() == [(2, 4)] and hook.next_step(4) == math.inf


@pytest.mark.parametrize("options,message", [
    ({"active": 0}, r"lt.profile: active must be an int >= 1, got 0"),
    ({"repeat": 0}, r"lt.profile: repeat must be an int >= 1, got 0"),
    ({"wait": -1}, r"lt.profile: wait must be an int >= 0, got -1"),
    ({"skip_first": 1.5}, r"lt.profile: skip_first must be an int >= 0, got 1.5"),
])
def test_profile_options_are_checked(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        lt.profile(tmp_path, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_memory_snapshot_without_cuda_says_so_and_writes_nothing(tmp_path, capsys):
    hook = lt.memory_snapshot(tmp_path / "memory.pickle", steps=2)
    state = train([hook])
    assert state.step == 8
    assert capsys.readouterr().err.count("lt.memory_snapshot: no CUDA device; nothing recorded") == 1
    assert list(tmp_path.iterdir()) == [] and hook.written is None and hook.next_step(0) == math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_snapshot_on_cuda_writes_the_allocator_history(tmp_path, capsys):
    model = make_model().cuda()
    data = [(x.cuda(), y.cuda()) for x, y in make_data(6)]
    hook = lt.memory_snapshot(tmp_path / "memory.pickle", steps=2)
    lt.run(lt.train_step(mse), lt.State(model=model, optimizer=sgd(model)), data, progress=False, hooks=[hook])
    assert hook.written == tmp_path / "memory.pickle"
    with open(hook.written, "rb") as file:
        snapshot = pickle.load(file)
    assert snapshot["segments"] and any(t for t in snapshot["device_traces"])  # allocations were recorded
    assert "lt.memory_snapshot: wrote" in capsys.readouterr().err
    assert not torch.cuda.memory._snapshot()["device_traces"][0]  # recording stopped after the dump


@pytest.mark.parametrize("options,message", [
    ({"steps": 0}, r"lt.memory_snapshot: steps must be an int >= 1, got 0"),
    ({"max_entries": True}, r"lt.memory_snapshot: max_entries must be an int >= 1, got True"),
])
def test_memory_snapshot_options_are_checked(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        lt.memory_snapshot(tmp_path / "m.pickle", **options)
