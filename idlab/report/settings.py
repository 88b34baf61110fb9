"""The settings of each run as report columns, and a study's setting groups.

Every run's stored config (``result.json["config"]``) gives its resolved settings
(`idlab.config.settings.run_settings`: model, model options, task, task options, the train
block, every default filled in). `setting_values` makes one column per setting, named
``setting_<study-file key>``: ``setting_model.name``, ``setting_model.hidden``,
``setting_task.max_train``, ``setting_train.steps``, ... (`SETTING_PREFIX` + the dotted key an
override uses). A list value is its JSON text (``"[16]"``), so the columns group and store as
plain scalars.

A study's **setting groups** are its runs that agree on every setting (`varying_settings`:
the setting columns that differ between its runs). Runs of different groups are different
experiments: the report's cells, baselines and crossings never pool them (`group_labels`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from idlab.config.settings import default_settings, run_settings, show
from idlab.jsontypes import JsonValue

SETTING_PREFIX = "setting_"
#: the column of `group_labels` in the cells table: ``model.hidden=[4]`` ("" for a study of one group)
GROUP_COL = "settings"


def setting_values(cfg: Mapping[str, object]) -> dict[str, JsonValue]:
    """``{setting_<key>: value}`` of one run's stored config (lists as JSON text); {} when it does not parse."""
    try:
        found = run_settings(cfg)
    except (KeyError, ValueError, TypeError):
        return {}
    return {f"{SETTING_PREFIX}{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in found.items()}


def tidy_setting_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A setting column holding values of several types (e.g. a number and a string) as text, so
    that Parquet stores it."""
    for c in setting_columns(df):
        kinds = {type(v) for v in df[c] if v is not None and not (isinstance(v, float) and pd.isna(v))}
        if len(kinds) > 1 and not kinds <= {int, float}:
            df[c] = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in df[c]]
    return df


def setting_columns(df: pd.DataFrame) -> list[str]:
    """The ``setting_*`` columns of a runs table, sorted."""
    return sorted(str(c) for c in df.columns if str(c).startswith(SETTING_PREFIX))


def _text(col: pd.Series) -> pd.Series:
    return col.astype(object).where(col.notna(), "-").astype(str)


def varying_settings(df: pd.DataFrame) -> list[str]:
    """The setting columns whose value differs between the runs of one study (any study of ``df``)."""
    out: set[str] = set()
    by_study = df.groupby("study", sort=True, dropna=False) if "study" in df else [("", df)]
    for _, g in by_study:
        out.update(c for c in setting_columns(g) if _text(g[c]).nunique() > 1)
    return sorted(out)


def group_labels(df: pd.DataFrame) -> pd.Series:
    """Each run's setting group within its study: ``model.hidden=[4], train.steps=30`` (the settings that
    differ between the study's runs), "" where its study has one group."""
    labels: dict[Any, str] = dict.fromkeys(df.index, "")
    by_study = df.groupby("study", sort=True, dropna=False) if "study" in df else [("", df)]
    for _, g in by_study:
        cols = [c for c in setting_columns(g) if _text(g[c]).nunique() > 1]
        if cols:
            text = {c: _text(g[c]) for c in cols}
            labels.update({i: ", ".join(f"{c[len(SETTING_PREFIX):]}={text[c][i]}" for c in cols) for i in g.index})
    return pd.Series([labels[i] for i in df.index], index=df.index, dtype=object)


def setting_groups(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The setting groups of one study's runs, sorted by label (one group labelled "" when they all agree)."""
    labels = group_labels(runs)
    return [(str(k), runs[labels == k]) for k in sorted(set(labels))]


def _value(v: object) -> Any:
    """A column value back as the setting (JSON text of a list -> the list)."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _options(row: Mapping[object, object], block: str, keys: Sequence[str]) -> str:
    """``mlp (hidden=[16])``: the block's name and its options that are not at their default or are in ``keys``."""
    defaults = default_settings()
    name = row.get(f"{SETTING_PREFIX}{block}.name")
    opts = []
    for col in sorted(str(k) for k in row if str(k).startswith(f"{SETTING_PREFIX}{block}.") and not str(k).endswith(".name")):
        key = col[len(SETTING_PREFIX):]
        v = _value(row[col])
        if key in keys or json.dumps(v) != json.dumps(defaults.get(key)):
            opts.append(f"{key.split('.', 1)[1]}={show(v)}")
    return f"**{name}**" + (f" ({', '.join(opts)})" if opts else "")


def header_lines(runs: pd.DataFrame, tail: str = "") -> list[str]:
    """The report's lines on a study's settings: model and task of each setting group with their options,
    the other settings every run shares (not at their default), and, when the study holds several setting
    groups, a bold warning and a table of the groups. ``tail`` ends the first paragraph."""
    cols = setting_columns(runs)
    if not cols:
        return []
    vary = [c[len(SETTING_PREFIX):] for c in varying_settings(runs)]
    groups = setting_groups(runs)
    firsts = [g[cols].iloc[0].to_dict() for _, g in groups]
    lines = []
    for block, title in (("model", "Model"), ("task", "Task")):
        names = list(dict.fromkeys(_options(f, block, vary) for f in firsts))
        lines.append(f"{title} {' and '.join(names)}.")
    defaults = default_settings()
    shared = [c for c in cols if c[len(SETTING_PREFIX):] not in vary and c.split(".")[0] not in
              (f"{SETTING_PREFIX}model", f"{SETTING_PREFIX}task")]
    other = [f"{c[len(SETTING_PREFIX):]}={show(_value(firsts[0][c]))}" for c in shared
             if json.dumps(_value(firsts[0][c])) != json.dumps(defaults.get(c[len(SETTING_PREFIX):]))]
    lines.append("Settings of every run (those not at their default): " + (", ".join(other) or "none") + ".")
    out = [" ".join([*lines, tail] if tail else lines), ""]
    if len(groups) > 1:
        out += [f"**This study holds {len(groups)} setting groups: runs that differ in more than seed, learning "
                f"rate and grid point ({', '.join(f'`{k}`' for k in vary)}). They are different experiments and "
                "are reported separately below, each with its own baseline and crossings; no cell pools them.**",
                ""]
        rows = ["| group | settings | runs | methods | seeds |", "|---|---|---|---|---|"]
        for i, (label, g) in enumerate(groups, 1):
            seeds = sorted(int(s) for s in g["seed"].dropna().unique())
            meths = ", ".join(sorted(str(m) for m in g["method"].dropna().unique()))
            rows.append(f"| g{i} | {label} | {len(g)} | {meths} | {seeds} |")
        out += [*rows, ""]
    return out


__all__ = ["GROUP_COL", "SETTING_PREFIX", "group_labels", "header_lines", "setting_columns", "setting_groups",
           "setting_values", "tidy_setting_columns", "varying_settings"]
