"""What a checkpoint holds besides weights: counters, RNG states, the data position, schedulers,
user extras and metadata, each as tensors and plain data (loadable with ``weights_only``)."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from ltransform.core.inventory import Inventory
from ltransform.core.state import _replace, extras

FORMAT = "ltransform-checkpoint"
VERSION = 1


def metadata(*, sharded: bool, precision: str | None) -> dict[str, Any]:
    from ltransform import __version__
    from ltransform.distributed import env

    return {"format": FORMAT, "version": VERSION, "ltransform": __version__, "torch": str(torch.__version__),
            "world_size": env.world_size(), "sharded": sharded, "precision": precision,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def check_metadata(meta: Any, where: str) -> None:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{where} is not an ltransform checkpoint (no {FORMAT!r} metadata); for a file written "
            f"by plain PyTorch use lt.load_raw(path, model_or_optimizer)"
        )
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{where} has checkpoint format version {meta['version']}, newer than this "
                         f"ltransform ({VERSION}) reads; upgrade ltransform")


def optimizers(inv: Inventory) -> dict[str, tuple[torch.optim.Optimizer, torch.nn.Module, list[str]]]:
    """Each optimizer by path, with the module its parameters are named in (its model, or a
    ``ModuleDict`` of the models it spans) and each parameter's name."""
    out = {}
    for path, optimizer in inv.optimizers.items():
        try:
            module, names = inv.parameter_names(path)
        except ValueError as error:
            raise ValueError(f"checkpoint: {error}") from None
        out[path] = (optimizer, module, names)
    return out


def capture_rng() -> dict[str, Any]:
    """This process's random generators: Python, NumPy (if imported), torch CPU and CUDA."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        rng["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: Mapping[str, Any]) -> None:
    random.setstate(_tuples(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        import numpy

        n = rng["numpy"]
        numpy.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                                n["cached"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may have left lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def capture_extras(inv: Inventory) -> dict[str, Any]:
    """``state.extra``: objects with ``state_dict`` by their state, plain data as it is. Models,
    optimizers and schedulers kept in extra are saved with the others, not here again."""
    out = {}
    for key, value in inv.extras.items():
        if callable(getattr(value, "state_dict", None)):
            out[key] = {"stateful": value.state_dict()}
        elif _plain(value):
            out[key] = {"value": value}
        else:
            raise TypeError(
                f"checkpoint: state.extra[{key!r}] is a {type(value).__name__}, which has no "
                f"state_dict() and is not plain data (tensors, numbers, strings, lists, dicts); "
                f"give it state_dict/load_state_dict or keep it out of the state"
            )
    return out


def restore_extras(state: Any, saved: Mapping[str, Any]) -> Any:
    extra = dict(extras(state))
    for key, entry in saved.items():
        if "stateful" in entry:
            live = extra.get(key)
            if not callable(getattr(live, "load_state_dict", None)):
                raise RuntimeError(
                    f"lt.load: the checkpoint has state.extra[{key!r}] (an object's state_dict), but "
                    f"the state has no such object to load it into; prepare the step first "
                    f"(lt.prepare(step, state)) so that it creates it"
                )
            live.load_state_dict(entry["stateful"])
        else:
            extra[key] = entry["value"]
    return _replace(state, extra=extra) if extra != extras(state) else state


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def counters(inv: Inventory) -> dict[str, int]:
    return {"step": inv.step, "micro_step": inv.micro_step, "epoch": inv.epoch}


def restore_counters(state: Any, saved: Mapping[str, int]) -> Any:
    changes = {k: v for k, v in saved.items()
               if k != "epoch" or isinstance(state, Mapping) or hasattr(state, "epoch")}
    return _replace(state, **changes)


def optimizer_state(names: list[str], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain (unsharded) optimizer's state keyed by parameter names (:func:`optimizers`), in
    the format of torch's ``get_optimizer_state_dict``, without its trick of a zero step to
    create missing state (which allocates a gradient for every parameter)."""
    saved = optimizer.state_dict()
    return {"state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}


def load_optimizer_state(names: list[str], optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Load a state saved by :func:`optimizer_state` (or torch's FQN format) into a plain optimizer."""
    index = {name: i for i, name in enumerate(names)}
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(saved["param_groups"]):
        raise ValueError(f"lt.load: the optimizer has {len(groups)} parameter groups, the checkpoint "
                         f"{len(saved['param_groups'])}")
    optimizer.load_state_dict({
        "state": {index[name]: v for name, v in saved.get("state", {}).items() if name in index},
        "param_groups": [{**g, "params": live["params"]} for g, live in zip(saved["param_groups"], groups)],
    })
