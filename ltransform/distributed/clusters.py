"""Which launcher started this process, and the torchrun-style variables it implies.

torchrun describes a process with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. SLURM's ``srun`` and Open MPI's ``mpirun`` describe it with their own variables;
``environment()`` translates them, so an unchanged script trains under ``srun -n 2 python
train.py`` and ``mpirun -np 2 python train.py`` as it does under torchrun. Nothing here writes to
``os.environ``: ``env.ensure_process_group`` applies the result, with setdefault semantics, only
when it creates the process group.
"""

from __future__ import annotations

import os
import re
import subprocess
import zlib
from collections.abc import Mapping

_MPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def name(environ: Mapping[str, str] | None = None) -> str | None:
    """The launcher of this process: ``"torchrun"``, ``"slurm"``, ``"mpi"``, or None.

    ``"torchrun"`` when torch's elastic agent started it (``TORCHELASTIC_RUN_ID``: torchrun,
    ``lt.launch``); it wins, so ``torchrun`` inside an ``sbatch`` script or an ``srun`` task is
    torchrun. ``"mpi"`` for an Open MPI rank (``OMPI_COMM_WORLD_*``), also when ``mpirun`` runs
    inside a SLURM job (its ranks then carry the SLURM variables of the step that started
    mpirun's daemons, one task per node, not per rank). ``"slurm"`` for a task of a SLURM job
    *step* (``srun``), recognised by a numeric ``SLURM_STEP_ID`` with ``SLURM_PROCID``: an
    ``sbatch`` script's own shell and an ``salloc`` shell have no ``SLURM_STEP_ID`` and are not
    mistaken for rank 0 of ``SLURM_NTASKS``. An interactive step (``srun --pty bash``) is one
    task, so a script run in it is a single process; the job's name is not consulted (``srun
    -n 2 bash -c ...`` names the job ``bash`` too). Else ``"torchrun"`` again where another
    launcher set torchrun's ``LOCAL_RANK``, or ``RANK`` and ``WORLD_SIZE`` (these are also what
    ``ensure_process_group`` sets in an srun/mpirun task, which stays ``"slurm"``/``"mpi"``).

    Args:
        environ: the variables to read; default ``os.environ``.

    Example:
        >>> from ltransform.distributed import clusters
        >>> clusters.name({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"})
        'slurm'
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if all(key in env for key in _MPI):
        return "mpi"
    if "SLURM_PROCID" in env and _slurm_step_id(env) is not None:
        return "slurm"
    if "LOCAL_RANK" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return "torchrun"
    return None


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torchrun-style ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` for a SLURM step or an Open MPI rank; ``{}`` otherwise.

    SLURM: the ranks come from ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``, the
    master is the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``), the port
    ``15000 + job id % 10000`` (as Lightning's ``SLURMEnvironment``). Open MPI: the ranks come
    from ``OMPI_COMM_WORLD_*``; on one node the master is ``127.0.0.1`` with a port derived
    from the job's id, which every rank of the job shares. ``MASTER_ADDR``/``MASTER_PORT``, if
    set, win in both.

    Args:
        environ: the variables to read; default ``os.environ``.

    Raises:
        ValueError: a SLURM or Open MPI variable that cannot be read (names it and its value),
            or an Open MPI job over several nodes with no ``MASTER_ADDR`` (the ranks cannot
            agree on one without it).

    Example:
        >>> from ltransform.distributed import clusters
        >>> clusters.environment({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
        ...     "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[07-08]",
        ...     "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1"})["MASTER_ADDR"]
        'node07'
    """
    env = os.environ if environ is None else environ
    kind = name(env)
    if kind == "slurm":
        out = _slurm(env)
    elif kind == "mpi":
        out = _mpi(env)
    else:
        return {}
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if env.get(key):
            out[key] = env[key]
    return out


def requeue(environ: Mapping[str, str] | None = None) -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue``); False outside SLURM.

    For an array job, the array task is requeued. The job must be requeueable: a batch job
    (``sbatch``, not a bare ``srun``) submitted with ``--requeue`` or under ``JobRequeue=1``.

    Args:
        environ: the variables to read; default ``os.environ``.

    Returns:
        True once ``scontrol`` accepted the requeue; False when this process is not in a SLURM job.

    Raises:
        RuntimeError: ``scontrol`` is missing, timed out or refused; the message has its output.

    Example:
        >>> from ltransform.distributed import clusters
        >>> clusters.requeue({})
        False
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"requeue: could not run {' '.join(command)!r} ({error}); is SLURM's "
                           f"scontrol on PATH on this node?") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"requeue: {' '.join(command)!r} failed with code {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}; only batch jobs (sbatch) can be requeued, "
            f"submit with sbatch --requeue (or set JobRequeue=1 in slurm.conf)")
    return True


def expand_hostlist(hostlist: str) -> list[str]:
    """The hosts of a SLURM host list: ``"node[01-03,07],gpu5"`` -> node01 node02 node03 node07 gpu5.

    Ranges keep their zero padding; several bracket groups in one name expand as a product
    (``"r[1-2]n[1-2]"`` -> r1n1 r1n2 r2n1 r2n2).

    Args:
        hostlist: the compressed list, as in ``SLURM_JOB_NODELIST``.

    Raises:
        ValueError: an empty list, unbalanced brackets or a range that is not ``a`` or ``a-b``
            with ``a <= b``.

    Example:
        >>> from ltransform.distributed.clusters import expand_hostlist
        >>> expand_hostlist("node[01-02,07],gpu5")
        ['node01', 'node02', 'node07', 'gpu5']
    """
    hosts = [host for part in _split_top(hostlist) for host in _expand_one(part, hostlist)]
    if not hosts:
        raise ValueError(f"expand_hostlist: no host in {hostlist!r}")
    return hosts


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"expand_hostlist: unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"expand_hostlist: unbalanced brackets in {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_one(pattern: str, whole: str) -> list[str]:
    head, bracket, rest = pattern.partition("[")
    if not bracket:
        return [pattern]
    inside, _, tail = rest.partition("]")
    values = []
    for item in inside.split(","):
        match = _RANGE.match(item.strip())
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"expand_hostlist: bad range {item!r} in {whole!r}; expected N or N-M with N <= M")
        low, high = match[1], match[2] or match[1]
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]
    return [head + value + suffix for value in values for suffix in _expand_one(tail, whole)]


def _slurm_step_id(env: Mapping[str, str]) -> str | None:
    step = env.get("SLURM_STEP_ID", "")
    return step if step.isdigit() else None  # the batch/extern steps are not srun tasks


def _slurm(env: Mapping[str, str]) -> dict[str, str]:
    world = _int(env, "SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    node = _int(env, "SLURM_NODEID", "0")
    return {
        "RANK": str(_int(env, "SLURM_PROCID")),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(_int(env, "SLURM_LOCALID", "0")),
        "LOCAL_WORLD_SIZE": str(per_node[node] if node < len(per_node) else world),
        "MASTER_ADDR": expand_hostlist(nodes)[0] if nodes else "127.0.0.1",
        "MASTER_PORT": str(15000 + _int(env, "SLURM_JOB_ID", "0") % 10000),
    }


def _tasks_per_node(text: str) -> list[int]:
    """``"2(x3),1"`` -> [2, 2, 2, 1] (SLURM's ``SLURM_STEP_TASKS_PER_NODE`` form)."""
    out: list[int] = []
    for item in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"cannot read the SLURM tasks per node {text!r}; expected e.g. '2(x3),1'")
        out += [int(match[1])] * int(match[2] or 1)
    return out


def _mpi(env: Mapping[str, str]) -> dict[str, str]:
    world, local_world = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "0")
    if local_world and local_world != world and not env.get("MASTER_ADDR"):
        raise ValueError(
            f"Open MPI job over several nodes (OMPI_COMM_WORLD_SIZE={world}, "
            f"OMPI_COMM_WORLD_LOCAL_SIZE={local_world}) without MASTER_ADDR: the ranks cannot agree on "
            f"a master; pass mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=<free port>")
    return {
        "RANK": str(_int(env, "OMPI_COMM_WORLD_RANK")),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")),
        "LOCAL_WORLD_SIZE": str(local_world or world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + zlib.crc32(_mpi_job(env).encode()) % 20000),
    }


def _mpi_job(env: Mapping[str, str]) -> str:
    """What every rank of one ``mpirun`` shares and another ``mpirun`` does not: the PMIx
    namespace, or the job id, or mpirun's own address (Open MPI 4.1 sets all three)."""
    for key in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_hnp_uri"):
        if env.get(key):
            return env[key]
    raise ValueError("Open MPI rank without PMIX_NAMESPACE, OMPI_MCA_ess_base_jobid or "
                     "OMPI_MCA_orte_hnp_uri: cannot derive a port all ranks share; set MASTER_PORT "
                     "(mpirun -x MASTER_PORT=<free port>)")


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"cannot read {key}={value!r} as an integer (set by the launcher; is the "
                         f"job's environment intact?)") from None
