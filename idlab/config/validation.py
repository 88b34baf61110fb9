"""Validation of a study file's blocks by pydantic: the frozen stdlib dataclasses of the schema
(`idlab.config.schema`, each method's ``settings_type``) read through a `pydantic.TypeAdapter`.

The adapter's config (``extra="forbid"``: an unknown key is an error) reaches the nested
dataclasses, which have no config of their own; `_tune` adjusts the core schema pydantic builds
to a study file's rules (strict bools and ints, one-item lists, block shortcuts, the ``parse``
field hook, hidden fields) and says what the JSON Schema accepts where it reads more than the
type (`idlab.config.jsonschema`). `_config_error` turns pydantic's first error into a
`ConfigError` naming the file, the dotted key, the value, the allowed keys or values and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import ConfigDict, GetCoreSchemaHandler, TypeAdapter, ValidationError
from pydantic_core import CoreSchema
from pydantic_core import core_schema as cs

from idlab import methods
from idlab.config.schema import PER_RUN_TRAIN_FIELDS, ConfigError, StudyConfig, TrainConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")

#: a float written 1e-3 (no dot) is a string to YAML 1.1
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false", "none": "null"}


def hidden(cls: type[DataclassInstance]) -> set[str]:
    """Fields of ``cls`` a study file may not set: internal ones and the train block's per-run ones."""
    per_run = set(PER_RUN_TRAIN_FIELDS) if cls is TrainConfig else set()
    return per_run | {f.name for f in dataclasses.fields(cls) if f.metadata.get("internal")}


def _before(fn: Callable[[object], object], schema: CoreSchema, *accepts: CoreSchema) -> CoreSchema:
    """``fn`` applied before ``schema``; ``accepts``: what the JSON Schema lets through (``fn``'s input)."""
    return cs.no_info_before_validator_function(fn, schema, json_schema_input_schema=cs.union_schema([*accepts]))


def _listify(v: object) -> object:
    return v if v is None or isinstance(v, (list, tuple)) else [v]  # lora.r: 4 == lora.r: [4]


def _number(v: object) -> object:
    return float(v) if isinstance(v, str) and re.match(_NUMBER, v) else v


def _text(v: object) -> object:
    return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v  # lora_alpha: 16


def _list_field(cls: type[DataclassInstance]) -> str | None:
    """The field a block given as a list fills (``metadata["list_block"]``: ``peft: [{method: vera}]``)."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("list_block")), None)


def _block(cls: type[DataclassInstance]) -> Callable[[object], object]:
    listed = _list_field(cls)

    def read(v: object) -> object:
        if v is None:  # an empty block (`lora:`) is the defaults
            return {}
        if listed and isinstance(v, (list, tuple)):
            return {listed: v}
        named = isinstance(v, (str, int)) and not isinstance(v, bool) and "name" in cls.__dataclass_fields__
        return {"name": v} if named else v  # `model: smollm2-135m` == `model: {name: smollm2-135m}`

    return read


def describe(schema: Any) -> str:
    """A core schema in words: ``list of an integer or 'auto'``."""
    kind = schema["type"]
    if kind == "literal":
        return " | ".join(map(repr, schema["expected"]))
    if kind == "union":
        return " or ".join(describe(c[0] if isinstance(c, tuple) else c) for c in schema["choices"])
    if kind == "nullable":
        return describe(schema["schema"]) + " or null"
    if kind == "tuple":
        return "list of " + describe(schema["items_schema"][0])
    if kind in ("default", "function-before"):
        return describe(schema["schema"])
    return "mapping" if kind == "dataclass" else _NAMES.get(kind, kind)


def _tune(schema: Any, defs: Mapping[str, Any]) -> Any:
    """A study file's rules on a pydantic core schema (a new schema; pydantic's lax mode otherwise).

    true/false only for bools, integers only for ints (strict: no "yes" or 1.0 coercion), a
    number-like string for a float, a number for a string; a scalar where a list is expected is a
    one-item list, an empty list is refused; a block may be null (its defaults) or, with a
    ``name`` field, that name; a field's ``metadata["parse"]`` reads its value first; hidden
    fields are not accepted; a union fails as a whole ("expected ... or ..."). A reference to
    ``defs`` (a dataclass used twice) is replaced by a copy of its definition.
    """
    if isinstance(schema, (list, tuple)):
        return type(schema)(_tune(s, defs) for s in schema)
    if not isinstance(schema, dict) or "type" not in schema:
        return schema
    kind = schema["type"]
    if kind == "definition-ref":
        return _tune({k: v for k, v in defs[schema["schema_ref"]].items() if k != "ref"}, defs)
    s = {k: v if k in ("default", "metadata", "config", "serialization") else _tune(v, defs)
         for k, v in schema.items()}
    if kind in ("bool", "int"):
        return {**s, "strict": True}
    if kind == "float":
        return _before(_number, {**s, "strict": True}, s, cs.str_schema(pattern=_NUMBER))
    if kind == "str":
        return _before(_text, s, s, cs.float_schema())
    if kind == "tuple" and "variadic_item_index" in s:
        s["min_length"] = 1
        return _before(_listify, s, s, s["items_schema"][0])
    if kind == "union":
        return {**s, "custom_error_type": "union_type", "custom_error_message": f"expected {describe(schema)}"}
    if kind == "dataclass":
        cls, fields = s["cls"], []
        for f in s["schema"]["fields"]:
            parse = cls.__dataclass_fields__[f["name"]].metadata.get("parse")  # e.g. LoRA target-set aliases
            if parse is not None:
                inner = f["schema"]
                f = {**f, "schema": {**inner, "schema": cs.no_info_before_validator_function(parse, inner["schema"])}
                     if inner["type"] == "default" else cs.no_info_before_validator_function(parse, inner)}
            fields.append({**f, "init": False} if f["name"] in hidden(cls) else f)
        s["schema"] = {**s["schema"], "fields": fields}
        names = [cs.str_schema()] if "name" in cls.__dataclass_fields__ else []
        listed = [cs.list_schema()] if _list_field(cls) else []
        return _before(_block(cls), s, s, cs.none_schema(), *names, *listed)
    return s


class _StudyFile:
    """``Annotated`` marker: the schema of a dataclass as a study file reads it (`_tune`)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # a dataclass takes no config argument, `source | None` does: nested stdlib dataclasses
        # (which have no config of their own) take it, so an unknown key anywhere is an error
        schema: Any = TypeAdapter(source | None, config=ConfigDict(extra="forbid")).core_schema
        defs = {}
        if schema["type"] == "definitions":  # a dataclass used twice is defined once, by reference
            defs, schema = {d["ref"]: d for d in schema["definitions"]}, schema["schema"]
        return typing.cast(CoreSchema, _tune(schema["schema"], defs))  # the dataclass inside the nullable


@cache
def adapter(cls: type[D]) -> TypeAdapter[D]:
    """The `pydantic.TypeAdapter` reading a study-file block of dataclass ``cls``."""
    marked: Any = Annotated[cls, _StudyFile()]  # a special form: TypeAdapter takes it, mypy cannot type it
    adapted: TypeAdapter[D] = TypeAdapter(marked)
    return adapted


def _key(loc: Sequence[int | str]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _owner(cls: type[DataclassInstance], loc: Sequence[int | str]) -> type[DataclassInstance]:
    """The dataclass of the block at ``loc`` inside ``cls``."""
    for part in loc:
        if isinstance(part, str):
            cls = typing.get_type_hints(cls)[part]
    return cls


def _keys(cls: type[DataclassInstance]) -> list[str]:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in hidden(cls)]
    return names + list(methods.names()) if cls is StudyConfig else names


_EXPECTED = {"bool_type": "allowed values: true, false", "int_type": "expected an integer",
             "float_type": "expected a number", "string_type": "expected a string", "tuple_type": "expected a list",
             "too_short": "expected at least {min_length} value(s)", "too_long": "expected at most {max_length} values"}


def _config_error(e: ValidationError, cls: type[DataclassInstance], where: str, prefix: str = "",
                  renamed: Mapping[str, str] | None = None) -> ConfigError:
    """A pydantic error on block ``cls`` (at key ``prefix``) as a ConfigError naming key, value and fix."""
    err = e.errors(include_url=False)[0]
    loc, kind, value, ctx = err["loc"], err["type"], err["input"], err.get("ctx", {})
    key = _key(((prefix,) if prefix else ()) + tuple(loc))
    listed = _list_field(cls)
    if prefix and listed and key.startswith(f"{prefix}.{listed}["):  # a block given as a list: peft[0].lr
        key = prefix + key.removeprefix(f"{prefix}.{listed}")
    if kind == "unexpected_keyword_argument":
        owner, name, parent = _owner(cls, loc[:-1]), str(loc[-1]), key.rpartition(".")[0]
        if owner is TrainConfig and name in PER_RUN_TRAIN_FIELDS:
            msg = f"is set per run, not in the train block; use {PER_RUN_TRAIN_FIELDS[name]}"
        elif renamed and name in renamed and len(loc) == 1:
            msg = f"was renamed: use {renamed[name]}"
        else:
            msg = f"unknown key; allowed keys{' under ' + repr(parent) if parent else ''}: {', '.join(_keys(owner))}"
    elif kind == "value_error":  # a dataclass's own check, or a parse hook's "[i]: why" on item i
        msg = str(ctx["error"])
        if msg.startswith("[") and "]: " in msg:
            idx, msg = msg[1:].split("]: ", 1)
            key += f"[{idx}]"
    elif kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", ctx["expected"]) or [ctx["expected"]]
        msg = f"got {value!r}; allowed values: {', '.join(allowed)}"
    elif kind == "dataclass_type":
        msg = f"expected a mapping with keys {', '.join(_keys(_owner(cls, loc)))}, got {value!r}"
    elif kind == "too_short" and ctx.get("actual_length") == 0:
        msg = "must not be an empty list"
    elif kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list (train.betas) too short
        key, msg = key.rpartition("[")[0], f"got {value!r}; too few values"
    else:
        msg = f"got {value!r}; {_EXPECTED[kind].format(**ctx) if kind in _EXPECTED else err['msg']}"
    return ConfigError(f"{where}: key '{key or '<top>'}': {msg}")


def read(cls: type[D], raw: object, where: str, prefix: str = "", renamed: Mapping[str, str] | None = None) -> D:
    """Block ``raw`` (the value of key ``prefix``; ``renamed``: its old keys) as dataclass ``cls``.

    Raises:
        ConfigError: the first invalid key or value (`_config_error`).
    """
    try:
        return adapter(cls).validate_python(raw)
    except ValidationError as e:
        raise _config_error(e, cls, where, prefix, renamed) from None


__all__ = ["adapter", "describe", "hidden", "read"]
