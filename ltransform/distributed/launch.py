"""``lt.launch``: run a function on N local processes through torch's elastic agent."""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from ltransform.distributed import clusters, env
from ltransform.distributed.preemption import Preempted

_START_METHODS = ("spawn", "fork", "forkserver")


class LaunchError(RuntimeError):
    """One or more ranks of an ``lt.launch`` failed; ``failures`` maps rank to the reason."""

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


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
        *args, **kwargs: passed to ``fn``; with spawn they must be picklable.
        devices: processes per node (one per GPU; on CPU, any number).
        num_nodes: nodes taking part; every node calls ``launch`` with its ``node_rank``.
        node_rank: this node's index, 0 to ``num_nodes - 1``.
        master_addr: the address of node 0.
        master_port: a free port on node 0 (default: any free port, single node only).
        start_method: ``"spawn"``, ``"fork"`` or ``"forkserver"``; default fork where there is
            no script file to re-import (Jupyter, ``python -c``, the interactive interpreter),
            else spawn.
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

    Returns:
        What ``fn`` returned on rank 0 (None on nodes other than node 0).

    Raises:
        LaunchError: a rank failed; the message names each failed rank and its error (the
            other ranks are stopped, so nothing is left hanging). Also when not every node
            joined within ``join_timeout`` seconds.
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
    with tempfile.TemporaryDirectory(prefix="ltransform-launch-") as errors:
        try:
            results = elastic_launch(config, _Entry(fn, kwargs, errors, timeout))(*args)
        except ChildFailedError as error:
            raise _launch_error(error.failures, errors, devices * num_nodes) from None
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
    """What each rank runs: ``fn``, writing any exception where the parent will read it."""

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], errors: str, timeout: float | None) -> None:
        self.fn, self.kwargs, self.errors, self.timeout = fn, kwargs, errors, timeout
        self.__name__ = self.__qualname__ = getattr(fn, "__name__", "fn")  # the agent logs it

    def __call__(self, *args: Any) -> Any:
        if self.timeout is not None:  # read when the rank creates its process group
            os.environ["LTRANSFORM_COLLECTIVE_TIMEOUT"] = f"{self.timeout:g}"
        try:
            result = self.fn(*args, **self.kwargs)
            _check_sendable(result)
            return result
        except BaseException as error:
            path = os.path.join(self.errors, f"rank-{os.environ.get('RANK', '0')}.txt")
            with open(path, "w") as file:
                first_line = f"{type(error).__name__}: {error}".splitlines()[0]
                file.write(f"{time.time()} {first_line}\n{traceback.format_exc()}")
            raise


def _check_sendable(result: Any) -> None:
    """Fail in the rank, with a reason, if its result cannot travel back to the parent."""
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps(result)
    except Exception as error:
        raise TypeError(
            f"lt.launch: the function's return value (a {type(result).__name__}) cannot be sent back to the launching process ({error}); "
            f"return plain data, e.g. tensors with .detach().cpu()"
        ) from error


def _launch_error(failures: dict[int, Any], errors: str, world: int) -> LaunchError | Preempted:
    """Each failed rank and why, the first to fail (the likely cause) first; ``Preempted`` if
    every failed rank was (they exit with the same code)."""
    found: dict[int, tuple[float, str]] = {}
    for name in os.listdir(errors):  # ranks that raised wrote their exception here
        with open(os.path.join(errors, name)) as file:
            when, why = file.readline().rstrip("\n").split(" ", 1)
        found[int(name.removeprefix("rank-").removesuffix(".txt"))] = (float(when), why)
    for rank, failure in failures.items():
        if rank not in found:
            found[rank] = (float(getattr(failure, "timestamp", 0)), _exit_reason(failure.exitcode))
    reasons = {rank: why for rank, (_, why) in sorted(found.items(), key=lambda kv: (kv[1][0], kv[0]))}
    first, *rest = reasons
    preempted = [why for why in reasons.values() if why.startswith(f"{Preempted.__name__}: ")]
    codes = {failure.exitcode for failure in failures.values() if failure.exitcode and failure.exitcode > 128}
    if preempted and len(codes) == 1:  # the others were stopped by the agent once one had exited
        sig = signal.Signals(codes.pop() - 128)
        if all(why in preempted or why.startswith(f"killed by signal {sig.name}") for why in reasons.values()):
            return Preempted(f"lt.launch: the ranks were preempted: {preempted[0].split(': ', 1)[1]}", sig)
    lines = [f"  rank {rank}: {why}" for rank, why in reasons.items()]
    return LaunchError(
        f"lt.launch: rank {first} failed first ({len(reasons)} of {world} ranks failed; the "
        f"others were stopped):\n" + "\n".join(lines), reasons)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"killed by signal {-code} (exit code {code})"
    return f"exited with code {code} without a Python exception"


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
