"""Reading a study: YAML file <- command-line ``key=value`` -> a validated `StudyConfig`.

`load_study` reads the file, applies overrides such as ``lora.r=[4,8]`` or
``train.steps=50`` (values parsed as YAML), converts every value to the type its
dataclass field declares (`_coerce`) and checks every key and value before anything
runs: an error names the file, the key and the allowed keys or values. Whether the
study can run at all (task name, model/task fit, model files offline) is checked by
`idlab.config.checks.check_study`, which the sweep calls before it writes anything.

Every field carries a help string (``field(metadata={"help": ...})``);
`describe_fields` prints them (``idlab sweep --help-config``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from idlab import methods
from idlab.config.schema import (
    PER_RUN_TRAIN_FIELDS,
    ConfigError,
    StudyConfig,
    TrainConfig,
)

# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': {msg}")


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming key and allowed values."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, key, f"must not be null; expected {_type_name(tp)}")
        errors = []
        # try Literal alternatives first so that 'auto' beats a tuple of ints
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise _fail(where, key, f"got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise _fail(where, key, f"got {value!r}; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if len(_rest) >= 1 and _rest[0] is not Ellipsis:  # a fixed-length tuple such as betas
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(items) != len(typing.get_args(tp)):
                raise _fail(where, key, f"got {value!r}; expected {len(typing.get_args(tp))} values")
            return tuple(_coerce(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(typing.get_args(tp), items)))
        if value is None:
            raise _fail(where, key, f"must not be null; expected {_type_name(tp)}")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise _fail(where, key, "must not be an empty list")
        return tuple(_coerce(inner, v, f"{key}[{i}]", where) for i, v in enumerate(items))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, key, f"got {value!r}; allowed values: true, false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, key, f"got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except (TypeError, ValueError):
                raise _fail(where, key, f"got {value!r}; expected a number") from None
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise _fail(where, key, f"got {value!r}; expected a string")
        return str(value)
    raise _fail(where, key, f"unsupported field type {tp}")  # pragma: no cover


def _build(cls: Any, raw: Any, path: str, where: str, renamed: Mapping[str, str] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    per_run = PER_RUN_TRAIN_FIELDS if cls is TrainConfig else {}
    renamed = renamed or {}
    if isinstance(raw, (str, int)) and not isinstance(raw, bool) and "name" in fields:
        raw = {"name": raw}  # `model: smollm2-135m` == `model: {name: smollm2-135m}`
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(where, path or "<top>", f"expected a mapping with keys {', '.join(fields)}, got {raw!r}")
    kwargs = {}
    for k, v in raw.items():
        full = f"{path}.{k}" if path else str(k)
        if k in per_run:
            raise _fail(where, full, f"is set per run, not in the train block; use {per_run[k]}")
        if k in renamed and k not in fields:
            raise _fail(where, full, f"was renamed: use {renamed[k]}")
        if k not in fields:
            raise _fail(where, full, f"unknown key; allowed keys{' under ' + repr(path) if path else ''}: "
                        + ", ".join(f for f in fields if f not in per_run))
        parse = fields[k].metadata.get("parse")  # a field's own reader (e.g. LoRA target-set aliases)
        if parse is not None:
            try:
                v = parse(v)
            except ValueError as e:
                msg = str(e)  # "[i]: why" names an item of the value
                idx, sep, rest = msg.partition("]: ") if msg.startswith("[") else ("", "", msg)
                raise _fail(where, full + (idx + "]" if sep else ""), rest) from None
        kwargs[k] = _coerce(hints[k], v, full, where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise _fail(where, path or "<top>", str(e)) from None
    return obj


def _validate(cfg: StudyConfig, where: str) -> None:
    from idlab.config.checks import check_task

    check_task(cfg, where)
    if not cfg.methods:
        raise _fail(where, "methods", f"must list at least one of {', '.join(methods.names())}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise _fail(where, "methods", f"duplicates in {list(cfg.methods)}")
    unknown = [m for m in cfg.methods if m not in methods.names()]
    if unknown:
        raise _fail(where, "methods", f"unknown method(s) {unknown}; registered methods: {', '.join(methods.names())}")
    if any(s < 0 for s in cfg.seeds):
        raise _fail(where, "seeds", f"got {list(cfg.seeds)}; every value must be >= 0")
    if not 0 < cfg.target.threshold <= 1:
        raise _fail(where, "target.threshold", f"got {cfg.target.threshold}; must be in (0, 1]")
    for name in cfg.methods:
        m = methods.get(name)
        settings = cfg.settings(name)
        m.check(settings, where)
        if any(not lr > 0 for lr in m.learning_rates(settings)):
            raise _fail(where, f"{name}.lr", f"got {list(m.learning_rates(settings))}; learning rates must be > 0")
    # train.* values are checked by TrainConfig itself (its __post_init__), when it is built


def parse_override(text: str) -> tuple[str, Any]:
    """``'lora.r=[4,8]'`` -> ``('lora.r', [4, 8])`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value (e.g. train.steps=50)")
    key, _, val = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(val) if val.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: key '{key}': value {val!r} is not valid YAML ({e})") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str) and p in ("model", "task"):
            nxt = {"name": nxt}
        if not isinstance(nxt, dict):
            nxt = {}
        node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def study_from_dict(raw: Mapping[str, Any], where: str = "<dict>") -> StudyConfig:
    """Build and validate a `StudyConfig` from a plain mapping (``where`` names the source in errors).

    A top-level key naming a registered method is that method's block (its ``settings_type``).
    """
    raw = dict(raw)
    blocks = {}
    for name in methods.names():
        if name in raw:
            m = methods.get(name)
            blocks[name] = _build(m.settings_type, raw.pop(name), name, where, m.renamed)
    cfg: StudyConfig = _build(StudyConfig, raw, "", where)
    cfg = dataclasses.replace(cfg, method_settings=blocks)
    _validate(cfg, where)
    return cfg


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study YAML file, apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: unknown key or invalid value (message names file, key, allowed values),
            or a missing/unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(raw, k, v)
    where = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return study_from_dict(raw, where)


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain JSON-able data (tuples -> lists); a study's method blocks are
    top-level keys named by their method (every registered method, so study.json is complete)."""
    if isinstance(cfg, StudyConfig):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "method_settings"}
        return {**out, **{name: to_dict(cfg.settings(name)) for name in methods.names()}}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def describe_fields(cls: Any = StudyConfig, prefix: str = "") -> list[str]:
    """One line per configurable key: ``key (type, default): help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (cls is TrainConfig and f.name in PER_RUN_TRAIN_FIELDS) or f.metadata.get("internal"):
            continue
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines += describe_fields(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "-"
        lines.append(f"  {key} ({_type_name(tp)}, default {to_dict(default)!r}): {f.metadata.get('help', '')}")
    if cls is StudyConfig:
        for name in methods.names():
            m = methods.get(name)
            lines.append(f"{name}: {m.help} (the method's block)")
            lines += describe_fields(m.settings_type, name + ".")
    return lines


__all__ = ["describe_fields", "load_study", "parse_override", "study_from_dict", "to_dict"]
