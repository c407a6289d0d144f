"""Composition: ``pipe``, ``compose`` and the partial form of every transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()


class Partial:
    """A transform with its options bound, waiting for its subject (a model or a step).

    Built when a transform is called without its subject: ``lt.accumulate(4)``. Options are
    validated when it is built, not when it is applied.
    """

    __slots__ = ("_apply", "_text")

    def __init__(self, apply: Callable[[Any], Any], text: str) -> None:
        self._apply = apply
        self._text = text

    def __call__(self, subject: Any) -> Any:
        return self._apply(subject)

    def __repr__(self) -> str:
        return f"lt.{self._text}"


def pipe(subject: Any, /, *fns: Callable[[Any], Any]) -> Any:
    """Apply ``fns`` to ``subject`` left to right: ``pipe(x, f, g) == g(f(x))``.

    Example:
        >>> import ltransform as lt
        >>> lt.pipe(3, lambda x: x + 1, lambda x: x * 10)
        40
    """
    _check_callables("pipe", fns, offset=2)
    for fn in fns:
        subject = fn(subject)
    return subject


def compose(*fns: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One function applying ``fns`` left to right: ``compose(f, g)(x) == g(f(x))``.

    Example:
        >>> import ltransform as lt
        >>> lt.compose(lambda x: x + 1, lambda x: x * 10)(3)
        40
    """
    _check_callables("compose", fns, offset=1)

    def composed(subject: Any) -> Any:
        for fn in fns:
            subject = fn(subject)
        return subject

    composed.__name__ = "compose(" + ", ".join(_name(f) for f in fns) + ")"
    return composed


def _check_callables(call: str, fns: tuple[Any, ...], offset: int) -> None:
    for i, fn in enumerate(fns):
        if not callable(fn):
            raise TypeError(
                f"{call}: argument {i + offset} is not callable (got {type(fn).__name__} "
                f"{fn!r}); pass transforms in their partial form, e.g. lt.accumulate(4)"
            )


def _name(fn: Any) -> str:
    return repr(fn) if isinstance(fn, Partial) else getattr(fn, "__name__", repr(fn))


def describe_options(name: str, **options: Any) -> str:
    """``name(k=v, ...)`` for reprs and error messages, options left at None omitted."""
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
    return f"{name}({shown})"
