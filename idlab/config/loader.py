"""Reading a study: YAML file <- command-line ``key=value`` -> a validated `StudyConfig`.

`load_study` reads the file, applies overrides such as ``lora.r=[4,8]`` or
``train.steps=50`` (values parsed as YAML) and validates every key and value before anything runs
(pydantic, `idlab.config.validation`): an error names the file, the key, the value and the
allowed keys or values. Whether the study can run at all (task name, model/task fit, model files offline) is
checked by `idlab.config.checks.check_study`, which the sweep calls before it writes anything.

Every field carries a help string (``field(metadata={"help": ...})``);
`describe_fields` prints them (``idlab sweep --help-config``) and `idlab.config.jsonschema`
writes them into the JSON Schema (``idlab schema``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import yaml
from pydantic import TypeAdapter

from idlab import methods
from idlab.config.schema import ConfigError, StudyConfig
from idlab.config.validation import describe, hidden, read
from idlab.jsontypes import JsonValue

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# --------------------------------------------------------------------------- reading


def _validate(cfg: StudyConfig, where: str) -> None:
    from idlab.config.checks import check_task

    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: key '{key}': {msg}")

    check_task(cfg, where)
    if not cfg.methods:
        raise fail("methods", f"must list at least one of {', '.join(methods.names())}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise fail("methods", f"duplicates in {list(cfg.methods)}")
    unknown = [m for m in cfg.methods if m not in methods.names()]
    if unknown:
        raise fail("methods", f"unknown method(s) {unknown}; registered methods: {', '.join(methods.names())}")
    if any(s < 0 for s in cfg.seeds):
        raise fail("seeds", f"got {list(cfg.seeds)}; every value must be >= 0")
    if not 0 < cfg.target.threshold <= 1:
        raise fail("target.threshold", f"got {cfg.target.threshold}; must be in (0, 1]")
    if cfg.target.rule == "improvement" and cfg.target.pretrained is None and not cfg.train.eval_at_start:
        raise fail("target.rule", "improvement needs the pretrained score: set train.eval_at_start: true (the "
                   "step-0 evaluation of every run) or target.pretrained (a fixed value)")
    for name in cfg.methods:
        m = methods.get(name)
        settings = cfg.settings(name)
        m.check(settings, where)
        if any(not lr > 0 for lr in m.learning_rates(settings)):
            raise fail(f"{name}.lr", f"got {list(m.learning_rates(settings))}; learning rates must be > 0")
    # train.* values are checked by TrainConfig itself (its __post_init__), when it is built


def parse_override(text: str) -> tuple[str, object]:
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


def _set_dotted(raw: dict[str, object], key: str, value: object) -> None:
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


def study_from_dict(raw: Mapping[str, object], where: str = "<dict>") -> StudyConfig:
    """Build and validate a `StudyConfig` from a plain mapping (``where`` names the source in errors).

    A top-level key naming a registered method is that method's block (its ``settings_type``).
    """
    raw = dict(raw)
    blocks: dict[str, object] = {name: read(methods.get(name).settings_type, raw.pop(name), where, name, methods.get(name).renamed)
              for name in methods.names() if name in raw}
    cfg: StudyConfig = dataclasses.replace(read(StudyConfig, raw, where), method_settings=blocks)
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


def to_dict(cfg: object) -> JsonValue:
    """A dataclass config as plain JSON-able data (tuples -> lists); a study's method blocks are
    top-level keys named by their method (every registered method, so study.json is complete)."""
    if isinstance(cfg, StudyConfig):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "method_settings"}
        return {**out, **{name: to_dict(cfg.settings(name)) for name in methods.names()}}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cast(JsonValue, cfg)  # a scalar of a config dataclass


def describe_fields(cls: type[DataclassInstance] = StudyConfig, prefix: str = "") -> list[str]:
    """One line per configurable key: ``key (type, default): help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in hidden(cls):
            continue
        key = prefix + f.name
        tp = hints[f.name]
        args = typing.get_args(tp)
        item = args[0] if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis else None
        if isinstance(item, type) and dataclasses.is_dataclass(item):  # a list of blocks (peft's entries)
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines += describe_fields(item, key + ".")
            continue
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines += describe_fields(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "-"
        lines.append(f"  {key} ({describe(TypeAdapter(tp).core_schema)}, default {to_dict(default)!r}): {f.metadata.get('help', '')}")
    if cls is StudyConfig:
        for name in methods.names():
            m = methods.get(name)
            lines.append(f"{name}: {m.help} (the method's block)")
            lines += describe_fields(m.settings_type, name + ".")
    return lines


__all__ = ["describe_fields", "load_study", "parse_override", "study_from_dict", "to_dict"]
