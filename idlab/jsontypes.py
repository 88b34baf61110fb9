"""Types of JSON content: result.json, run configs, metadata (`json.load` / `json.dumps`).

`JsonValue` is what `json.load` returns (and what `json.dumps` writes, with tuples for lists);
`JsonObject` is a JSON object. Functions that only read a mapping take ``Mapping[str, object]``.
"""

from __future__ import annotations

from typing import SupportsFloat, SupportsIndex, SupportsInt, TypeAlias

#: a JSON scalar
JsonScalar: TypeAlias = str | int | float | bool | None
#: any JSON value (recursive)
JsonValue: TypeAlias = "str | int | float | bool | list[JsonValue] | tuple[JsonValue, ...] | dict[str, JsonValue] | None"
#: a JSON object
JsonObject: TypeAlias = "dict[str, JsonValue]"



def as_int(v: object) -> int:
    """``int(v)`` of a value read from JSON (TypeError, as `int` raises, for a value it does not take)."""
    if isinstance(v, (str, bytes, SupportsInt, SupportsIndex)):
        return int(v)
    raise TypeError(f"int() argument must be a string, a bytes-like object or a real number, not '{type(v).__name__}'")


def as_float(v: object) -> float:
    """``float(v)`` of a value read from JSON (TypeError, as `float` raises, for a value it does not take)."""
    if isinstance(v, (str, bytes, SupportsFloat, SupportsIndex)):
        return float(v)
    raise TypeError(f"float() argument must be a string or a real number, not '{type(v).__name__}'")


__all__ = ["JsonObject", "JsonScalar", "JsonValue", "as_float", "as_int"]
