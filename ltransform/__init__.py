"""ltransform: train PyTorch models of any size with plain functions that compose.

    import ltransform as lt
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed"), lt.accumulate(4))
    state = lt.run(step, lt.State(model=model, optimizer=optimizer), loader, max_steps=1000)

Every public name is re-exported here, flat; the modules under ``core/``, ``steps/``,
``models/``, ``runner/``, ``distributed/`` and ``checkpoint/`` are implementation. Optional
extras (bitsandbytes, Transformer Engine, torch_xla, tensorboard, wandb, mlflow) are imported
only by the functions that use them.

The names are loaded on first use (PEP 562), so ``import ltransform`` costs about a
millisecond over ``import torch`` whatever the library grows to; the ``TYPE_CHECKING`` block
below is the same list for readers and type checkers (a test keeps the two equal).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, name in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "checkpoint_sharded": ("ltransform.checkpoint.saver", "checkpoint_sharded"),
    "latest_checkpoint": ("ltransform.checkpoint.files", "latest"),
    "load": ("ltransform.checkpoint.api", "load"),
    "load_raw": ("ltransform.checkpoint.convert", "load_raw"),
    "save": ("ltransform.checkpoint.api", "save"),
    "consolidate": ("ltransform.checkpoint.convert", "consolidate"),
    "export_safetensors": ("ltransform.checkpoint.convert", "export_safetensors"),
    "CheckpointError": ("ltransform.io", "CheckpointError"),
    "compose": ("ltransform.core.compose", "compose"),
    "pipe": ("ltransform.core.compose", "pipe"),
    "Effect": ("ltransform.core.effects", "Effect"),
    "Handler": ("ltransform.core.effects", "Handler"),
    "Stage": ("ltransform.core.effects", "Stage"),
    "When": ("ltransform.core.effects", "When"),
    "backward": ("ltransform.core.effects", "backward"),
    "optimizer_step": ("ltransform.core.effects", "optimizer_step"),
    "explain": ("ltransform.core.explain", "explain"),
    "PRECISIONS": ("ltransform.core.precisions", "PRECISIONS"),
    "Precision": ("ltransform.core.precisions", "Precision"),
    "State": ("ltransform.core.state", "State"),
    "StepTransform": ("ltransform.core.step", "StepTransform"),
    "apply_step_transform": ("ltransform.core.step", "apply_step_transform"),
    "eval_step": ("ltransform.core.step", "eval_step"),
    "prepare": ("ltransform.core.step", "prepare"),
    "train_step": ("ltransform.core.step", "train_step"),
    "cluster": ("ltransform.distributed.clusters", "name"),
    "requeue": ("ltransform.distributed.clusters", "requeue"),
    "all_gather": ("ltransform.distributed.env", "all_gather"),
    "all_reduce": ("ltransform.distributed.env", "all_reduce"),
    "barrier": ("ltransform.distributed.env", "barrier"),
    "broadcast": ("ltransform.distributed.env", "broadcast"),
    "node_rank": ("ltransform.distributed.ranks", "node_rank"),
    "print": ("ltransform.distributed.ranks", "print"),
    "rank_zero_first": ("ltransform.distributed.ranks", "rank_zero_first"),
    "rank_zero_only": ("ltransform.distributed.ranks", "rank_zero_only"),
    "accelerator": ("ltransform.distributed.env", "accelerator"),
    "device": ("ltransform.distributed.env", "device"),
    "use_accelerator": ("ltransform.distributed.env", "use_accelerator"),
    "local_rank": ("ltransform.distributed.env", "local_rank"),
    "rank": ("ltransform.distributed.env", "rank"),
    "world_size": ("ltransform.distributed.env", "world_size"),
    "CollectiveError": ("ltransform.distributed.env", "CollectiveError"),
    "LaunchError": ("ltransform.distributed.launch", "LaunchError"),
    "Preempted": ("ltransform.distributed.preemption", "Preempted"),
    "Preemption": ("ltransform.distributed.preemption", "Preemption"),
    "launch": ("ltransform.distributed.launch", "launch"),
    "STRATEGIES": ("ltransform.distributed.strategies", "STRATEGIES"),
    "Strategy": ("ltransform.distributed.strategies", "Strategy"),
    "add_adapters": ("ltransform.models.adapters", "add_adapters"),
    "init_module": ("ltransform.models.init", "init_module"),
    "init_tensor": ("ltransform.models.init", "init_tensor"),
    "sync_batchnorm": ("ltransform.models.sync_batchnorm", "sync_batchnorm"),
    "materialize": ("ltransform.models.init", "materialize"),
    "MemoryEstimate": ("ltransform.models.memory", "MemoryEstimate"),
    "estimate_memory": ("ltransform.models.memory", "estimate_memory"),
    "to_precision": ("ltransform.models.precision", "to_precision"),
    "QUANTIZATIONS": ("ltransform.models.quantize", "QUANTIZATIONS"),
    "Quantization": ("ltransform.models.quantize", "Quantization"),
    "quantize": ("ltransform.models.quantize", "quantize"),
    "checkpoint_activations": ("ltransform.models.shard", "checkpoint_activations"),
    "compile": ("ltransform.models.compile", "compile"),
    "parallelize": ("ltransform.models.parallelize", "parallelize"),
    "shard": ("ltransform.models.shard", "shard"),
    "every": ("ltransform.runner.hooks", "every"),
    "every_epoch": ("ltransform.runner.hooks.lifecycle", "every_epoch"),
    "at_end": ("ltransform.runner.hooks.lifecycle", "at_end"),
    "on_exception": ("ltransform.runner.hooks.lifecycle", "on_exception"),
    "stop": ("ltransform.runner.hooks", "stop"),
    "CSVLogger": ("ltransform.runner.loggers", "CSVLogger"),
    "checkpoint_best": ("ltransform.runner.hooks.checkpoint_best", "checkpoint_best"),
    "early_stopping": ("ltransform.runner.hooks.quality", "early_stopping"),
    "memory_snapshot": ("ltransform.runner.hooks.profiling", "memory_snapshot"),
    "profile": ("ltransform.runner.hooks.profiling", "profile"),
    "lr_monitor": ("ltransform.runner.hooks.monitors", "lr_monitor"),
    "memory_monitor": ("ltransform.runner.hooks.monitors", "memory_monitor"),
    "throughput": ("ltransform.runner.hooks.monitors", "throughput"),
    "ema": ("ltransform.runner.hooks.ema", "ema"),
    "ema_weights": ("ltransform.runner.hooks.ema", "ema_weights"),
    "describe_checkpoint": ("ltransform.checkpoint.describe", "describe"),
    "TensorBoardLogger": ("ltransform.runner.loggers", "TensorBoardLogger"),
    "WandbLogger": ("ltransform.runner.loggers", "WandbLogger"),
    "MLflowLogger": ("ltransform.runner.loggers", "MLflowLogger"),
    "run": ("ltransform.runner.run", "run"),
    "evaluate": ("ltransform.runner.evaluate", "evaluate"),
    "predict": ("ltransform.runner.predict", "predict"),
    "find_lr": ("ltransform.runner.lr_finder", "find_lr"),
    "find_batch_size": ("ltransform.runner.batch_size", "find_batch_size"),
    "LRFinding": ("ltransform.runner.lr_finder", "LRFinding"),
    "seed_everything": ("ltransform.seed", "seed_everything"),
    "accumulate": ("ltransform.steps.accumulate", "accumulate"),
    "clip_gradients": ("ltransform.steps.clip", "clip_gradients"),
    "distribute": ("ltransform.steps.distribute", "distribute"),
    "no_backward_sync": ("ltransform.distributed.no_sync", "no_backward_sync"),
    "NonFiniteError": ("ltransform.steps.guard", "NonFiniteError"),
    "guard_nonfinite": ("ltransform.steps.guard", "guard_nonfinite"),
    "with_precision": ("ltransform.steps.precision", "with_precision"),
    "autocast": ("ltransform.steps.autocast", "autocast"),
}

# spelled out (not sorted(_EXPORTS)) so type checkers and linters can read it; a test keeps it equal
__all__ = [
    "CSVLogger", "CheckpointError", "CollectiveError", "Effect", "Handler", "LRFinding", "LaunchError",
    "MLflowLogger", "MemoryEstimate", "NonFiniteError", "PRECISIONS", "Precision", "Preempted", "Preemption",
    "QUANTIZATIONS", "Quantization", "STRATEGIES", "Stage", "State", "StepTransform", "Strategy",
    "TensorBoardLogger", "WandbLogger", "When", "accelerator", "accumulate", "add_adapters", "all_gather",
    "all_reduce", "apply_step_transform", "at_end", "autocast", "backward", "barrier", "broadcast",
    "checkpoint_activations", "checkpoint_best", "checkpoint_sharded", "clip_gradients", "cluster", "compile",
    "compose", "consolidate", "describe_checkpoint", "device", "distribute", "early_stopping", "ema",
    "ema_weights", "estimate_memory", "eval_step", "evaluate", "every", "every_epoch", "explain",
    "export_safetensors", "find_batch_size", "find_lr", "guard_nonfinite", "init_module", "init_tensor",
    "latest_checkpoint", "launch", "load", "load_raw", "local_rank", "lr_monitor", "materialize",
    "memory_monitor", "memory_snapshot", "no_backward_sync", "node_rank", "on_exception", "optimizer_step",
    "parallelize", "pipe", "predict", "prepare", "print", "profile", "quantize", "rank", "rank_zero_first",
    "rank_zero_only", "requeue", "run", "save", "seed_everything", "shard", "stop", "sync_batchnorm",
    "throughput", "to_precision", "train_step", "use_accelerator", "with_precision", "world_size",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name in ("core", "steps", "models", "runner", "distributed", "checkpoint", "examples", "cli"):
        return importlib.import_module(f"ltransform.{name}")
    if name == "plans":  # lt.plans.gpt, lt.plans.llama: ready tensor-parallel plans
        return importlib.import_module("ltransform.models.plans")
    raise AttributeError(f"module 'ltransform' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from ltransform.checkpoint.saver import checkpoint_sharded
    from ltransform.checkpoint.files import latest as latest_checkpoint
    from ltransform.checkpoint.api import load
    from ltransform.checkpoint.convert import load_raw
    from ltransform.checkpoint.api import save
    from ltransform.checkpoint.convert import consolidate
    from ltransform.checkpoint.convert import export_safetensors
    from ltransform.io import CheckpointError
    from ltransform.core.compose import compose
    from ltransform.core.compose import pipe
    from ltransform.core.effects import Effect
    from ltransform.core.effects import Handler
    from ltransform.core.effects import Stage
    from ltransform.core.effects import When
    from ltransform.core.effects import backward
    from ltransform.core.effects import optimizer_step
    from ltransform.core.explain import explain
    from ltransform.core.precisions import PRECISIONS
    from ltransform.core.precisions import Precision
    from ltransform.core.state import State
    from ltransform.core.step import StepTransform
    from ltransform.core.step import apply_step_transform
    from ltransform.core.step import eval_step
    from ltransform.core.step import prepare
    from ltransform.core.step import train_step
    from ltransform.distributed.clusters import name as cluster
    from ltransform.distributed.clusters import requeue
    from ltransform.distributed.env import all_gather
    from ltransform.distributed.env import all_reduce
    from ltransform.distributed.env import barrier
    from ltransform.distributed.env import broadcast
    from ltransform.distributed.ranks import node_rank
    from ltransform.distributed.ranks import print
    from ltransform.distributed.ranks import rank_zero_first
    from ltransform.distributed.ranks import rank_zero_only
    from ltransform.distributed.env import accelerator
    from ltransform.distributed.env import device
    from ltransform.distributed.env import use_accelerator
    from ltransform.distributed.env import local_rank
    from ltransform.distributed.env import rank
    from ltransform.distributed.env import world_size
    from ltransform.distributed.env import CollectiveError
    from ltransform.distributed.launch import LaunchError
    from ltransform.distributed.preemption import Preempted
    from ltransform.distributed.preemption import Preemption
    from ltransform.distributed.launch import launch
    from ltransform.distributed.strategies import STRATEGIES
    from ltransform.distributed.strategies import Strategy
    from ltransform.models.adapters import add_adapters
    from ltransform.models.init import init_module
    from ltransform.models.init import init_tensor
    from ltransform.models.sync_batchnorm import sync_batchnorm
    from ltransform.models.init import materialize
    from ltransform.models.memory import MemoryEstimate
    from ltransform.models.memory import estimate_memory
    from ltransform.models.precision import to_precision
    from ltransform.models.quantize import QUANTIZATIONS
    from ltransform.models.quantize import Quantization
    from ltransform.models.quantize import quantize
    from ltransform.models.shard import checkpoint_activations
    from ltransform.models.compile import compile
    from ltransform.models.parallelize import parallelize
    from ltransform.models.shard import shard
    from ltransform.runner.hooks import every
    from ltransform.runner.hooks.lifecycle import at_end
    from ltransform.runner.hooks.lifecycle import every_epoch
    from ltransform.runner.hooks.lifecycle import on_exception
    from ltransform.runner.hooks import stop
    from ltransform.checkpoint.describe import describe as describe_checkpoint
    from ltransform.runner.loggers import CSVLogger
    from ltransform.runner.hooks.checkpoint_best import checkpoint_best
    from ltransform.runner.hooks.quality import early_stopping
    from ltransform.runner.hooks.profiling import memory_snapshot
    from ltransform.runner.hooks.profiling import profile
    from ltransform.runner.hooks.monitors import lr_monitor
    from ltransform.runner.hooks.monitors import memory_monitor
    from ltransform.runner.hooks.monitors import throughput
    from ltransform.runner.hooks.ema import ema
    from ltransform.runner.hooks.ema import ema_weights
    from ltransform.runner.loggers import MLflowLogger
    from ltransform.runner.loggers import TensorBoardLogger
    from ltransform.runner.loggers import WandbLogger
    from ltransform.runner.run import run
    from ltransform.runner.evaluate import evaluate
    from ltransform.runner.predict import predict
    from ltransform.runner.lr_finder import LRFinding
    from ltransform.runner.batch_size import find_batch_size
    from ltransform.runner.lr_finder import find_lr
    from ltransform.seed import seed_everything
    from ltransform.steps.accumulate import accumulate
    from ltransform.steps.clip import clip_gradients
    from ltransform.steps.distribute import distribute
    from ltransform.distributed.no_sync import no_backward_sync
    from ltransform.steps.guard import NonFiniteError
    from ltransform.steps.guard import guard_nonfinite
    from ltransform.steps.precision import with_precision
    from ltransform.steps.autocast import autocast
