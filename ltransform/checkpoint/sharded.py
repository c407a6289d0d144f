"""Sharded checkpoints: a ``torch.distributed.checkpoint`` (DCP) directory, each rank writing its
own shards; loadable on any number of ranks (resharding), or one process with no group.

Layout of ``DIR``: DCP's ``.metadata`` and ``*.distcp`` (models and optimizers), ``common.pt``
(counters, schedulers, extras, metadata; rank 0) and ``rank-R.pt`` (each rank's RNG states and
data position). It is written as ``.DIR.partial`` and renamed to ``DIR`` once every rank is done.
"""

from __future__ import annotations

import io
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ltransform.io import partial_path, safe_unpickler

_DCP_META = "torch.distributed.checkpoint."
# DCP warns on every call without a process group, which is what a one-process save means here
_SINGLE_PROCESS = ".*assuming the intent is to (save|load) in a single process"


def _allowed(module: str, name: str) -> bool:
    if module.startswith(_DCP_META) and (module.endswith(".metadata") or name == "_StorageInfo"):
        return True
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format))
    return (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


def reader(path: Path) -> Any:
    """A DCP ``FileSystemReader`` that reads ``.metadata`` with an allowlist of classes instead
    of a bare ``pickle.load`` (which would run whatever a crafted file asks for)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    unpickler = safe_unpickler(_allowed)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            file = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(file, "rb") as stream:
                    metadata = unpickler(stream).load()
            except pickle.UnpicklingError as error:
                raise pickle.UnpicklingError(
                    f"refusing to load the sharded checkpoint {str(path)!r}: its metadata holds "
                    f"objects other than DCP's own records ({error})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def planner(strict: bool, *, rebuild: bool = False, keys: set[str] | None = None) -> Any:
    """DCP's load planner, reading non-tensor items with ``weights_only=True``; with
    ``rebuild`` the one that builds the whole state dict from the metadata (for conversion)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    base = _EmptyStateDictLoadPlanner if rebuild else DefaultLoadPlanner

    class SafePlanner(base):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner(keys=keys) if rebuild else SafePlanner(allow_partial_load=not strict)


def checkpoint_keys(path: Path) -> set[str]:
    """The flattened keys stored in a DCP directory (``models.model.0.weight``, ...)."""
    return set(reader(path).read_metadata().state_dict_metadata)


def _no_group() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


def save_tensors(tensors: dict[str, Any], path: Path, *, async_save: bool) -> Future | None:
    """Write the model/optimizer part into the partial directory of ``path``."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
        if async_save:
            result = dcp.async_save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group())
            return getattr(result, "upload_completion", result)
        dcp.save(tensors, checkpoint_id=str(partial_path(path)), no_dist=_no_group())
    return None


def load_tensors(tensors: dict[str, Any], path: Path, *, strict: bool = True, rebuild: bool = False,
                 keys: set[str] | None = None) -> None:
    """Fill ``tensors`` from the DCP directory ``path`` (with ``rebuild``: an empty dict, filled
    in this process with everything stored, or with the subtrees named in ``keys``)."""
    import torch.distributed.checkpoint as dcp

    if rebuild:  # dcp.load keeps only the keys it was given; torch's own dcp_to_torch_save does this
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        _load_state_dict(tensors, storage_reader=reader(path),
                         planner=planner(strict, rebuild=True, keys=keys), no_dist=True)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS)
            dcp.load(tensors, storage_reader=reader(path), planner=planner(strict), no_dist=_no_group())
