"""``idlab report``: results -> tables (Parquet), figures (PNG + PDF) and REPORT.md.

Reads every ``result.json`` under a results folder (any number of studies), never
trains. Writes, into the output folder (default: the results folder):

- ``summary.parquet``: one row per run (`load_results`); ``curves.parquet``: the
  learning curves, long format (`load_curves`); ``cells.parquet``: per cell
  (method and its axes, learning rate) the seed mean / std / min / max.
- ``analysis/<study>/*.parquet``: Delta W tables from `idlab.analysis.export.analyze_runs`
  (spectra, ranks, similarity, alignment, intruders), when that module and the
  runs' ``delta.safetensors`` are there.
- ``figures/<study>/*.png|pdf`` and ``REPORT.md``.

Deterministic: same results -> byte-identical tables and PNGs (no timestamps in
files, fixed bootstrap seed, sorted rows). Partial results are fine: every
figure is drawn only where its data exists, and REPORT.md names what is missing.

Nuisance selection: where a cell (method + axes) was run at several learning
rates, the report keeps the learning rate with the highest seed-mean score and
says so (selection on the validation split the score is measured on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from idlab import methods
from idlab.report import figures
from idlab.report.figures import (
    fig_curves,
    fig_perf_vs_params,
    fig_perf_vs_size,
    fig_phi,
    fig_size_heatmap,
    fig_spectra,
    spectrum_label,
)
from idlab.report.load import load_curves, load_results, score_col, study_meta, variant
from idlab.report.tables import (
    Crossings,
    CurveCrossing,
    amplification_table,
    baseline,
    cell_table,
    crossings,
    majority_floor,
    selected_runs,
    thin_crossings,
)
from idlab.runs import atomic_write_text
from idlab.training.convergence import unconverged_crossings


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer():  # a count or a grid point stored as float: 10000.0 -> 10,000
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(float(v)) < 1e5 else f"{float(v):,.0f}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v).replace("|", "\\|")


def md_table(df: pd.DataFrame, cols: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (no external dependency)."""
    cols = list(cols or df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)



class _AboveChance(NamedTuple):
    """The crossings for the target above the majority-class floor."""

    floor: float
    target: float
    found: Crossings


def _ci_text(res: CurveCrossing, fmt: str) -> str:
    """'[lo, hi]' of a bootstrap interval; 'not reached' for an end beyond the grid; '–' without one."""
    lo, hi = res.ci_low, res.ci_high
    if res.value is None or lo is None or hi is None:
        return "–"

    def one(v: float) -> str:
        return fmt.format(v) if math.isfinite(v) else "not reached"

    return f"[{one(lo)}, {one(hi)}]"



def _grid_text(res: CurveCrossing) -> str:
    """'1000 (1 seed), 10000 (3 seeds)': the grid searched with the runs behind each point."""
    return ", ".join(f"{int(x)} ({n} seed{'s' if n != 1 else ''})" for x, n in zip(res.grid, res.n_seeds))



def _crossing_rows(found: Crossings, suffix: str = "") -> list[dict[str, Any]]:
    """Rows of the headline table: each method's crossing (d90, r90, ...) per variant."""
    rows = []
    for name, results in found.items():
        m = methods.get(name)
        fmt = "{:.0f}" if m.size_counts_parameters else "{:.2f}"
        for v, res in sorted(results.items()):
            # a size that counts parameters: that size plus the directly trained head; otherwise the
            # parameters of the selected cell at the grid value
            params = res.value_params if m.size_counts_parameters else res.params
            rows.append({"method": v, "quantity": f"{m.quantity}{suffix}", "grid value": res.value,
                         "interpolated": res.interp, f"{res.ci_level:.0%} interval (bootstrap over seeds)": _ci_text(res, fmt),
                         "trainable parameters": params, "grid searched (runs per point)": _grid_text(res)})
    return rows


def _unconverged(found: Crossings, runs: pd.DataFrame) -> list[str]:
    """`idlab.training.convergence.unconverged_crossings` with each method's size axis named."""
    out = []
    for name, results in found.items():
        key = methods.get(name).size_key or "size"
        mine = runs[runs["method"] == name]
        out += unconverged_crossings([(results, key)], mine.assign(**{key: mine["size"]}).to_dict("records"))
    return sorted(set(out))


def report_study(study: str, runs: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, out_dir: Path,
                 analysis: bool = True) -> list[str]:
    """Figures, analysis tables and the REPORT.md section (returned as lines) of one study."""
    meta = study_meta(results_dir, study)
    score = score_col(meta)
    fig_dir = out_dir / "figures" / study
    lines = [f"## Study `{study}`", ""]
    desc = (meta.get("study") or {}).get("description")
    if desc:
        lines += [desc, ""]
    model, task = runs["model"].dropna().unique(), runs["task"].dropna().unique()
    seeds = sorted(int(s) for s in runs["seed"].dropna().unique())
    lines += [f"Model **{', '.join(map(str, model))}**, task **{', '.join(map(str, task))}**, seeds {seeds}; "
              f"score = {score.replace('score_', '')} validation {runs['metric'].dropna().iloc[0]}. "
              f"{len(runs)} runs: " + ", ".join(f"{(runs['status'] == s).sum()} {s}"
                                                 for s in ("ok", "diverged", "failed")) + ".", ""]
    expected = meta.get("run_ids") or []
    present = set(runs["run_id"])
    missing = [rid for rid in expected if rid not in present]
    bad = runs[runs["status"] != "ok"]
    if missing or not bad.empty:
        lines += ["### Missing or unsuccessful runs", ""]
        cfgs = meta.get("runs") or {}
        for rid in missing:
            c = cfgs.get(rid, {})
            lines.append(f"- missing `{rid}`: {variant(c) if c else '?'} r={c.get('r', '–')} d={c.get('d', '–')} "
                         f"lr={c.get('lr', '–')} seed={c.get('seed', '–')}")
        for _, row in bad.iterrows():
            lines.append(f"- {row['status']} `{row['run_id']}` ({row['variant']}, seed {row['seed']}): "
                         f"{str(row['error'])[:200]}")
        lines.append("")
    cells = cell_table(runs, score)
    base = baseline(runs, meta, score)
    sel_runs = selected_runs(runs, cells)
    # each method's crossing on its size axis (d90 per subspace variant, r90 per LoRA target set, ...)
    found = crossings(sel_runs, cells, base.get("target"), score)
    # the same above the majority-class floor (when the published target is close to it)
    floor = majority_floor(runs)
    chance: _AboveChance | None = None
    if floor is not None and base.get("value") is not None:
        t = floor + base["threshold"] * (base["value"] - floor)
        base["floor"] = floor
        chance = _AboveChance(floor, t, crossings(sel_runs, cells, t, score))
    figs: list[tuple[str, list[Path]]] = []
    figs.append(("Headline: performance vs trainable parameters",
                 fig_perf_vs_params(cells, runs, found, base, score, fig_dir, meta)))
    for name in methods.names():  # one figure per method with a size axis, and its size x variant grid
        m = methods.get(name)
        if m.size_key is None or name not in set(runs["method"]):
            continue
        figs.append((f"Performance vs {m.title or name} {m.size_key}",
                     fig_perf_vs_size(name, sel_runs, found.get(name, {}), base, score, fig_dir, meta)))
        if not m.size_counts_parameters:
            figs.append((f"{m.title or name}: {m.size_key} x variant",
                         fig_size_heatmap(name, cells, runs, fig_dir, meta)))
    from idlab.report.deltas import study_tables  # torch: only when a report is written

    tables, notes = study_tables(runs, out_dir / "analysis" / study, analysis)
    spec = fig_spectra(tables.get("spectra", pd.DataFrame()), runs, fig_dir, meta)
    figs.append(("Singular spectra of ΔW", [p for p in spec if p.stem == "spectra"]))
    figs.append(("Energy curves of ΔW", [p for p in spec if p.stem == "energy"]))
    figs.append(("Subspace similarity: rank vs rank",
                 fig_phi(tables.get("similarity", pd.DataFrame()), "rank", runs, fig_dir, meta)))
    figs.append(("Subspace similarity: seed vs seed",
                 fig_phi(tables.get("similarity", pd.DataFrame()), "seed", runs, fig_dir, meta)))
    figs.append(("Learning curves", fig_curves(curves, sel_runs, fig_dir, meta)))

    # headline numbers
    lines += ["### Headline: how many trainable parameters reach 90% of full fine-tuning", ""]
    if base.get("value") is None:
        lines += [f"No baseline: {base['kind']}. d90 and r90 need full fine-tuning results "
                  "(or `target.baseline`).", ""]
    else:
        lines += [f"Baseline {base['value']:.4f} ({base['kind']}); target {base['threshold']:.0%} = "
                  f"{base['target']:.4f}.", ""]
        rows = _crossing_rows(found)
        if chance is not None:
            floor, t = chance.floor, chance.target
            lines += [f"Majority-class floor {floor:.4f} (always predicting the most frequent training class). "
                      + (f"**The {base['threshold']:.0%} target is at or below this floor: a model that ignores "
                         "its input meets it, so d90 / r90 by the published definition say nothing here.** "
                         if base["target"] <= floor else "")
                      + f"Rows marked 'above chance' use target = floor + {base['threshold']:.0%} x "
                      f"(baseline - floor) = {t:.4f}.", ""]
            rows += _crossing_rows(chance.found, " (above chance)")
        if rows:
            lines += [md_table(pd.DataFrame(rows)), "",
                      "A grid value of – means the threshold was not reached on the grid. "
                      "Interpolation is linear in log(d) / log(r) between the bracketing grid points.", ""]
            every = [*found.values(), *(chance.found.values() if chance is not None else ())]
            thin = [t for res in every for t in thin_crossings(res)]
            if thin:
                lines += ["**Warning: some crossings rest on fewer seeds than the rest of their curve:** "
                          + "; ".join(thin) + ". Run the missing seeds at that point before quoting them.", ""]
            unconv = sorted({*_unconverged(found, sel_runs),
                             *(_unconverged(chance.found, sel_runs) if chance is not None else ())})
            if unconv:
                lines += ["**Warning: some crossings rest on runs whose validation metric had not plateaued "
                          "(idlab.training.convergence):** " + "; ".join(unconv) + ". Train them longer "
                          "(`train.until: converged`) before quoting them.", ""]
    # figures
    lines += ["### Figures", ""]
    for caption, paths in figs:
        pngs = [p for p in paths if p.suffix == ".png" and p.exists()]
        for p in pngs:
            rel = p.relative_to(out_dir).as_posix()
            pdf = f" ([PDF]({rel[:-4]}.pdf))" if p.with_suffix(".pdf").exists() else ""
            lines += [f"**{caption}**{pdf}", "", f"![{caption}]({rel})", ""]
        if not pngs:
            lines += [f"- *{caption}*: no data yet.", ""]
    # tables
    if not cells.empty:
        lines += ["### Results per cell (seed mean ± std; selected learning rate)", ""]
        show = cells[cells["selected"]].copy()
        show["score"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(show["mean"], show["std"])]
        cols = ["variant", "r", "d", "lr", "n_seeds", "score", "min", "max", "trainable_parameters"]
        lines += [md_table(show, cols), ""]
        multi_lr = cells.groupby("cell")["lr"].nunique()
        if (multi_lr > 1).any():
            lines += ["Learning rate searched per cell; all learning rates. `select_score` is the mean over "
                      "the seeds every rate of the cell shares, a diverged seed a failure (`idlab.d90.select_lr`: "
                      "the rate with the highest is selected, here and in the sweep):", "",
                      md_table(cells, ["variant", "r", "d", "lr", "seeds", "mean", "std", "select_score",
                                       "selected"]), ""]
    align = tables.get("alignment", pd.DataFrame())
    amp, cap = amplification_table(align) if not align.empty else (pd.DataFrame(), "")
    lines += ["### ΔW versus W (Hu et al. Table 7 layout)", ""]
    if amp.empty:
        lines += ["No alignment table (needs LoRA runs with deltas and the base weights W_0).", ""]
    else:
        lines += [md_table(amp), "", cap, ""]
    ranks = tables.get("ranks", pd.DataFrame())
    if not ranks.empty:
        rk = ranks.copy()
        rk["label"] = [spectrum_label(r, targets=True)  # type: ignore[arg-type]
                       for r in rk[["method", "r", "d", "target_modules"]].to_dict("records")]
        agg = (rk.groupby(["label", "module_type"], sort=True)[["energy_rank", "effective_rank", "stable_rank",
                                                                 "fro_norm"]].mean().reset_index())
        lines += ["### Ranks of ΔW (mean over layers and seeds; energy rank at p = 0.9)", "",
                  md_table(agg), ""]
    intr = tables.get("intruders", pd.DataFrame())
    if not intr.empty:
        ia = intr.copy()
        ia["label"] = [spectrum_label(r, targets=True)  # type: ignore[arg-type]
                       for r in ia[["method", "r", "d", "target_modules"]].to_dict("records")]
        ia = ia.groupby(["label", "module_type"], sort=True)["count"].mean().reset_index(name="intruders (mean)")
        lines += ["### Intruder dimensions (k = 10, eps = 0.5; Shuttleworth et al.)", "", md_table(ia), ""]
    for n in notes:
        lines += [f"- note: {n}"]
    if notes:
        lines.append("")
    return lines


def make_report(results_dir: str | Path = "results", out_dir: str | Path | None = None,
                analysis: bool = True, formats: Sequence[str] = ("png", "pdf")) -> Path:
    """Write summary.parquet, curves.parquet, cells.parquet, analysis tables, figures and REPORT.md.

    Args:
        results_dir: folder holding ``<study>/runs/<run_id>/result.json``.
        out_dir: where to write (default ``results_dir``).
        analysis: run the Delta W analysis (spectra, phi, amplification, intruders).
        formats: figure formats, among png and pdf.

    Returns:
        The path of REPORT.md.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist (nothing is written; an existing empty
            folder gives a report saying there are no results).
    """
    figures.set_formats(formats)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"no results folder at {results_dir}")
    out = Path(out_dir) if out_dir else results_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = load_results(results_dir)
    curves = load_curves(results_dir)
    lines = ["# idlab report", "",
             "Performance against trainable parameters for full fine-tuning, DID/SAID (random subspaces) and "
             "LoRA on the same model and task; d90 / r90 = smallest d / rank reaching 90% of the baseline.", ""]
    if runs.empty:
        lines += [f"No results found under `{results_dir}` (expected `<study>/runs/<run_id>/result.json`). "
                  "Run `idlab sweep CONFIG` first.", ""]
        pd.DataFrame().to_parquet(out / "summary.parquet")
        md = out / "REPORT.md"
        atomic_write_text(md, "\n".join(lines))
        return md
    runs.drop(columns=["run_dir"]).to_parquet(out / "summary.parquet", index=False)
    curves.to_parquet(out / "curves.parquet", index=False)
    all_cells = []
    studies = sorted(runs["study"].dropna().unique())
    lines += ["Studies: " + ", ".join(f"`{s}`" for s in studies) + ".", "",
              "Tables: `summary.parquet` (one row per run), `curves.parquet` (learning curves), "
              "`cells.parquet` (seed statistics per cell), `analysis/<study>/*.parquet` (ΔW analysis).", ""]
    for study in studies:
        srun = runs[runs["study"] == study].reset_index(drop=True)
        scurve = curves[curves["study"] == study]
        lines += report_study(study, srun, scurve, results_dir, out, analysis)
        meta = study_meta(results_dir, study)
        c = cell_table(srun, score_col(meta))
        if not c.empty:
            all_cells.append(c)
    if all_cells:
        pd.concat(all_cells, ignore_index=True).drop(columns=["cell"]).to_parquet(out / "cells.parquet", index=False)
    versions = runs[[str(c) for c in runs.columns if str(c).startswith("version_")] + ["git_commit", "device"]].drop_duplicates()
    lines += ["## Environment", "", md_table(versions.reset_index(drop=True)), ""]
    md = out / "REPORT.md"
    atomic_write_text(md, "\n".join(lines))
    return md




__all__ = ["make_report", "md_table", "report_study"]
