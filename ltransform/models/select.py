"""Choosing submodules by name: names and glob patterns, or a predicate ``(name, module) -> bool``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch

Selector = Callable[[str, torch.nn.Module], bool]


def selector(spec: Any, *, call: str, option: str, default: bool) -> Selector:
    """``spec`` as a predicate: None selects ``default``; a callable is used as it is; a name,
    pattern or iterable of them matches module names with ``fnmatch`` globs."""
    if spec is None:
        return lambda name, module: default
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) or not isinstance(spec, Iterable) else list(spec)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{call}: {option} must be names/patterns or a predicate (name, module) -> bool, "
                        f"got {spec!r}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)
