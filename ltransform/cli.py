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
from typing import Any


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
    _estimate_parser(commands)
    return parser


def _estimate_parser(commands: Any) -> None:
    estimate = commands.add_parser(
        "estimate", help="estimate the memory per rank of a training step (nothing is allocated)",
        description="Build MODEL on the meta device, trace one training step and print what each rank "
                    "holds at its peak: parameters, gradients, optimizer state, activations, temporary "
                    "buffers (lt.estimate_memory).")
    estimate.add_argument("model", help="module:callable returning the model (e.g. ltransform.examples.gpt:GPT), "
                                        "or a GPT preset: gpt-124m, gpt-350m, gpt-774m, gpt-1.5b")
    estimate.add_argument("--config", default=None,
                          help="JSON keyword arguments: for the config class the callable's first argument is "
                               "annotated with (e.g. GPTConfig), else for the callable itself")
    estimate.add_argument("--batch", default=None,
                          help="per-rank batch shape, e.g. 8x1024 (default: 1 x the preset's block); the batch is "
                               "(inputs, targets) of that shape")
    estimate.add_argument("--batch-dtype", default="int64", help="the batch's dtype: int64 (tokens) or float32")
    estimate.add_argument("--loss", default=None,
                          help="module:callable loss_fn(model, batch) (default: MODEL's module's loss_fn if it has "
                               "one, else the sum of the outputs)")
    estimate.add_argument("--precision", default="32-true", help="e.g. 32-true, bf16-mixed, bf16-true")
    estimate.add_argument("--optimizer", default="adamw", help="adamw, adam, sgd, sgd-momentum")
    estimate.add_argument("--strategy", default="single", help="single, ddp, fsdp or hsdp")
    estimate.add_argument("--world-size", type=int, default=1, help="ranks")
    estimate.add_argument("--mesh", default=None, help="for hsdp: REPLICASxSHARDS, e.g. 2x4")
    estimate.add_argument("--policy", default=None,
                          help="FSDP units: module:Class[,module:Class] (the presets: their Block)")
    estimate.add_argument("--checkpoint", default=None,
                          help="activation checkpointing of module:Class[,module:Class] (e.g. "
                               "ltransform.examples.gpt:Block)")
    estimate.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                          help="the device the run will use (the optimizer's kernels differ)")


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
        return _one_line("estimate", lambda: print(_estimate(options)))
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


def _named(spec: str, what: str) -> Any:
    """The object ``module:name`` names."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{what} must be module:name, e.g. ltransform.examples.gpt:GPT, got {spec!r}")
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what} {spec!r}: {error}") from None
    return found


def _shape(text: str, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"{what} must be sizes joined by x, e.g. 8x1024, got {text!r}")
    return shape


def _estimate(options: argparse.Namespace) -> Any:
    """``ltransform estimate``: the model, batch and options from the command line."""
    import dataclasses
    import importlib
    import json
    import typing

    import attrs
    import torch

    from ltransform.examples import gpt
    from ltransform.models.memory import estimate_memory

    if ":" not in options.model:
        if options.model not in gpt.PRESETS:
            raise ValueError(f"MODEL must be module:callable (e.g. ltransform.examples.gpt:GPT) or a GPT preset, "
                             f"one of: {', '.join(map(repr, gpt.PRESETS))}; got {options.model!r}")
        loss_fn: Any = gpt.loss_fn
        config, build = gpt.preset(options.model), gpt.GPT
        factory = lambda: build(config)  # noqa: E731
        default_batch: tuple[int, ...] | None = (1, config.block)
        policy = options.policy or "ltransform.examples.gpt:Block"
    else:
        build = _named(options.model, "MODEL")
        try:
            kwargs = json.loads(options.config) if options.config else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"--config is not JSON ({error}): {options.config!r}") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--config must be a JSON object of keyword arguments, got {options.config!r}")
        hints = typing.get_type_hints(build.__init__ if isinstance(build, type) else build)  # type: ignore[misc]
        config_class = next((h for n, h in hints.items() if n != "return"), None)
        if isinstance(config_class, type) and (attrs.has(config_class) or dataclasses.is_dataclass(config_class)):
            factory = lambda: build(config_class(**kwargs))  # noqa: E731
        else:
            factory = lambda: build(**kwargs)  # noqa: E731
        loss_fn = getattr(importlib.import_module(options.model.partition(":")[0]), "loss_fn", None)
        default_batch, policy = None, options.policy
    if options.loss is not None:
        loss_fn = _named(options.loss, "--loss")
    if options.batch is None and default_batch is None:
        raise ValueError("give the per-rank batch shape: --batch 8x1024")
    shape = _shape(options.batch, "--batch") if options.batch else default_batch or ()
    dtype = getattr(torch, options.batch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--batch-dtype must be a torch dtype such as int64 or float32, got {options.batch_dtype!r}")
    x = torch.empty(shape, dtype=dtype, device="meta")

    def classes(spec: str | None) -> set[Any] | None:
        return None if spec is None else {_named(s, "a policy class") for s in spec.split(",")}

    mesh = _shape(options.mesh, "--mesh") if options.mesh else None
    try:
            return estimate_memory(factory, batch=(x, x), loss_fn=loss_fn, precision=options.precision,
                               optimizer=options.optimizer, strategy=options.strategy,
                               world_size=options.world_size,
                               mesh=mesh, policy=classes(policy), checkpoint=classes(options.checkpoint),  # type: ignore[arg-type]
                               device=options.device)
    except ValueError as error:  # the options are the command's, not the function's
        raise ValueError(str(error).removeprefix("estimate_memory: ")) from None
