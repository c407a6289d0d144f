"""ltransform: train PyTorch models of any size with plain functions that compose.

    import ltransform as lt
    step = lt.pipe(lt.train_step(loss_fn), lt.with_precision("bf16-mixed"), lt.accumulate(4))
    state = lt.run(step, lt.State(model=model, optimizer=optimizer), loader, max_steps=1000)

Every public name is re-exported here, flat; the modules under ``core/``, ``steps/``,
``models/`` and ``runner/`` are implementation. Optional extras (bitsandbytes, Transformer
Engine, torch_xla, tensorboard, wandb, mlflow) are imported only by the functions that use them.
"""

from ltransform.checkpoint.api import checkpoint_sharded
from ltransform.checkpoint.api import latest as latest_checkpoint
from ltransform.checkpoint.api import load
from ltransform.checkpoint.api import load_raw
from ltransform.checkpoint.api import save
from ltransform.checkpoint.convert import consolidate
from ltransform.checkpoint.convert import export_safetensors
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
from ltransform.distributed.env import all_gather
from ltransform.distributed.env import all_reduce
from ltransform.distributed.env import barrier
from ltransform.distributed.env import broadcast
from ltransform.distributed.env import device
from ltransform.distributed.env import local_rank
from ltransform.distributed.env import rank
from ltransform.distributed.env import world_size
from ltransform.distributed.launch import LaunchError
from ltransform.distributed.launch import launch
from ltransform.distributed.strategies import STRATEGIES
from ltransform.distributed.strategies import Strategy
from ltransform.models.init import init_module
from ltransform.models.init import materialize
from ltransform.models.precision import to_precision
from ltransform.models.shard import checkpoint_activations
from ltransform.models.shard import shard
from ltransform.runner.hooks import every
from ltransform.runner.hooks import stop
from ltransform.runner.loggers import CSVLogger
from ltransform.runner.loggers import TensorBoardLogger
from ltransform.runner.run import run
from ltransform.seed import seed_everything
from ltransform.steps.accumulate import accumulate
from ltransform.steps.clip import clip_gradients
from ltransform.steps.distribute import distribute
from ltransform.steps.precision import with_precision

__version__ = "0.1.0"
