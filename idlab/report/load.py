"""Loading results for the report: one row per run (`load_results`), learning curves (`load_curves`).

Reads run folders through `idlab.runs.iter_results` (the one reader: runs whose files are
not whole are skipped with a warning) and a study's ``study.json`` (`study_meta`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict, cast

import pandas as pd

from idlab import methods
from idlab.jsontypes import JsonObject
from idlab.report.instruct import instruct_columns, tidy_instruct_columns
from idlab.report.settings import setting_values, tidy_setting_columns
from idlab.runs import RunResult, iter_results, read_json


class StudySection(TypedDict, total=False):
    """study.json's ``study``: the study config as the sweep stored it (the keys the report reads)."""

    name: str
    description: str
    score: str


class StudyMeta(TypedDict, total=False):
    """A study's ``study.json`` (`idlab.sweep.driver` writes it): the study config, the run ids of the
    grid and each run's resolved config; empty when there is none."""

    study: StudySection
    run_ids: list[str]
    runs: dict[str, JsonObject]


def variant(cfg: Mapping[str, object]) -> str:
    """The curve label of a stored run config (its method's `idlab.methods.Axes.variant`)."""
    return methods.variant(cfg)


def _row(path: Path, res: RunResult) -> JsonObject:
    cfg = res.config
    model = cfg.get("model")
    task = cfg.get("task")
    row: JsonObject = {
        "run_id": res.run_id or path.parent.name,
        "study": res.study or path.parent.parent.parent.name,
        "status": res.status,
        "error": res.error,
        "method": cfg.get("method"),
        "variant": variant(cfg),
        "size": _size(cfg),
        "model": model.get("name") if isinstance(model, dict) else model,
        "task": task.get("name") if isinstance(task, dict) else task,
        "seed": cfg.get("seed"),
        "lr": cfg.get("lr"),
        "r": cfg.get("r"),
        "target_set": cfg.get("target_set"),
        "target_modules": ",".join(cfg["target_modules"]) if cfg.get("target_modules") else None,
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": cfg.get("use_rslora"),
        "d": cfg.get("d"),
        "projection": cfg.get("projection"),
        "said": cfg.get("said"),
        "head": res.head,
        "no_delta": res.method_info.get("no_delta"),
        "metric": res.metric,
        "higher_is_better": res.higher_is_better,
        "score_final": res.metrics.get(res.metric),
        "score_best": res.best.get(res.metric),
        "score_start": _step0(res.curve, res.metric),
        "converged": res.converged,
        "best_step": res.best_step,
        "steps": res.steps,
        "trainable_parameters": res.trainable_parameters,
        "total_parameters": res.total_parameters,
        "majority_accuracy": res.majority_accuracy,
        "wall_time_s": res.wall_time_s,
        "train_time_s": res.train_time_s,
        "peak_memory_bytes": res.peak_memory_bytes,
        "device": res.device,
        "git_commit": res.git_commit,
        **{f"version_{k}": v for k, v in sorted(res.versions.items())},
        "run_dir": str(path.parent),
        **instruct_columns(res, path.parent),
        **setting_values(cfg),
    }
    for k, v in sorted(res.metrics.items()):
        if k != res.metric and isinstance(v, (int, float)):
            row[f"final_{k}"] = v
    return row


def _size(cfg: Mapping[str, object]) -> int | None:
    """The run's value on its method's size axis (r, d, ...), None without one."""
    try:
        return methods.axes_from_config(cfg).size()
    except (KeyError, ValueError, TypeError):
        return None


_INT_COLS = ["seed", "size", "r", "d", "steps", "trainable_parameters", "total_parameters", "peak_memory_bytes"]


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """One row per run found under ``results_dir`` (results root, study or runs folder).

    Runs whose files are not whole are skipped with a one-line warning (`idlab.runs.iter_results`).
    Columns include run_id, study, status, method, variant, model, task, seed, lr, r,
    target_set, d, projection, said, metric, score_final, score_best, score_start (the metric's
    step-0 evaluation, ``train.eval_at_start``; NaN without one), trainable_parameters, total_parameters, wall_time_s, peak_memory_bytes, device,
    git_commit, version_*, and one column per resolved setting of the run's stored config
    (`idlab.report.settings.setting_values`): ``setting_<key>`` with the study file's dotted key,
    e.g. ``setting_model.name``, ``setting_model.hidden`` (a list as JSON text, ``"[16]"``),
    ``setting_model.dtype``, ``setting_task.name``, ``setting_task.max_train``, ``setting_train.steps``,
    ``setting_train.optimizer``, ... (model, model options, task, task options and the train block
    but its per-run lr, seed, device and progress; defaults filled in), the instruction-task columns
    exact_match, exact_match_before, generate_n, general_loss_before, general_loss_after, forgetting
    (NaN where absent) and one ``eval_<task>_<metric>`` column per lm-eval score of the runs' eval.json
    (`idlab.report.instruct.instruct_columns`). Rows are sorted (study,
    method, variant, r, d, lr, seed, run_id).
    """
    rows = [_row(p, res) for p, res in iter_results(results_dir)]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = tidy_instruct_columns(tidy_setting_columns(df))
    for c in _INT_COLS:
        if c in df:
            df[c] = pd.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                              for v in df[c]], dtype="Int64")
    for c in ("said", "use_rslora", "higher_is_better"):
        if c in df:
            df[c] = df[c].astype("boolean")
    for c in ("lr", "lora_alpha", "score_final", "score_best", "score_start", "best_step", "wall_time_s", "train_time_s"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    order = [c for c in ("study", "method", "variant", "r", "d", "lr", "seed", "run_id") if c in df]
    return df.sort_values(order, na_position="first", kind="mergesort").reset_index(drop=True)


def _step0(curve: Sequence[Mapping[str, float | None]], metric: str) -> float | None:
    """The tracked metric at step 0 (the model before training: ``train.eval_at_start``), or None."""
    v = next((p.get(metric) for p in curve if p.get("step") == 0), None)
    return None if v is None else float(v)


def load_curves(results_dir: str | Path) -> pd.DataFrame:
    """Learning curves, long format: run_id, study, method, variant, seed, step, key, value."""
    rows = []
    for path, res in iter_results(results_dir, warn=lambda _line: None):  # load_results has warned
        cfg = res.config
        for point in res.curve:
            step = point.get("step")
            for k, v in sorted(point.items()):
                if k != "step" and isinstance(v, (int, float)):
                    rows.append({"run_id": res.run_id or path.parent.name,
                                 "study": res.study or path.parent.parent.parent.name, "method": cfg.get("method"),
                                 "variant": variant(cfg), "seed": cfg.get("seed"), "step": step, "key": k,
                                 "value": float(v)})
    df = pd.DataFrame(rows, columns=["run_id", "study", "method", "variant", "seed", "step", "key", "value"])
    return df.sort_values(["study", "run_id", "step", "key"], kind="mergesort").reset_index(drop=True)


# --------------------------------------------------------------------------- aggregation


def study_meta(results_dir: Path, study: str) -> StudyMeta:
    """The ``study.json`` of ``study`` (in its folder or at ``results_dir``), else ``{}``."""
    for cand in (results_dir / study / "study.json", results_dir / "study.json"):
        meta = read_json(cand)
        section = (meta.get("study") or {}) if meta else {}
        if meta and isinstance(section, dict) and section.get("name") == study:
            return cast(StudyMeta, meta)  # a study.json the sweep wrote (its study's name matches)
    return {}


def score_col(meta: StudyMeta) -> str:
    kind = (meta.get("study") or {}).get("score")
    return {"best": "score_best", "exact_match": "exact_match"}.get(str(kind), "score_final")




__all__ = ["StudyMeta", "StudySection", "load_curves", "load_results", "score_col", "study_meta", "variant"]
