"""lt.launch's options and its behaviour inside an already launched process; the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ltransform as lt
from ltransform.cli import _parser, torchrun_args
from ltransform.distributed.launch import _free_port


def world() -> tuple[int, int]:
    return lt.rank(), lt.world_size()


def grad_tensor():
    return torch.ones(2, requires_grad=True) * 2  # not sendable: a non-leaf that requires grad


def test_inside_a_launched_process_it_calls_fn_directly(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lt.launch(lambda a, b=0: a + b, 1, b=2, devices=2) == 3


def test_mismatched_world_size_inside_a_launched_process(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"devices=2, num_nodes=1\) was called inside a launched process "
                                         r"whose WORLD_SIZE is 4"):
        lt.launch(world, devices=2)


@pytest.mark.parametrize("options, message", [
    (dict(devices=0), "devices must be an int >= 1, got 0"),
    (dict(devices=True), "devices must be an int >= 1, got True"),
    (dict(num_nodes=2, node_rank=2), "node_rank 2 must be below num_nodes 2"),
    (dict(num_nodes=2), "give master_port"),
    (dict(start_method="thread"), "unknown start_method 'thread'; expected one of: 'spawn', 'fork', 'forkserver'"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        lt.launch(world, **options)


def test_spawned_processes_return_rank_0s_result():
    assert lt.launch(world, devices=2) == (0, 2)


def test_a_node_that_never_joins_is_reported_not_waited_for_forever():
    with pytest.raises(lt.LaunchError, match=r"not every node joined .* within 2 s \(.*1/2 clients joined"):
        lt.launch(world, devices=1, num_nodes=2, node_rank=0, master_port=_free_port(), join_timeout=2)


def test_an_unsendable_result_is_named():
    with pytest.raises(lt.LaunchError, match=r"rank 0.*TypeError: lt.launch: the function's return value "
                                             r"\(a Tensor\) cannot be sent back"):
        lt.launch(grad_tensor, devices=1)


def test_cli_maps_to_torchrun():
    single = _parser().parse_args(["run", "--devices", "4", "train.py", "--lr", "3"])
    worker = ["--module", "ltransform.distributed.worker"]  # runs the script, recording an exception
    assert torchrun_args(single) == ["--nproc-per-node=4", "--nnodes=1", "--max-restarts=0", "--standalone",
                                     *worker, "train.py", "--lr", "3"]
    multi = _parser().parse_args(["run", "--devices", "8", "--nodes", "2", "--node-rank", "1", "--master-addr",
                                  "10.0.0.1", "--master-port", "29500", "train.py"])
    assert torchrun_args(multi) == ["--nproc-per-node=8", "--nnodes=2", "--max-restarts=0", "--node-rank=1",
                                    "--master-addr=10.0.0.1", "--master-port=29500", *worker, "train.py"]


def test_cli_runs_a_script_on_two_processes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch, ltransform as lt\n"
        "total = lt.all_reduce(torch.tensor([1.0 + lt.rank()]), 'sum')\n"
        "print(f'rank {lt.rank()} of {lt.world_size()} total {total.item()} args {sys.argv[1:]}')\n"
    )
    done = subprocess.run([sys.executable, "-m", "ltransform", "run", "--devices", "2", str(script), "--x", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "rank 0 of 2 total 3.0 args ['--x', '1']" in out
    assert "rank 1 of 2 total 3.0 args ['--x', '1']" in out


def test_cli_rejects_bad_counts():
    with pytest.raises(SystemExit, match="need --devices >= 1"):
        from ltransform.cli import main
        main(["run", "--devices", "0", "x.py"])


TWO_NODES = """
import sys, torch, ltransform as lt

def work():
    total = lt.all_reduce(torch.tensor([1.0 + lt.rank()]), "sum")
    return lt.rank(), lt.world_size(), lt.local_rank(), total.item()

if __name__ == "__main__":
    print(lt.launch(work, devices=2, num_nodes=2, node_rank=int(sys.argv[1]), master_port=int(sys.argv[2]),
                    join_timeout=60), flush=True)
"""


def test_two_nodes_on_one_machine_join_one_world(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(TWO_NODES)
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [node.communicate(timeout=120) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    # the script prints one line; gloo itself may add "[Gloo] Rank 0 is connected to 3 peer ranks..." (torch 2.9)
    printed = [[line for line in out.splitlines() if not line.startswith("[Gloo] ")] for out, _ in outs]
    assert printed[0] == ["(0, 4, 0, 10.0)"]  # rank 0 of 4 processes on 2 nodes; 1+2+3+4
    assert printed[1] == ["None"]  # node 1 has no rank 0


def test_cli_version_and_help_without_markup():
    import subprocess
    import sys

    version = subprocess.run([sys.executable, "-m", "ltransform", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("ltransform 0.") and "torch" in version.stdout
    for args in (["--help"], ["consolidate", "--help"], ["run", "--help"]):
        shown = subprocess.run([sys.executable, "-m", "ltransform", *args], capture_output=True, text=True,
                               timeout=120).stdout
        assert "``" not in shown, shown
    shown = subprocess.run([sys.executable, "-m", "ltransform", "consolidate", "--help"], capture_output=True,
                           text=True, timeout=120).stdout
    assert "sharded checkpoint" in shown and ".safetensors" in shown


def _threaded_ops() -> None:
    model = torch.nn.Linear(64, 256)
    model(torch.randn(8, 64)).sum().backward()  # (its backward's sum runs on OpenMP's threads)


def _threaded_ops_in_a_rank() -> int:
    _threaded_ops()
    return torch.get_num_threads()


@pytest.mark.timeout(120)
def test_forked_ranks_do_not_hang_after_the_parent_ran_a_threaded_op():
    """OpenMP's thread pool does not survive a fork: before the fix a notebook that had run a
    matmul hung in its forked ranks' first one (the children now run on one thread)."""
    threads = torch.get_num_threads()  # (1 under this suite's conftest)
    torch.set_num_threads(2)
    try:
        _threaded_ops()  # the parent's pool exists
        assert lt.launch(_threaded_ops_in_a_rank, devices=2, start_method="fork", timeout=60) == 1
    finally:
        torch.set_num_threads(threads)
