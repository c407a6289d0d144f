"""2 real gloo processes (started by lt.launch on a free port) against single-process references."""

from __future__ import annotations

import os
import time

import pytest
import torch

import ltransform as lt
import workers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Holds a checkpoint saved by one process (before the launch) for the ranks to load."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    model = workers.make_model(seed=3)
    state = lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    step = lt.train_step(workers.mse)
    for batch in workers.batches(2, 8, seed=4):
        state, _ = step(state, batch)
    lt.save(tmp / "one_rank", state, sharded=True)
    return tmp, state


@pytest.fixture(scope="module")
def ranks(checkpoint_dir):
    """Every scenario of workers.py, run once on 2 ranks; a list of each rank's results."""
    return lt.launch(workers.all_scenarios, str(checkpoint_dir[0]), devices=2)


@pytest.mark.parametrize("name", ["two_ranks", "two_ranks_full.pt"])
def test_a_checkpoint_saved_on_2_ranks_loads_in_one_process_without_a_group(ranks, checkpoint_dir, name):
    model = workers.make_model(seed=11)
    state = lt.load(checkpoint_dir[0] / name, lt.State(model=model, optimizer=torch.optim.AdamW(model.parameters())))
    assert state.step == 2
    for p, q in zip(model.parameters(), ranks[0]["checkpoints"]["saved"]):
        assert torch.equal(p, q)
    assert state.optimizer.state_dict()["state"][0]["exp_avg"].abs().sum() > 0  # optimizer state came too


def test_resume_on_2_ranks_with_a_distributed_sampler_is_exact(ranks):
    for results in ranks:
        assert results["exact_resume"] == {"equal": True, "counters": True}


def test_a_one_process_checkpoint_loads_resharded_on_2_ranks(ranks, checkpoint_dir):
    _, saved = checkpoint_dir
    for results in ranks:
        loaded = results["checkpoints"]
        assert loaded["loaded_step"] == 2
        for p, q in zip(loaded["loaded_params"], saved.model.parameters()):
            assert torch.equal(p, q)
        assert torch.equal(loaded["loaded_exp_avg"], saved.optimizer.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("config", ["ddp", "ddp-accumulate-clip", "ddp-checkpointed", "fsdp", "fsdp-accumulate-clip",
                                    "fsdp-root-only", "fsdp-min-params", "fsdp-no-reshard", "fsdp-offload",
                                    "fsdp-checkpointed", "hsdp-2x1", "hsdp-2x1-accumulate"])
def test_two_ranks_equal_one_process_with_the_double_batch(ranks, config):
    for results in ranks:  # both ranks end with the reference's parameters
        assert results["equivalence"][config] < 1e-6


def test_clipping_under_fsdp_uses_the_global_norm(ranks):
    for results in ranks:
        norm = results["clip_norm"]
        assert not norm["is_dtensor"]  # reported as a plain tensor, ready to log
        assert norm["fsdp"] == pytest.approx(norm["expected"], rel=1e-6)


def test_non_boundary_micro_steps_do_not_sync_and_the_setting_is_restored(ranks):
    results = ranks[0]["no_sync_on_micro_steps"]
    assert results["ddp-ranks-differ-after-micro-step"]  # each rank kept its own gradient
    assert not results["fsdp-reduced-after-micro-step"]  # no reduce-scatter into .grad yet
    assert results["fsdp-sync-reduced-after-micro-step"]  # the sync_micro_steps policy
    for strategy in ("ddp", "fsdp", "fsdp-sync"):
        assert results[f"{strategy}-sync-restored"]
        assert results[f"{strategy}-stepped"]


def test_fsdp_holds_half_the_parameter_bytes_per_rank_and_meta_init_allocates_nothing(ranks):
    for results in ranks:
        memory = results["sharded_memory"]
        assert memory["local"] == memory["full"] / 2
        assert memory["meta_before"]
        assert memory["materialized_local"] == memory["full"] / 2
        assert memory["devices"] == ["cpu"]


def test_meta_init_then_shard_allocates_only_the_ranks_shard(ranks):
    for results in ranks:
        peak = results["meta_init_peak_memory"]
        assert peak["finite"]
        assert peak["growth_mb"] < 0.75 * peak["full_mb"]  # half the model is each rank's; never the whole


def test_mixed_precision_on_a_sharded_model_is_fsdps_policy(ranks):
    for results in ranks:
        precision = results["precision_fsdp"]
        assert precision["param_dtype"] == "torch.bfloat16"  # gathered for the forward in bf16
        assert precision["weight_dtype"] == "torch.float32"  # sharded master weights stay fp32
        assert precision["vs_hand_written"] == 0.0  # fully_shard(mp_policy=...) + autocast, bitwise
        assert precision["to_precision_vs_shard"] == 0.0  # lt.to_precision first decides the same policy
        assert precision["vs_single_process_bf16"] < 2e-3  # bf16 all-gathered weights vs autocast


def test_fp16_inf_in_one_ranks_shard_skips_the_update_on_every_rank(ranks):
    for results in ranks:
        for strategy in ("ddp", "fsdp"):
            r = results["fp16_inf_on_one_shard"][strategy]
            assert (r["step"], r["changed"], r["scale"], r["second_step"]) == (0, 0.0, 32768.0, 0), (strategy, r)
    # the test's premise: only rank 1's shard had the inf, so rank 0 skipped on a reduced found-inf
    assert [r["fp16_inf_on_one_shard"]["local_shard_finite"] for r in ranks] == [True, False]


def test_errors_name_the_fix(ranks):
    errors = ranks[1]["errors"]
    assert "built before lt.shard" in errors["stale"] and "build the optimizer after" in errors["stale"]
    assert "use distribute('fsdp')" in errors["ddp_on_sharded"]
    assert "apply lt.shard(model" in errors["fsdp_unsharded"]
    assert "would train each rank alone" in errors["single"]
    assert "needs 4 ranks, but the world size is 2" in errors["mesh"]
    assert ("ValueError: with_precision('bf16-mixed'): the model was sharded without a mixed-precision policy "
            "(lt.shard decided '32-true'); FSDP2 takes its MixedPrecisionPolicy when sharding: "
            "lt.pipe(model, lt.shard(policy=..., precision='bf16-mixed'))") in errors["precision"]


def test_collectives(ranks):
    for r, results in enumerate(ranks):
        c = results["collectives"]
        assert (c["rank"], c["world"], c["local_rank"], c["device"]) == (r, 2, r, "cpu")
        assert c["mean"] == [1.5, 5.0] and c["sum"] == [3.0, 10.0]
        assert c["max"] == [2.0, 10.0] and c["min"] == [1.0, 0.0]
        assert c["input_unchanged"] == [1.0 + r, 10.0 * r]
        assert c["gather"] == [[1.0, 0.0], [2.0, 10.0]]
        assert c["broadcast"] == {"from": 0} and c["broadcast_tensor"] == [1.0, 0.0]


def test_run_splits_a_dataloader_averages_metrics_and_logs_on_rank_0_only(ranks):
    zero, one = ranks[0]["run_loader"], ranks[1]["run_loader"]
    assert zero["params"] < 1e-6 and one["params"] < 1e-6
    assert one["logged"] == []
    (s2, m2), (s4, m4), (s_val, val) = zero["logged"]
    assert (s2, s4, s_val) == (2, 4, 4)
    assert m2["loss"] == pytest.approx(zero["ref_losses"][1], rel=1e-6)  # the mean over both ranks
    assert m4["loss"] == pytest.approx(zero["ref_losses"][3], rel=1e-6)
    assert val["val_loss"] == pytest.approx(zero["ref_val"], rel=1e-6)
    assert zero["averages"] == one["averages"] == 2  # one collective per log point, no more
    for epoch in (0, 1):  # shuffled: the ranks split each epoch, and epochs differ
        mine = [sorted(sum(r["run_loader"]["seen"][4 * epoch:4 * epoch + 4], [])) for r in ranks]
        assert sorted(mine[0] + mine[1]) == list(range(16))
    assert zero["seen"][:4] != zero["seen"][4:]


def test_evaluation_gives_the_same_metrics_on_2_ranks_as_in_one_process(ranks):
    # sharded + bf16-mixed: the eval step runs in the training precision on 1 and on 2 processes;
    # 13 samples: the DistributedSampler repeats sample 0 on rank 1, which must not count
    one = workers.eval_run(batch=4)
    val = one["val"][-1]["val_loss"]
    assert one["seen"] == [4, 4, 4, 1]
    assert ranks[0]["eval_run"]["seen"] == [4, 3]  # samples 0, 2, ..., 12
    assert ranks[1]["eval_run"]["seen"] == [4, 2]  # 1, 3, ..., 11 and a repeat of 0, cut off
    for results in ranks:
        assert results["eval_run"]["val"][-1]["val_loss"] == pytest.approx(val, rel=1e-6)
    # ...and that is the bf16 value: a float32 evaluation differs by far more than the tolerance
    gen = torch.Generator().manual_seed(3)
    torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
    x, y = torch.randn(13, 16, generator=gen), torch.randn(13, 1, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        fp32 = torch.nn.functional.mse_loss(model(x), y).item()
    assert abs(fp32 - val) > 100 * 1e-6 * abs(val)


def test_uneven_per_rank_data_is_an_error_not_a_hang(ranks):
    for results in ranks:
        assert ("data has a different number of batches on each rank (rank 0: 3, rank 1: 4)"
                in results["uneven_data"]["error"])


def test_several_ranks_without_distribute_warn_that_each_trains_alone(ranks):
    for results in ranks:
        (warning,) = results["uneven_data"]["warnings"]
        assert "has no lt.distribute(...)" in warning and "each rank trains its own copy" in warning


def _raises(pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"{lt.rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    lt.barrier()
    if lt.rank() == 1:
        raise ValueError("bad batch on rank 1")
    lt.barrier()  # rank 0 would wait here forever
    time.sleep(60)


def _killed(pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"{lt.rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    lt.barrier()
    if lt.rank() == 1:
        os.kill(os.getpid(), 9)
    time.sleep(60)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("fn, why", [(_raises, "ValueError: bad batch on rank 1"),
                                     (_killed, "killed by signal SIGKILL")])
def test_a_failing_rank_is_named_and_nothing_is_left_running(tmp_path, fn, why):
    start = time.monotonic()
    with pytest.raises(lt.LaunchError, match="rank 1 failed first") as info:
        lt.launch(fn, str(tmp_path), devices=2)
    assert time.monotonic() - start < 30  # not the 60 s sleep: the others were stopped
    assert why in info.value.failures[1]
    assert why in str(info.value)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)


def test_torchao_float8_converted_before_shard_all_gathers_fp8_weights(ranks):
    for results in ranks:
        result = results["float8"]
        if result is None:
            pytest.skip("torchao is not installed (the dev extra installs it)")
        assert result["local_weight"] == "WeightWithDynamicFloat8CastTensor"  # fp8 all-gather is on
        assert result["vs_hand_written"] == 0.0  # torchao's own FSDP2 recipe, written out
        # each rank scales its own batch, so one process on the double batch differs a little
        assert result["vs_one_process"] < 1e-2 and result["ddp_vs_one_process"] < 1e-2
        assert "the model is sharded, and its layers can no longer be swapped" in result["late_error"]
        assert "lt.pipe(model, lt.to_precision('torchao-float8'), lt.shard(policy=...))" in result["late_error"]


def test_a_float8_model_sharded_with_fp8_all_gather_round_trips_checkpoints(ranks):
    for results in ranks:
        if results["float8_checkpoint"] is None:
            pytest.skip("torchao is not installed (the dev extra installs it)")
        result = results["float8_checkpoint"]
        assert result["before"] > 0.01
        assert result["float8"] == 0.0 and result["float8.pt"] == 0.0


@pytest.mark.timeout(120)
def test_dataloader_workers_draw_differently_on_each_rank_and_alike_on_a_rerun():
    first = lt.launch(workers.worker_seeds, devices=2)
    assert len(first[0]) == len(first[1]) == 4
    assert not set(first[0]) & set(first[1])  # worker k of rank 0 no longer repeats worker k of rank 1
    assert lt.launch(workers.worker_seeds, devices=2) == first  # seed_everything(0): reproducible
