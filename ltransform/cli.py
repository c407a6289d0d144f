"""The ``ltransform`` command: ``ltransform run --devices N script.py ARGS`` hands over to torchrun;
``ltransform consolidate SHARDED_DIR OUT`` turns a sharded checkpoint into one file; ``ltransform
inspect CKPT`` says what a checkpoint holds; ``ltransform estimate MODEL`` estimates the memory a
training step needs per rank, before renting the devices."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltransform", description=__doc__.replace("``", ""))
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run a training script on N processes per node (through torchrun)",
        description="Run SCRIPT on --devices processes per node with torch's elastic agent "
                    "(torchrun); the script is unchanged from its single-process form. A rank that "
                    "fails makes the group restart (up to --max-restarts times; lt.run(..., "
                    "resume='latest') resumes); preempted ranks (SIGTERM: each lt.run saves and "
                    "exits) make it exit with their code, 128 + the signal's number. When a rank fails, "
                    "the last paragraph printed names the rank that failed first, its error and where "
                    "the full traceback is, and the command exits with that rank's exit code (128 + "
                    "the signal's number if a signal killed it).")
    run.add_argument("--devices", type=int, default=1, help="processes per node (one per GPU)")
    run.add_argument("--nodes", type=int, default=1, help="number of nodes")
    run.add_argument("--node-rank", type=int, default=0, help="this node's index (0 to nodes-1)")
    run.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    run.add_argument("--master-port", type=int, default=None, help="port on node 0 (any free one on one node)")
    run.add_argument("--max-restarts", type=int, default=0,
                     help="restarts of the group after a rank fails; lt.run(resume='latest') resumes")
    run.add_argument("--timeout", type=float, default=None,
                     help="seconds a collective waits for the other ranks before failing with an error "
                          "naming the rank (sets LTRANSFORM_COLLECTIVE_TIMEOUT; default torch's, 30 min)")
    run.add_argument("--accelerator", default=None,
                     help="cpu, cuda (gpu), xla (tpu), mps, xpu or auto (sets LTRANSFORM_ACCELERATOR; default: "
                          "the first available). On XLA, run the script itself instead: one process per host")
    run.add_argument("script", help="the training script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    merge = commands.add_parser(
        "consolidate", help="turn a sharded checkpoint directory into one file",
        description="Read a sharded (DCP) checkpoint in one process and write one full checkpoint "
                    "file, or only the model weights if OUT ends in .safetensors.")
    merge.add_argument("sharded_dir", help="the sharded checkpoint: a directory lt.save(..., sharded=True) wrote")
    merge.add_argument("out", help="the file to write: a full checkpoint (.pt), or the weights only (.safetensors)")
    inspect = commands.add_parser(
        "inspect", help="say what a checkpoint holds (without loading its tensors)",
        description="Print a checkpoint's format, the ltransform and torch that wrote it, world size, precision, "
                    "counters, and every tensor's name, shape, dtype and size, for a full file or a sharded "
                    "directory; tensor data is not read.")
    inspect.add_argument("checkpoint", help="a checkpoint file or sharded directory lt.save wrote")
    from ltransform.cli_estimate import add_parser

    add_parser(commands)
    return parser


def _version() -> str:
    import importlib.metadata
    import platform

    try:
        mine = importlib.metadata.version("ltransform")
    except importlib.metadata.PackageNotFoundError:
        mine = "unknown (not installed)"
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    return f"ltransform {mine} (torch {torch}, Python {platform.python_version()})"


def torchrun_args(options: argparse.Namespace) -> list[str]:
    """The torchrun command line for ``ltransform run``'s options."""
    args = [f"--nproc-per-node={options.devices}", f"--nnodes={options.nodes}",
            f"--max-restarts={options.max_restarts}"]
    if options.nodes == 1 and options.master_port is None:
        args.append("--standalone")  # a free port, chosen by torchrun
    else:
        if options.master_port is None:
            raise SystemExit("ltransform run: give --master-port for --nodes > 1 (the same on every node)")
        args += [f"--node-rank={options.node_rank}", f"--master-addr={options.master_addr}",
                 f"--master-port={options.master_port}"]
    # each rank runs the script through our worker, which records an exception for the summary
    return [*args, "--module", "ltransform.distributed.worker", options.script, *options.args]


_OUT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def _one_line(command: str, work: Callable[[], object]) -> int:
    """Run ``work``; an error the user can fix (a checkpoint that is missing, not one, corrupt; a
    file that cannot be written; an extra not installed) exits with one line, not a traceback."""
    from ltransform.io import CheckpointError

    try:
        work()
    except (CheckpointError, ValueError, OSError, ImportError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        for prefix in (f"ltransform {command}: ", f"{command}: "):  # the library's own message names it
            text = text.removeprefix(prefix)
        raise SystemExit(f"ltransform {command}: {text}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if options.command == "inspect":
        from ltransform.checkpoint.describe import describe

        return _one_line("inspect", lambda: print(describe(options.checkpoint)))
    if options.command == "estimate":
        from ltransform.cli_estimate import estimate

        return _one_line("estimate", lambda: print(estimate(options)))
    if options.command == "consolidate":
        from ltransform.checkpoint.convert import consolidate

        if Path(options.out).suffix not in _OUT_SUFFIXES:
            raise SystemExit(f"ltransform consolidate: OUT must end in {', '.join(_OUT_SUFFIXES[:-1])} (a full "
                             f"checkpoint) or .safetensors (the weights only), got {options.out!r}")
        return _one_line("consolidate",
                         lambda: print(f"wrote {consolidate(options.sharded_dir, options.out)}"))
    if options.devices < 1 or options.nodes < 1 or not 0 <= options.node_rank < options.nodes:
        raise SystemExit(f"ltransform run: need --devices >= 1, --nodes >= 1 and 0 <= --node-rank < "
                         f"--nodes, got {options.devices}, {options.nodes}, {options.node_rank}")
    if options.timeout is not None:
        if not options.timeout > 0:
            raise SystemExit(f"ltransform run: --timeout must be a positive number of seconds, got {options.timeout}")
        os.environ["LTRANSFORM_COLLECTIVE_TIMEOUT"] = f"{options.timeout:g}"  # the ranks inherit it
    from ltransform.distributed import env

    try:
        if options.accelerator is not None:
            # the ranks inherit LTRANSFORM_ACCELERATOR
            env.use_accelerator(options.accelerator, where=f"--accelerator {options.accelerator}")
        accelerator = env.accelerator()
    except (ValueError, RuntimeError, ImportError) as error:
        raise SystemExit(f"ltransform run: {error}") from None
    if accelerator == "xla" and (options.devices > 1 or options.nodes > 1):
        raise SystemExit(f"ltransform run: {env.XLA_LAUNCH}")
    return _run(options)


def _run(options: argparse.Namespace) -> int:
    """torchrun's agent, in this process, with our failure summary instead of its own."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run  # not torchrun's main: its @record logs again

    from ltransform.distributed import failures

    with tempfile.TemporaryDirectory(prefix="ltransform-run-") as records:
        os.environ[failures.DIRECTORY] = records  # the ranks inherit it
        try:
            with failures.Exits(records) as exits, failures.quiet_agent(options.max_restarts):
                run(parse_args(torchrun_args(options)))
            return 0
        except SignalException as error:  # torchrun passed it on to the ranks and waited for them
            print(f"ltransform run: received {error.sigval.name}; the ranks were sent it too", file=sys.stderr)
            return 128 + int(error.sigval)
        except ChildFailedError as error:
            reported = error.failures
            found = failures.gather(records, reported, exits)
        finally:
            del os.environ[failures.DIRECTORY]
    # preempted: a rank exited with 128 + a signal's number (lt.Preempted), and every other
    # one too, or was killed by that signal (torchrun stops the others once one has exited)
    codes = {failure.exitcode for failure in reported.values()}
    signals = {code - 128 if code > 128 else -code for code in codes}
    if len(signals) == 1 and max(codes) > 128 and 0 < next(iter(signals)) < signal.NSIG:
        print(f"ltransform run: the ranks were preempted (exit code {max(codes)})", file=sys.stderr)
        return max(codes)
    if not found:
        print(f"ltransform run: ranks {sorted(reported)} failed; no exception or exit was recorded",
              file=sys.stderr)
        return 1
    print(failures.summary(found, "ltransform run", options.node_rank), file=sys.stderr)
    return found[0].exit_status()
