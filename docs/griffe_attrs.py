"""A griffe extension for the API reference: attrs classes' ``__init__``; ``Example:`` sections.

griffe reads the source without importing it, and re-creates ``__init__`` for dataclasses
only. ltransform's records (``lt.State``, ``lt.Strategy``, ``lt.Handler``, ...) are
``@attrs.frozen`` classes whose docstrings list their fields under ``Args:``; without an
``__init__`` griffe warns that none of them is in the signature. This builds it from the
annotated fields, as attrs does: ``kw_only=`` of the decorator or the field, ``default=`` or
``factory=``, ``init=False`` fields left out, a leading underscore dropped from the name.

It also reads a Google-style ``Example:`` section as ``Examples:`` (griffe renders the singular
as an admonition of plain Markdown, where ``>>>`` lines become nested quotes; the plural's
doctests become code blocks). ltransform's docstrings say ``Example:``, as its style guide does.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Attribute, Class, ExprCall, Extension, Function, Module, Parameter, ParameterKind, Parameters

_DECORATORS = {"attrs.frozen", "attrs.define", "attrs.mutable", "attr.s", "attr.attrs"}
_FIELDS = {"attrs.field", "attr.ib", "attr.attrib"}
_KW_ONLY: Any = ParameterKind.keyword_only
_POSITIONAL: Any = ParameterKind.positional_or_keyword
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _call_args(expr: Any) -> dict[str, Any]:
    if not isinstance(expr, ExprCall):
        return {}
    out = {}
    for argument in expr.arguments:
        name = getattr(argument, "name", None)
        if name is not None:
            out[name] = getattr(argument, "value", None)
    return out


def _decorator(cls: Class) -> Any:
    for decorator in cls.decorators:
        value = decorator.value
        path = getattr(value, "canonical_path", None)
        if isinstance(value, ExprCall):
            path = getattr(value.function, "canonical_path", None)
        if path in _DECORATORS:
            return value
    return None


def _parameters(cls: Class, kw_only: bool) -> list[Parameter]:
    parameters = []
    for member in cls.members.values():
        if not isinstance(member, Attribute) or member.annotation is None:
            continue
        if "class-attribute" in member.labels and "instance-attribute" not in member.labels and member.value is None:
            continue
        value = member.value
        args: dict[str, Any] = {}
        if isinstance(value, ExprCall) and getattr(value.function, "canonical_path", None) in _FIELDS:
            args = _call_args(value)
            value = None
        if str(args.get("init")) == "False":
            continue
        if "factory" in args:
            value = ExprCall(function=args["factory"], arguments=[])
        elif "default" in args:
            value = args["default"]
        field_kw = kw_only or str(args.get("kw_only")) == "True"
        parameters.append(Parameter(
            str(args.get("alias", "")).strip("'\"") or member.name.lstrip("_"),
            annotation=member.annotation,
            kind=_KW_ONLY if field_kw else _POSITIONAL,
            default=value,
        ))
    return parameters


class AttrsInit(Extension):
    """Give each attrs class of the package an ``__init__`` made from its fields."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: Module | Class) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.docstring is not None:
                member.docstring.value = _EXAMPLE.sub(r"\1Examples:", member.docstring.value)
            if isinstance(member, Module):
                self._walk(member)
            elif isinstance(member, Class):
                self._walk(member)
                decorator = _decorator(member)
                if decorator is None or "__init__" in member.members:
                    continue
                kw_only = str(_call_args(decorator).get("kw_only")) == "True"
                parameters = [Parameter("self", kind=_POSITIONAL)]
                parameters += _parameters(member, kw_only)
                init = Function("__init__", lineno=0, endlineno=0, parent=member,
                                parameters=Parameters(*parameters), returns="None")
                member.set_member("__init__", init)
                member.labels.add("attrs")
