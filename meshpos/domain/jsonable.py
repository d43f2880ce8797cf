"""The one encoder of typed values (dataclasses) to JSON-ready objects.

Dataclasses become objects with one member per field, in field order; tuples and lists become
arrays; mappings become objects. A field whose metadata says ``omit_if_none`` is left out while it
is None (a part of a status that only some nodes have, such as the dashboard); a field whose
metadata names an ``encode`` function is written by it (a compact format of its own).
``from_jsonable`` reads a request or answer body back into its dataclass, checking each member."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from meshpos.domain.errors import InputError

T = TypeVar("T")

OMIT_IF_NONE = {"omit_if_none": True}


def to_jsonable(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: f.metadata["encode"](getattr(value, f.name)) if "encode" in f.metadata
                else to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def json_object(value: object) -> dict[str, Any]:
    """A dataclass as a JSON object."""
    encoded = to_jsonable(value)
    if not isinstance(encoded, dict):
        raise TypeError(f"{type(value).__name__} does not encode to a JSON object")
    return encoded


@functools.cache
def dataclass_layout(cls: type) -> tuple[dict[str, Any], tuple[dataclasses.Field[Any], ...]]:
    """A dataclass's resolved type hints and fields, once per class (a pure function of the class,
    cached): ``get_type_hints`` compiles and evaluates every string annotation on each call, which
    made reading one status cost milliseconds, and every request body read a few hundred
    microseconds."""
    return typing.get_type_hints(cls), dataclasses.fields(cls)


def from_jsonable(cls: type[T], value: object, what: str = "the body") -> T:
    """The dataclass ``cls`` from a decoded JSON object (the inverse of :func:`to_jsonable` for
    request and answer bodies): unknown members and members of the wrong type are an InputError
    naming them; a field with a default may be left out. Field types: str, int, bool, float,
    ``X | None``, a nested dataclass, ``list[X]``, and ``Any`` (taken as it is)."""
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object")
    hints, layout = dataclass_layout(typing.cast(type, cls))  # a class is hashable; mypy cannot tell of type[T]
    fields = {f.name: f for f in layout}
    unknown = set(value) - set(fields)
    if unknown:
        raise InputError(f"{what}: unknown members {sorted(unknown)}")
    args: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"{what}: {name} is missing")
            continue
        args[name] = _decode(hints[name], value[name], f"{what}: {name}")
    return cls(**args)


def _decode(kind: Any, value: object, what: str) -> Any:
    if kind is Any:
        return value
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _decode(inner[0], value, what)
        raise TypeError(f"{what}: unions of several types are not decoded")
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"{what} must be a list")
        (item,) = typing.get_args(kind)
        return [_decode(item, v, f"{what}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return from_jsonable(kind, value, what)  # type: ignore[arg-type]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is dict or origin is dict:
        ok = isinstance(value, dict)
    else:
        raise TypeError(f"{what}: no decoder for {kind!r}")
    if not ok:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "an object")
        raise InputError(f"{what} must be {name}")
    return value
