"""``ltransform estimate MODEL``: the command line of ``lt.estimate_memory`` (torch is imported only
when the command runs, so ``ltransform --help`` stays fast)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """The ``estimate`` subcommand, on ``ltransform``'s subparsers."""
    estimate = commands.add_parser(
        "estimate", help="estimate the memory per rank of a training step (nothing is allocated)",
        description="Build MODEL on the meta device, trace one training step and print what each rank "
                    "holds at its peak: parameters, buffers, gradients, optimizer state, activations, "
                    "temporary buffers (lt.estimate_memory).")
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


def named(spec: str, what: str) -> Any:
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


def shape(text: str, what: str) -> tuple[int, ...]:
    """``8x1024`` as ``(8, 1024)``."""
    try:
        sizes = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{what} must be sizes joined by x, e.g. 8x1024, got {text!r}")
    return sizes


def estimate(options: argparse.Namespace) -> Any:
    """The estimate for the command line's model, batch and options."""
    import importlib

    import torch

    from ltransform.examples import gpt
    from ltransform.models.memory import estimate_memory

    if ":" not in options.model:
        if options.model not in gpt.PRESETS:
            raise ValueError(f"MODEL must be module:callable (e.g. ltransform.examples.gpt:GPT) or a GPT preset, "
                             f"one of: {', '.join(map(repr, gpt.PRESETS))}; got {options.model!r}")
        loss_fn: Any = gpt.loss_fn
        config = gpt.preset(options.model)
        factory = lambda: gpt.GPT(config)  # noqa: E731
        default_batch: tuple[int, ...] | None = (1, config.block)
        policy = options.policy or "ltransform.examples.gpt:Block"
    else:
        factory = _factory(options.model, options.config)
        loss_fn = getattr(importlib.import_module(options.model.partition(":")[0]), "loss_fn", None)
        default_batch, policy = None, options.policy
    if options.loss is not None:
        loss_fn = named(options.loss, "--loss")
    if options.batch is None and default_batch is None:
        raise ValueError("give the per-rank batch shape: --batch 8x1024")
    sizes = shape(options.batch, "--batch") if options.batch else default_batch or ()
    dtype = getattr(torch, options.batch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--batch-dtype must be a torch dtype such as int64 or float32, got {options.batch_dtype!r}")
    x = torch.empty(sizes, dtype=dtype, device="meta")

    def classes(spec: str | None) -> set[Any] | None:
        return None if spec is None else {named(s, "a policy class") for s in spec.split(",")}

    mesh = shape(options.mesh, "--mesh") if options.mesh else None
    try:
        return estimate_memory(factory, batch=(x, x), loss_fn=loss_fn, precision=options.precision,
                               optimizer=options.optimizer, strategy=options.strategy,
                               world_size=options.world_size, mesh=mesh, policy=classes(policy),  # type: ignore[arg-type]
                               checkpoint=classes(options.checkpoint), device=options.device)
    except ValueError as error:  # the options are the command's, not the function's
        raise ValueError(str(error).removeprefix("estimate_memory: ")) from None


def _factory(spec: str, config: str | None) -> Any:
    """``() -> model`` from MODEL and --config: the keyword arguments go to the config class that
    MODEL's first argument is annotated with (an attrs class or a dataclass), else to MODEL."""
    import json

    import torch

    build = named(spec, "MODEL")
    try:
        kwargs = json.loads(config) if config else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"--config is not JSON ({error}): {config!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--config must be a JSON object of keyword arguments, got {config!r}")
    config_class = _config_class(build)

    def factory() -> torch.nn.Module:
        try:
            model = build(config_class(**kwargs)) if config_class is not None else build(**kwargs)
        except TypeError as error:  # keyword arguments MODEL or its config does not take
            raise ValueError(f"MODEL {spec} with --config {config or '{}'}: {error}") from None
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"MODEL {spec} returned {type(model).__name__}, not an nn.Module; name a model class "
                             f"or a function returning one")
        return model

    return factory


def _config_class(build: Any) -> type | None:
    """The attrs class or dataclass ``build``'s first argument is annotated with, if any."""
    import dataclasses
    import inspect
    import typing

    import attrs

    target = build.__init__ if isinstance(build, type) else build  # type: ignore[misc]
    try:
        first = next(iter(inspect.signature(build).parameters), None)
        hint = typing.get_type_hints(target).get(first) if first else None
    except (NameError, TypeError, ValueError, AttributeError):  # annotations the module cannot resolve at runtime
        return None
    if isinstance(hint, type) and (attrs.has(hint) or dataclasses.is_dataclass(hint)):
        return hint
    return None
