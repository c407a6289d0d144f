"""``lt.launch``: run a function on N local processes through torch's elastic agent."""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ltransform.distributed import clusters, env, failures
from ltransform.distributed.preemption import Preempted

_START_METHODS = ("spawn", "fork", "forkserver")


class LaunchError(RuntimeError):
    """One or more ranks of an ``lt.launch`` failed; ``failures`` maps each failed rank to the
    reason, the first to fail (``first``) first."""

    def __init__(self, message: str, failures: dict[int, str], first: int | None = None) -> None:
        super().__init__(message)
        self.failures, self.first = failures, first


def launch(
    fn: Callable[..., Any],
    /,
    *args: Any,
    devices: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    start_method: str | None = None,
    max_restarts: int = 0,
    join_timeout: int = 900,
    timeout: float | None = None,
    accelerator: str | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``devices`` processes per node; return rank 0's result.

    Processes are started by torch's elastic agent (what ``torchrun`` uses), each with
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, so
    ``lt.shard``, ``lt.distribute`` and the collectives join the group on first use.
    Already inside a launched process (``torchrun``, or one task of several of ``srun`` or
    ``mpirun``) it just calls ``fn``.

    Args:
        fn: the function each process runs; defined in a module or a script (spawn), or in a
            notebook cell (fork is then used, because cell functions cannot be pickled).
        *args: passed to ``fn``; with spawn they must be picklable.
        devices: processes per node (one per GPU; on CPU, any number).
        num_nodes: nodes taking part; every node calls ``launch`` with its ``node_rank``.
        node_rank: this node's index, 0 to ``num_nodes - 1``.
        master_addr: the address of node 0.
        master_port: a free port on node 0 (default: any free port, single node only).
        start_method: ``"spawn"``, ``"fork"`` or ``"forkserver"``; default fork where there is
            no script file to re-import (Jupyter, ``python -c``, the interactive interpreter),
            else spawn. Forked processes run torch on one CPU thread each
            (``torch.set_num_threads(1)``, as torchrun's ``OMP_NUM_THREADS=1``): OpenMP's threads do
            not survive a fork, and a forked process's first multi-threaded op would wait for
            them forever once the notebook itself has run one.
        max_restarts: how many times the agent restarts the group after a rank fails (dies,
            raises, or is preempted); a restarted group meets anew, and an ``lt.run(...,
            resume="latest")`` in ``fn`` continues from the latest checkpoint.
        join_timeout: seconds to wait for every node to join before giving up.
        timeout: seconds a collective waits for the other ranks before it fails with
            ``lt.CollectiveError`` naming the rank and the operation (default: torch's, 30
            minutes); sets ``LTRANSFORM_COLLECTIVE_TIMEOUT`` in the ranks.
        accelerator: ``"cpu"``, ``"cuda"``/``"gpu"``, ``"xla"``/``"tpu"``, ``"mps"``, ``"xpu"`` or
            ``"auto"`` (default: ``lt.accelerator()``'s rule); sets ``LTRANSFORM_ACCELERATOR`` here
            and in the ranks. On XLA no process is started: SPMD drives all of the host's devices
            from this one, so ``fn`` runs here (``num_nodes > 1`` is an error: start the script on
            each host instead).
        **kwargs: passed to ``fn``; with spawn they must be picklable.

    Returns:
        What ``fn`` returned on rank 0 (None on nodes other than node 0).

    Raises:
        LaunchError: a rank failed; the message is one paragraph naming the rank that failed
            first (on its own: before the ranks whose collectives broke because it died, and
            the ranks the agent then stopped), when, its exception and the line that raised it
            or the signal that killed it, the other failed ranks, and the file holding the full
            traceback (each rank's traceback is also printed to stderr). ``failures`` maps each
            failed rank to its reason, the first first; ``first`` is its rank. The other ranks
            are stopped, so nothing is left hanging. Also when not every node joined within
            ``join_timeout`` seconds.
        ValueError: bad options, or ``devices * num_nodes`` differs from the world size of the
            launched process it is called in.
        lt.Preempted: every failed rank was stopped by a preemption signal (``lt.run`` saved
            and exited), or this process received SIGTERM (which the agent passes on to the
            ranks): a ``SystemExit`` with code 128 + the signal's number, as in the ranks.

    Example:
        >>> import ltransform as lt
        >>> lt.launch(lt.world_size, devices=1)
        1

    Note:
        In a script, call it under ``if __name__ == "__main__":`` (spawned processes import it).
    """
    _check_options(devices=devices, num_nodes=num_nodes, node_rank=node_rank, max_restarts=max_restarts,
                   join_timeout=join_timeout)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"lt.launch: timeout must be a positive number of seconds or None, got {timeout!r}")
    if accelerator is not None:
        env.use_accelerator(accelerator)
    if env.on_xla():
        if num_nodes > 1:
            raise ValueError(f"lt.launch(num_nodes={num_nodes}) on XLA: {env.XLA_LAUNCH}")
        if devices > 1:
            warnings.warn(f"lt.launch(devices={devices}) on XLA runs fn in this one process: SPMD drives all "
                          f"of this host's devices from it (devices=1 says so)", RuntimeWarning, stacklevel=2)
        if timeout is not None:  # for the hosts' group, on several hosts
            os.environ["LTRANSFORM_COLLECTIVE_TIMEOUT"] = f"{timeout:g}"
        return fn(*args, **kwargs)
    outer = clusters.environment()  # an srun / mpirun task of several is launched already
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ or int(outer.get("WORLD_SIZE", "1")) > 1:
        world = int(os.environ.get("WORLD_SIZE") or outer.get("WORLD_SIZE", "1"))
        if world != devices * num_nodes:
            raise ValueError(
                f"lt.launch(devices={devices}, num_nodes={num_nodes}) was called inside a launched "
                f"process whose WORLD_SIZE is {world}; pass devices/num_nodes matching the launcher "
                f"(e.g. torchrun --nproc-per-node), or call fn directly"
            )
        if timeout is not None:  # for the group, if fn creates it
            os.environ["LTRANSFORM_COLLECTIVE_TIMEOUT"] = f"{timeout:g}"
        return fn(*args, **kwargs)
    method = start_method or ("fork" if _interactive(fn) else "spawn")
    if method not in _START_METHODS:
        raise ValueError(f"lt.launch: unknown start_method {method!r}; expected one of: "
                         f"{', '.join(map(repr, _START_METHODS))}")
    if master_port is None:
        if num_nodes > 1:
            raise ValueError("lt.launch: give master_port=... for num_nodes > 1 (every node needs the same)")
        master_port = _free_port()
    return _run_agent(fn, args, kwargs, devices, num_nodes, node_rank, master_addr, master_port,
                      method, max_restarts, join_timeout, timeout)


def _run_agent(fn, args, kwargs, devices, num_nodes, node_rank, master_addr, master_port, method,
               max_restarts, join_timeout, timeout) -> Any:
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=num_nodes,
        max_nodes=num_nodes,
        nproc_per_node=devices,
        run_id=f"ltransform-{master_addr}-{master_port}",  # the same on every node: they meet under it
        rdzv_backend="static",
        rdzv_endpoint=f"{master_addr}:{master_port}",
        rdzv_configs={"rank": node_rank, "timeout": join_timeout},
        max_restarts=max_restarts,
        start_method=method,
        monitor_interval=0.1,
    )
    with tempfile.TemporaryDirectory(prefix="ltransform-launch-") as records:
        try:
            with failures.Exits(records) as exits, failures.quiet_agent(max_restarts):
                results = elastic_launch(config, _Entry(fn, kwargs, records, timeout, forked=method == "fork"))(*args)
        except ChildFailedError as error:
            raise _launch_error(failures.gather(records, error.failures, exits), node_rank) from None
        except SignalException as error:  # the agent passed it on to the ranks and waited for them
            sig = signal.Signals(error.sigval)
            raise Preempted(f"lt.launch: received {sig.name}; the ranks were sent it too (an lt.run "
                            f"among them saved its checkpoint and stopped)", sig) from None
        except DistStoreError as error:  # the rendezvous: not every node came
            raise LaunchError(
                f"lt.launch: not every node joined at {master_addr}:{master_port} within "
                f"{join_timeout} s ({error}); call lt.launch with the same num_nodes={num_nodes}, "
                f"master_addr and master_port on every node, each with its own node_rank", {}) from None
    return results.get(0) if isinstance(results, dict) else results


class _Entry:
    """What each rank runs: ``fn``, leaving its pid and any exception where the launcher reads them."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], records: str, timeout: float | None,
                 *, forked: bool = False) -> None:
        self.fn, self.kwargs, self.records, self.timeout = fn, kwargs, records, timeout
        self.forked = forked
        self.__name__ = self.__qualname__ = getattr(fn, "__name__", "fn")  # the agent logs it

    def __call__(self, *args: Any) -> Any:
        if self.timeout is not None:  # read when the rank creates its process group
            os.environ["LTRANSFORM_COLLECTIVE_TIMEOUT"] = f"{self.timeout:g}"
        failures.started(self.records)
        if self.forked:  # OpenMP's thread pool does not survive a fork: a forked rank's first
            import torch  # multi-threaded op would wait forever for threads it does not have

            torch.set_num_threads(1)
        try:
            result = self.fn(*args, **self.kwargs)
            _check_sendable(result)
            return result
        except BaseException as error:
            if not (isinstance(error, SystemExit) and error.code in (None, 0)):
                failures.record(error, self.records)
            if not isinstance(error, SystemExit):  # the rank's own story, as a script's would print it
                prefix, frames = f"[rank{os.environ.get('RANK', '0')}]: ", error.__traceback__
                shown = "".join(traceback.format_exception(type(error), error, frames.tb_next if frames else None))
                sys.stderr.write("".join(prefix + line for line in shown.splitlines(keepends=True)))
                sys.stderr.flush()
            raise


def _check_sendable(result: Any) -> None:
    """Fail in the rank, with a reason, if its result cannot travel back to the parent."""
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps(result)
    except Exception as error:
        raise TypeError(
            f"lt.launch: the function's return value (a {type(result).__name__}) cannot be sent back to the "
            f"launching process ({error}); return plain data, e.g. tensors with .detach().cpu()"
        ) from error


def _launch_error(found: list[failures.Failure], node_rank: int) -> LaunchError | Preempted:
    """The first rank to fail and why, in one paragraph; ``Preempted`` if every failed rank was
    (stopped by lt.run on a preemption signal, or by the agent with that signal once one had)."""
    code = next((f.preempted for f in found if f.preempted), None)
    if code is not None and all(f.preempted or f.exitcode in (code, 128 - code) for f in found):
        why = next(f.reason for f in found if f.preempted).removeprefix("Preempted: ")
        return Preempted(f"lt.launch: the ranks were preempted: {why}", signal.Signals(code - 128))
    if not found:  # the agent said a rank failed, but none left a trace
        return LaunchError("lt.launch: a rank failed, and neither its exit nor an exception was recorded", {})
    return LaunchError(failures.summary(found, "lt.launch", node_rank), {f.rank: f.reason for f in found},
                       first=found[0].rank)


def _interactive(fn: Callable[..., Any]) -> bool:
    """True where spawned processes could not re-import ``__main__``: Jupyter, ``python -c``,
    ``python -`` (no script file), so the processes must be forked."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or not os.path.exists(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_options(**options: int) -> None:
    for name, value in options.items():
        low = 0 if name in ("node_rank", "max_restarts") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"lt.launch: {name} must be an int >= {low}, got {value!r}")
    if options["node_rank"] >= options["num_nodes"]:
        raise ValueError(f"lt.launch: node_rank {options['node_rank']} must be below num_nodes "
                         f"{options['num_nodes']}")
