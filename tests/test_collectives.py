"""Rank-zero helpers, lt.autocast, and collectives on trees, numbers and groups (with autograd).

The 2-rank cases run in two ``lt.launch(devices=2)`` jobs (gloo on the CPU), each once per module;
rank 0 returns what every rank saw.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ltransform as lt
from ltransform.distributed import env, ranks

# ---------------------------------------------------------------- the 2-rank scenarios


def _ordering(folder: Path, local: bool) -> dict:
    """Rank 0 writes a file slowly inside the block; the other rank, inside its block, must see it."""
    marker = folder / f"first-{local}"
    with lt.rank_zero_first(local=local):
        entered = time.monotonic()
        if lt.rank() == 0:
            time.sleep(0.5)
            marker.write_text("rank 0 was here")
        seen = marker.exists()
        left = time.monotonic()
    return {"entered": entered, "left": left, "seen": seen}


def _raising() -> str:
    try:
        with lt.rank_zero_first():
            if lt.rank() == 0:
                raise ValueError("download failed")
            return "ran the block"
    except Exception as error:  # noqa: BLE001  (the test reads which error each rank got)
        return f"{type(error).__name__}: {error}"


def _printed() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lt.print("hello", lt.rank(), sep="-")
    return out.getvalue()


@lt.rank_zero_only
def _only_zero(x: int) -> int:
    """Doubles on rank 0."""
    return 2 * x


def _groups() -> dict:
    me = lt.rank()
    pair = dist.new_group([0, 1])
    alone = [dist.new_group([0]), dist.new_group([1])][me]  # every rank creates both, in one order
    lt.barrier(pair)
    lt.barrier(alone)
    tree = {"a": torch.tensor(me + 1.0), "b": [me, 2.0], "c": (torch.tensor([me, 10 * me]),)}
    return {
        "sum": lt.all_reduce(tree, "sum", group=pair),
        "mean": lt.all_reduce(tree, "mean", group=pair),
        "max": lt.all_reduce({"n": me}, "max"),
        "alone": lt.all_reduce(tree, "sum", group=alone),
        "gather": lt.all_gather({"x": torch.tensor([me]), "n": me + 0.5}, group=pair),
        "gather_alone": lt.all_gather(torch.tensor([me]), group=alone),
        "plain": lt.all_gather(torch.tensor([me])),
        "broadcast": lt.broadcast(torch.tensor([me]), src=1, group=pair),
        "broadcast_tree": lt.broadcast({"k": [me]}, src=1, group=pair),
    }


def _contrastive_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    return x, x + 0.1 * torch.randn(8, 6, generator=gen, dtype=torch.float64)


def _info_nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each view's positive is its pair, the negatives every other sample of the batch."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.1
    return F.cross_entropy(logits, torch.arange(len(a)))


def info_nce_whole(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The reference: one process, the whole batch, no collective."""
    return _info_nce(*(model(view) for view in batch))


def info_nce_gathered(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The same loss over the batch gathered from every rank (each rank computes the global loss)."""
    a, b = (torch.cat(lt.all_gather(model(view), sync_grads=True)) for view in batch)
    return _info_nce(a, b)


def _train_contrastive(shard: int | None, n: int = 4) -> list[torch.Tensor]:
    """A few SGD steps of InfoNCE; ``shard`` is which half of each batch this rank gets (None: one
    process with all of it and the reference loss)."""
    model = _contrastive_model().double()
    state = lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    step = (lt.pipe(lt.train_step(info_nce_gathered), lt.distribute("ddp")) if shard is not None
            else lt.train_step(info_nce_whole))
    for i in range(n):
        batch = _views(i)
        if shard is not None:
            batch = tuple(v.chunk(2)[shard] for v in batch)
        state, _ = step(state, batch)
    return [p.detach().clone() for p in model.parameters()]


def _detached_has_no_grad() -> bool:
    x = torch.ones(2, requires_grad=True)
    return all(not t.requires_grad for t in lt.all_gather(x * 2))


def _scenarios(folder: Path) -> dict:
    mine = {
        "ordering": _ordering(folder, local=False),
        "ordering_local": _ordering(folder, local=True),
        "raising": _raising(),
        "printed": _printed(),
        "only_zero": _only_zero(3),
        "node_rank": lt.node_rank(),
        "groups": _groups(),
        "contrastive": _train_contrastive(lt.rank()),
        "detached": _detached_has_no_grad(),
    }
    return dict(zip(range(lt.world_size()), env.all_gather_objects(mine)))


def _two_nodes(folder: Path) -> dict:
    """Two "nodes" of one rank each: torchrun's GROUP_RANK says so (the launcher's word is all
    node_rank reads). Inside its block rank 0 waits for rank 1's file: if rank 1 had to wait for
    rank 0, the file never comes."""
    os.environ["GROUP_RANK"] = str(lt.rank())
    marker = folder / "node-1"
    group, first = ranks.node_group()
    with lt.rank_zero_first(local=True):
        if lt.rank() == 1:
            marker.write_text("node 1 went first on its node")
            concurrent = True
        else:
            deadline = time.monotonic() + 20
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            concurrent = marker.exists()
    mine = {"node_rank": lt.node_rank(), "first": first, "group_size": dist.get_world_size(group),
            "concurrent": concurrent, "ordering": _ordering(folder, local=False)}
    return dict(zip(range(lt.world_size()), env.all_gather_objects(mine)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return lt.launch(_scenarios, tmp_path_factory.mktemp("collectives"), devices=2, timeout=60)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> dict:
    return lt.launch(_two_nodes, tmp_path_factory.mktemp("nodes"), devices=2, timeout=60)


# ---------------------------------------------------------------- rank-zero helpers


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["ordering", "ordering_local"])
def test_rank_zero_first_runs_rank_0_first_on_2_ranks(two_ranks, case):
    zero, one = two_ranks[0][case], two_ranks[1][case]
    assert zero["seen"] and one["seen"]  # rank 1 found rank 0's file inside its block
    assert one["entered"] >= zero["left"]


def test_rank_zero_first_releases_the_others_when_rank_0_raises(two_ranks):
    assert two_ranks[0]["raising"] == "ValueError: download failed"
    assert two_ranks[1]["raising"].startswith("RuntimeError: rank_zero_first: the block failed on rank 0")


def test_print_and_rank_zero_only_act_on_rank_0_alone(two_ranks):
    assert [two_ranks[r]["printed"] for r in (0, 1)] == ["hello-0\n", ""]
    assert [two_ranks[r]["only_zero"] for r in (0, 1)] == [6, None]
    assert [two_ranks[r]["node_rank"] for r in (0, 1)] == [0, 0]


def test_tree_collectives_with_groups(two_ranks):
    zero, one = two_ranks[0]["groups"], two_ranks[1]["groups"]
    for got in (zero, one):
        assert got["sum"]["a"].item() == 3.0 and got["sum"]["b"] == [1, 4.0]
        assert torch.equal(got["sum"]["c"][0], torch.tensor([1, 10]))
        assert got["mean"]["a"].item() == 1.5 and got["mean"]["b"] == [0.5, 2.0]
        assert got["max"] == {"n": 1}
        assert [t.item() for t in got["gather"]["x"]] == [0, 1] and got["gather"]["n"] == [0.5, 1.5]
        assert got["plain"][1].item() == 1 and isinstance(got["plain"], list)
        assert got["broadcast"].item() == 1 and got["broadcast_tree"] == {"k": [1]}
    for me, got in enumerate((zero, one)):  # a group of one rank: its own values
        assert got["alone"]["a"].item() == me + 1.0 and got["alone"]["b"] == [me, 2.0]
        assert [t.item() for t in got["gather_alone"]] == [me]
    assert two_ranks[0]["detached"] and two_ranks[1]["detached"]


def test_contrastive_loss_with_sync_grads_trains_as_one_process(two_ranks):
    whole = _train_contrastive(None)
    for r in (0, 1):
        for split, one in zip(two_ranks[r]["contrastive"], whole):
            assert torch.allclose(split, one, atol=1e-6, rtol=0), (split - one).abs().max()
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(whole, _contrastive_model().double().parameters()))


@pytest.mark.timeout(300)
def test_rank_zero_first_local_goes_first_on_each_node(two_nodes):
    zero, one = two_nodes[0], two_nodes[1]
    assert [zero["node_rank"], one["node_rank"]] == [0, 1]
    assert [zero["first"], one["first"]] == [0, 1] and zero["group_size"] == one["group_size"] == 1
    assert zero["concurrent"]  # rank 0 saw node 1's file while still in its own block
    assert one["ordering"]["entered"] >= zero["ordering"]["left"]  # local=False still orders globally


def test_single_process_helpers(capsys):
    with lt.rank_zero_first(local=True):
        ran = True
    assert ran and lt.node_rank() == 0 and _only_zero(2) == 4
    lt.print("once")
    assert capsys.readouterr().out == "once\n"
    assert lt.all_reduce(5) == 5 and lt.all_gather(2.5) == [2.5] and lt.all_reduce([1.0], "mean") == [1.0]
    lt.barrier(group=None)


def test_rank_zero_only_rejects_a_non_callable():
    with pytest.raises(TypeError, match="rank_zero_only: expected a function to decorate, got int 3"):
        lt.rank_zero_only(3)  # type: ignore[arg-type]


def test_rank_zero_first_raise_in_one_process_propagates():
    with pytest.raises(ValueError, match="boom"), lt.rank_zero_first():
        raise ValueError("boom")


def test_collectives_reject_other_leaves():
    with pytest.raises(TypeError, match="all_reduce: expected tensors or numbers .*got str 'x'; lt.broadcast carries"):
        lt.all_reduce({"a": "x"})
    with pytest.raises(ValueError, match="all_reduce: unknown op 'avg'; expected one of: 'mean'"):
        lt.all_reduce(1.0, "avg")


@pytest.mark.parametrize(("environ", "expected"), [
    ({"GROUP_RANK": "2"}, 2),
    ({"NODE_RANK": "1"}, 1),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NODEID": "3",
      "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}, 3),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}, 2),
    ({}, 0),
])
def test_node_rank_reads_the_launcher(monkeypatch, environ, expected):
    for key in ("GROUP_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NODEID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert lt.node_rank() == expected


# ---------------------------------------------------------------- lt.autocast


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except (RuntimeError, AssertionError):
        return False
    return True


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true", "bf16"])
def test_autocast_equals_the_steps_forward_bit_for_bit(precision):
    if precision == "16-mixed" and not _cpu_autocast_supports(torch.float16):
        pytest.skip("this torch has no float16 autocast on the CPU")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    batch = torch.randn(5, 8)
    same = copy.deepcopy(model)
    seen = []

    def loss_fn(m, b):
        out = m(b)
        seen.append(out.detach())
        return out.float().pow(2).mean()

    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision(precision))
    step(lt.State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)), batch)
    with lt.autocast(precision, device_type="cpu"):
        out = same(batch)
    assert out.dtype == seen[0].dtype and torch.equal(out, seen[0])
    if precision == "32-true":
        assert out.dtype == torch.float32 and torch.equal(out, same(batch))


def test_autocast_defaults_to_the_training_device():
    with lt.autocast("bf16-mixed"):
        assert torch.is_autocast_enabled(lt.device().type)


def test_autocast_rejects_unknown_and_true_precisions():
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'.*'16-mixed'.*'bf16-mixed'"), lt.autocast("fp16"):
        pass
    with pytest.raises(ValueError, match=r"lt.autocast\('bf16-true'\): 'bf16-true' has no autocast: it is the "
                                         r"model's dtype \(bfloat16\).*lt.to_precision\(model, 'bf16-true'\)"):
        with lt.autocast("bf16-true"):
            pass
    with pytest.raises(TypeError, match="lt.autocast: precision must be a name"), lt.autocast(None):
        pass
