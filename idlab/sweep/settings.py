"""One experiment per study folder: ``<results_dir>/<name>/settings.json`` records its settings.

The settings (`idlab.config.settings`: model and its options, task and its options, the train
block, target, score, ...; not the grid, the seeds, or where runs execute) are recorded by the
first sweep of a study folder, before any run. A later sweep whose settings differ is refused
before anything is written (`ConfigError`, exit 2), naming each differing key with both values
and the two ways out: another study name, or ``--allow-mixed`` (``run_sweep(allow_mixed=True)``),
after which the folder records every setting set it holds and the report keeps them apart.
New grid points, methods, learning rates and seeds are not settings: adding them is allowed.

``settings.json``::

    {"format": 1, "settings": [{"model.name": "mlp", "model.hidden": [16], "train.steps": 60, ...}, ...]}

A folder written before settings.json existed is checked too: its record is derived from the
runs it holds (`recorded_settings`: each result.json's config gives model, task and train; the
folder's study.json adds the study-level keys a run does not carry, target and score) and
written by the next sweep that is allowed into it. A folder that holds no whole run has nothing
to mix with and is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from idlab.config import StudyConfig
from idlab.config.schema import target_of
from idlab.config.settings import (
    RUN_BLOCKS,
    default_settings,
    run_settings,
    same_settings,
    settings_diff,
    settings_of_mapping,
    show,
    study_settings,
)
from idlab.errors import ConfigError
from idlab.jsontypes import JsonValue
from idlab.runs import atomic_write_json, iter_results, read_json

SETTINGS_FILE = "settings.json"
SETTINGS_FORMAT = 1


class Recorded(NamedTuple):
    """The setting sets a study folder holds and where they were read from."""

    sets: list[dict[str, Any]]
    source: str  # "settings.json", "runs" (a folder from before settings.json) or "none"


def read_settings_file(study_dir: Path) -> list[dict[str, JsonValue]] | None:
    """The setting sets in ``study_dir/settings.json``; None when the file is absent or unreadable."""
    raw = read_json(study_dir / SETTINGS_FILE)
    sets = None if raw is None else raw.get("settings")
    if not isinstance(sets, list):
        return None
    return [dict(s) for s in sets if isinstance(s, Mapping)]


def _add(sets: list[dict[str, JsonValue]], s: Mapping[str, JsonValue]) -> None:
    if not any(same_settings(old, s) for old in sets):
        sets.append(dict(s))


def settings_from_runs(study_dir: Path) -> list[dict[str, JsonValue]]:
    """The distinct setting sets of the runs a folder holds (every whole result.json, any status),
    completed by the study-level keys of its study.json (target, score, ...) when it has one."""
    meta = read_json(study_dir / "study.json") or {}
    found = meta.get("study")
    study = found if isinstance(found, Mapping) else None
    extra: dict[str, Any] = {}
    if study is not None:
        known = default_settings()  # a key of an older schema is no setting of this one
        extra = {k: v for k, v in settings_of_mapping(study).items()
                 if k in known and k.split(".")[0] not in RUN_BLOCKS}
        target = target_of(study)  # also a study.json from before the target block
        extra.update({"target.threshold": target.threshold, "target.baseline": target.baseline})
    sets: list[dict[str, Any]] = []
    for _, res in iter_results(study_dir, warn=lambda _line: None):  # the sweep names broken runs itself
        try:
            found = run_settings(res.config)
        except (KeyError, ValueError, TypeError):
            continue
        _add(sets, dict(sorted({**extra, **found}.items())))
    return sets


def recorded_settings(study_dir: Path) -> Recorded:
    """What ``study_dir`` holds: its settings.json, else the settings of its runs (`settings_from_runs`)."""
    sets = read_settings_file(study_dir)
    if sets is not None:
        return Recorded(sets, SETTINGS_FILE)
    sets = settings_from_runs(study_dir)
    return Recorded(sets, "runs" if sets else "none")


def _refusal(study: StudyConfig, study_dir: Path, rec: Recorded, current: Mapping[str, object]) -> str:
    closest = min(rec.sets, key=lambda s: len(settings_diff(s, current)))
    diff = settings_diff(closest, current)
    where = (f"recorded in {study_dir / SETTINGS_FILE}" if rec.source == SETTINGS_FILE
             else "read from the runs it holds (a folder from before settings.json)")
    held = "" if len(rec.sets) == 1 else f" (it holds {len(rec.sets)} setting sets; the closest differs)"
    lines = [f"study folder {study_dir} holds runs with other settings ({where}){held}; this sweep would "
             f"mix two experiments in one study. {len(diff)} setting(s) differ:"]
    lines += [f"  {key}: {show(old)} in the folder, {show(new)} in this sweep" for key, old, new in diff]
    lines += ["Either give this sweep its own study: name=<another name> "
              f"(e.g. name={study.name}-2, results in {study_dir.parent}/<another name>/), or add it to this "
              f"folder on purpose with --allow-mixed (idlab sweep ... --allow-mixed; run_sweep(allow_mixed=True)): "
              "the folder then records both setting sets and the report keeps them apart."]
    return "\n".join(lines)


def check_settings(study: StudyConfig, allow_mixed: bool = False) -> list[dict[str, JsonValue]] | None:
    """The setting sets ``study``'s folder is to record before its runs, or None when its record stands.

    Reads only (nothing is written). A folder that records no settings yet gets the study's own
    (and, from before settings.json, those of the runs it holds).

    Raises:
        ConfigError: the folder holds runs with other settings and ``allow_mixed`` is False; the
            message names each differing key with both values, ``name=`` and ``--allow-mixed``.
    """
    study_dir = study.study_dir()
    current = study_settings(study)
    rec = recorded_settings(study_dir)
    if any(same_settings(s, current) for s in rec.sets):  # derived sets lack target / score: the study's are whole
        return None if rec.source == SETTINGS_FILE else [current if same_settings(s, current) else s
                                                         for s in rec.sets]
    if rec.sets and not allow_mixed:
        raise ConfigError(_refusal(study, study_dir, rec, current))
    return [*rec.sets, current]


def write_settings(study_dir: Path, sets: Sequence[Mapping[str, JsonValue]]) -> Path:
    """Write ``settings.json`` (atomically)."""
    path = study_dir / SETTINGS_FILE
    atomic_write_json(path, {"format": SETTINGS_FORMAT, "settings": [dict(s) for s in sets]})
    return path


__all__ = ["SETTINGS_FILE", "Recorded", "check_settings", "read_settings_file", "recorded_settings",
           "settings_from_runs", "write_settings"]
