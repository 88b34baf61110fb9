"""A study's *settings*: what one experiment holds fixed, as flat dotted keys.

A study folder holds one experiment: runs that differ only in their grid point (method, its
axes, learning rate) and seed. Everything else of the resolved `StudyConfig` is a **setting**:
the model and its options, the task and its options, the ``train`` block, the crossing target,
the score, and any top-level field added later. Not settings: the grid (``methods``, each
method's block of axes and learning rates, ``seeds``), where and how the runs execute
(``executor``, ``device``, ``gpus``, ``progress``, ``retry_failed``, ``results_dir``,
``slurm``), the folder's own ``name`` and its ``description`` (`NOT_SETTINGS`), and the
per-run fields of the train block (``train.lr``, ``train.seed``, ``train.device``,
``train.progress``: `idlab.config.schema.PER_RUN_TRAIN_FIELDS`).

Keys are the study file's dotted names, the ones an override uses: ``model.name``,
``model.hidden``, ``task.max_train``, ``train.steps``, ``target.threshold``, ``score``. Values
are plain JSON (tuples -> lists). `study_settings` reads them from a study, `run_settings` from
the ``config`` of a run's result.json (model, task and train only: a run does not carry the
target or the score). The sweep records them per study folder (`idlab.sweep.settings`); the
report has one column per run setting (`idlab.report.load`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, cast

from idlab.config.loader import to_dict
from idlab.config.run import parts_from_dict
from idlab.config.schema import EXECUTION_TRAIN_FIELDS, PER_RUN_TRAIN_FIELDS, StudyConfig
from idlab.jsontypes import JsonValue

#: top-level StudyConfig fields that are not settings (the grid, where and how runs execute, the folder)
NOT_SETTINGS = frozenset({"name", "description", "methods", "seeds", "executor", "nproc_per_node", "device", "gpus",
                          "progress",
                          "retry_failed", "results_dir", "slurm", "eval", "method_settings"})
#: the blocks a run's config carries (`run_settings`)
RUN_BLOCKS = ("model", "task", "train")


def _flat(prefix: str, value: object, out: dict[str, JsonValue]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = cast(JsonValue, value)  # config values are JSON (to_dict / a stored config)


def _settings_of(blocks: Mapping[str, object], grid: Iterable[str]) -> dict[str, JsonValue]:
    skip = NOT_SETTINGS | set(grid)
    out: dict[str, Any] = {}
    for key, value in blocks.items():
        if key in skip:
            continue
        if key == "train" and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in PER_RUN_TRAIN_FIELDS and k not in EXECUTION_TRAIN_FIELDS}
        _flat(key, value, out)
    return dict(sorted(out.items()))


def _method_names() -> tuple[str, ...]:
    from idlab import methods

    return methods.names()


def study_settings(study: StudyConfig) -> dict[str, JsonValue]:
    """The settings of a study (module docstring): flat dotted keys, sorted, JSON values."""
    flat = to_dict(study)
    assert isinstance(flat, dict)  # a study is a mapping
    return _settings_of(flat, _method_names())


def settings_of_mapping(study: Mapping[str, object]) -> dict[str, JsonValue]:
    """The settings in a study.json's ``study`` mapping (`idlab.config.to_dict` of a StudyConfig)."""
    return _settings_of(study, (*_method_names(), *(k for k, v in study.items() if _is_method_block(k, v))))


def _is_method_block(key: str, value: object) -> bool:
    """A block of a method no longer registered: a mapping holding learning rates."""
    return key not in RUN_BLOCKS and key != "target" and isinstance(value, Mapping) and "lr" in value


def run_settings(cfg: Mapping[str, object]) -> dict[str, JsonValue]:
    """The settings of one run from its stored config (a result.json's ``config``): ``model.*``,
    ``task.*`` and ``train.*`` with every default filled in (`idlab.config.run.parts_from_dict`).

    Raises:
        ValueError / KeyError / TypeError: the config does not parse (unknown keys, no model).
    """
    model, task, train = parts_from_dict(cfg)
    return _settings_of({"model": to_dict(model), "task": to_dict(task), "train": to_dict(train)}, ())


@lru_cache(maxsize=1)
def _defaults_json() -> str:
    return json.dumps(study_settings(StudyConfig()), sort_keys=True)


def default_settings() -> dict[str, JsonValue]:
    """The settings of a study file that sets nothing: what a key missing from a record stands for."""
    out: dict[str, Any] = json.loads(_defaults_json())
    return out


def _norm(v: object) -> str:
    return json.dumps(v, sort_keys=True)


def settings_diff(recorded: Mapping[str, object], current: Mapping[str, object]) -> list[tuple[str, object, object]]:
    """``(key, recorded value, current value)`` for every setting that differs, sorted by key.

    A key one side lacks (a record written before a field existed, or one derived from runs,
    which carry no target or score) stands for its default; a recorded key the schema no longer
    has (neither in ``current`` nor in the defaults) is not compared.
    """
    defaults = default_settings()
    out = []
    for key in sorted(set(current) | (set(recorded) & set(defaults))):
        a, b = recorded.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if _norm(a) != _norm(b):
            out.append((key, a, b))
    return out


def same_settings(a: Mapping[str, object], b: Mapping[str, object]) -> bool:
    """No setting differs (`settings_diff`)."""
    return not settings_diff(a, b)


def show(value: object) -> str:
    """A setting's value as the study file would write it: ``[16]``, ``mlp``, ``null``."""
    return value if isinstance(value, str) else json.dumps(value)


def describe(settings: Mapping[str, object], keys: Iterable[str]) -> str:
    """``model.hidden=[16], train.steps=60``: the given keys of a settings mapping."""
    return ", ".join(f"{k}={show(settings.get(k))}" for k in keys)


__all__ = ["NOT_SETTINGS", "RUN_BLOCKS", "default_settings", "describe", "run_settings", "same_settings",
           "settings_diff", "settings_of_mapping", "show", "study_settings"]
