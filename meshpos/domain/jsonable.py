"""The one encoder of typed values (dataclasses) to JSON-ready objects.

Dataclasses become objects with one member per field, in field order; tuples and lists become
arrays; mappings become objects. A field whose metadata says ``omit_if_none`` is left out while it
is None (a part of a status that only some nodes have, such as the dashboard); a field whose
metadata names an ``encode`` function is written by it (a compact format of its own)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

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
