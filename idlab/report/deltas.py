"""The Delta W analysis of one study's runs, as the report uses it (`study_tables`).

Runs `idlab.analysis.export.analyze_runs` on the ok runs that have ``delta.safetensors``
(or reuses its Parquet tables when the same runs were analysed before), and, per seed, the
alignment and intruder tables against W_0 rebuilt from the run's config (`base_weights`).
A run whose Delta W a published study left out of git (``kept: false``, `idlab.runs.marks`)
gets one note line instead.
The report only reads the tables this returns.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from idlab.runs import DELTA_FILE, RESULT_FILE, atomic_write_text, read_json, read_result
from idlab.runs.marks import unkept_note

#: version of the analysis tables kept in runs.json: a cache written by another version is
#: recomputed (2: phi from the LoRA factor A by default, column ``source``)
ANALYSIS_FORMAT = 2


def study_tables(study_runs: pd.DataFrame, out: Path, enabled: bool) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Run (or reuse) `idlab.analysis.export.analyze_runs` for the ok runs that have deltas.

    ``study_runs`` needs columns status, run_dir and seed. Returns (tables by name, notes).
    """
    notes: list[str] = []
    if not enabled:
        return {}, ["analysis disabled (--no-analysis)"]
    try:
        from idlab.analysis.export import analyze_runs
    except ImportError as e:
        return {}, [f"idlab.analysis.export not available ({e}): no spectra / phi / amplification"]
    ok = study_runs[(study_runs["status"] == "ok")]
    # a published study's run whose Delta W was left out of git (kept: false in keep.json): one note each
    notes += [n for d in sorted(ok["run_dir"]) if (n := unkept_note(Path(d), DELTA_FILE)) is not None]
    dirs = sorted(Path(d) for d in ok["run_dir"] if (Path(d) / DELTA_FILE).exists())
    if not dirs:
        return {}, [*notes, f"no {DELTA_FILE} among the ok runs: no spectra / phi / amplification"]
    manifest = out / "runs.json"
    want = [d.name for d in dirs]
    names = ["spectra", "ranks", "similarity", "similarity_summary", "alignment", "intruders", "notes"]
    prev = read_json(manifest)
    fresh = prev and prev.get("run_ids") == want and prev.get("format") == ANALYSIS_FORMAT
    if fresh and all((out / f"{n}.parquet").exists() for n in names):
        return {n: pd.read_parquet(out / f"{n}.parquet") for n in names}, notes
    import logging

    export_log = logging.getLogger("idlab.analysis.export")
    level = export_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_log.setLevel(logging.ERROR)  # pass 1 has no W_0 by design; pass 2 supplies it
        try:
            tables = analyze_runs(dirs, None)
        finally:
            export_log.setLevel(level)
        # W_0 per seed (heads and from-scratch nets are seeded): alignment + intruders by seed group
        align, intr, extra_notes = [], [], []
        for seed, grp in ok[ok["run_dir"].isin([str(d) for d in dirs])].groupby("seed", sort=True):
            try:
                weights = base_weights(grp)
            except Exception as e:
                notes.append(f"base weights for seed {seed} unavailable ({type(e).__name__}: {e}): "
                             "no amplification / intruders")
                continue
            t = analyze_runs(sorted(Path(d) for d in grp["run_dir"]), None, base_weights=_const(weights),
                             pairs="none")
            align.append(t["alignment"])
            intr.append(t["intruders"])
            extra_notes.append(t["notes"])
        if align:
            tables["alignment"] = pd.concat(align, ignore_index=True)
            tables["intruders"] = pd.concat(intr, ignore_index=True)
            tables["notes"] = pd.concat([tables["notes"], *extra_notes], ignore_index=True)
            tables["notes"] = tables["notes"][~tables["notes"]["note"].str.startswith("no base_weights given")]
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        df = tables.get(n, pd.DataFrame())
        df.to_parquet(out / f"{n}.parquet", index=False)
    atomic_write_text(manifest, json.dumps({"run_ids": want, "format": ANALYSIS_FORMAT}, indent=1) + "\n")
    return {n: tables.get(n, pd.DataFrame()) for n in names}, notes


def _const(weights: dict[str, Any]) -> Any:
    """A ``base_weights`` callable returning ``weights`` whatever the model name."""

    def f(_name: str) -> dict[str, Any]:
        return weights

    return f


def base_weights(grp: pd.DataFrame) -> dict[str, Any]:
    """W_0 (every nn.Linear weight) of the base model of these runs' seed, rebuilt as the sweep built it."""
    from idlab.models import linear_weights
    from idlab.sweep.build import build_task_and_model

    path = Path(grp["run_dir"].iloc[0]) / RESULT_FILE
    res = read_result(path)
    if res is None:
        raise FileNotFoundError(f"{path} does not exist or is not a result")
    _, model = build_task_and_model(res.run_config())
    return {n: w.detach().float().cpu() for n, w in linear_weights(model).items()}




__all__ = ["base_weights", "study_tables"]
