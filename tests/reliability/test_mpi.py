"""Open MPI: the environment is read right (unit tests on env dicts), and under a real
``mpirun -np 2`` (Debian's openmpi-bin) the unchanged script trains what ``lt.launch(devices=2)``
trains, bitwise.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster_train import as_launched_by, assert_trained_alike, child_env, reference
from ltransform.distributed import clusters, env

SCRIPT = Path(__file__).with_name("cluster_train.py")
RANK_1 = {  # what Open MPI 4.1's mpirun -np 2 sets for rank 1, on one node
    "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1", "PMIX_NAMESPACE": "2085355521",
    "OMPI_MCA_ess_base_jobid": "2085355521", "OMPI_MCA_orte_hnp_uri": "2085355520.0;tcp://192.0.2.2:32953",
}


def test_an_mpi_rank_gets_torchrun_variables():
    got = clusters.environment(RANK_1)
    assert clusters.name(RANK_1) == "mpi"
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert 20000 <= int(got["MASTER_PORT"]) < 40000
    rank_0 = {**RANK_1, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert clusters.environment(rank_0)["MASTER_PORT"] == got["MASTER_PORT"]  # the ranks agree
    other_job = {**RANK_1, "PMIX_NAMESPACE": "2085355777"}
    assert clusters.environment(other_job)["MASTER_PORT"] != got["MASTER_PORT"]
    given = {**RANK_1, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29500"}
    assert clusters.environment(given)["MASTER_ADDR"] == "10.1.1.1"
    assert clusters.environment(given)["MASTER_PORT"] == "29500"


def test_several_nodes_need_a_master_address():
    two_nodes = {**RANK_1, "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(ValueError, match="several nodes.*mpirun -x MASTER_ADDR="):
        clusters.environment(two_nodes)
    assert clusters.environment({**two_nodes, "MASTER_ADDR": "node1"})["MASTER_ADDR"] == "node1"


def test_no_shared_job_id_needs_a_master_port():
    bare = {k: v for k, v in RANK_1.items() if k.startswith("OMPI_COMM_WORLD_")}
    with pytest.raises(ValueError, match="set MASTER_PORT"):
        clusters.environment(bare)
    assert clusters.environment({**bare, "MASTER_PORT": "29501"})["MASTER_PORT"] == "29501"


def test_rank_world_size_and_local_rank_read_the_mpi_rank(monkeypatch):
    as_launched_by(monkeypatch, RANK_1)
    assert (env.rank(), env.world_size(), env.local_rank()) == (1, 2, 1)


def _mpirun_missing() -> str | None:
    if not shutil.which("mpirun"):
        return "Open MPI is not installed (no mpirun on PATH); run scripts/setup-clusters.sh as root"
    out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" not in out.stdout + out.stderr:
        return f"mpirun is not Open MPI's ({(out.stdout + out.stderr).strip()[:80]!r}); install openmpi-bin"
    return None


@pytest.mark.timeout(400)
def test_mpirun_trains_equal_to_launch(tmp_path):
    reason = _mpirun_missing()
    if reason:
        pytest.skip(reason)
    ref = reference(tmp_path, steps=12)
    variables = {**child_env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--wdir", str(tmp_path),
                    sys.executable, str(SCRIPT), str(tmp_path / "mpi.pt"), "--steps", "12"],
                   env=variables, check=True, timeout=180)
    got = torch.load(tmp_path / "mpi.pt")
    assert [(v["cluster"], v["rank"], v["world"], v["local"]) for v in got["views"]] == [
        ("mpi", 0, 2, 0), ("mpi", 1, 2, 1)]
    assert_trained_alike(got, ref, 12)
