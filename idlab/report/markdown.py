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

A study whose runs differ in anything but grid point, learning rate and seed (its setting
groups, `idlab.report.settings`) is reported per group (``figures/<study>/g<i>/``): no cell,
baseline or crossing pools two groups.

Deterministic: same results -> byte-identical tables and PNGs (no timestamps in
files, fixed bootstrap seed, sorted rows). Partial results are fine: every
figure is drawn only where its data exists, and REPORT.md names what is missing.

Nuisance selection: where a cell (method + axes) was run at several learning
rates, the report keeps the learning rate with the highest seed-mean score and
says so (selection on the validation split the score is measured on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from idlab import methods
from idlab.report import figures
from idlab.report.claims import StudyHeadline, method_claims, model_size_lines
from idlab.report.figures import (
    fig_curves,
    fig_perf_vs_params,
    fig_perf_vs_size,
    fig_phi,
    fig_size_heatmap,
    fig_spectra,
    spectrum_label,
)
from idlab.report.headline import Headline, compute_headline, headline_lines
from idlab.report.instruct import instruct_figures, instruct_lines
from idlab.report.load import load_curves, load_results, score_col, study_meta, variant
from idlab.report.settings import GROUP_COL, header_lines, setting_columns, setting_groups
from idlab.report.tables import amplification_table, cell_table, pareto_front
from idlab.report.text import fmt, md_table
from idlab.runs import atomic_write_text

_fmt = fmt  # the name the tests and older callers import


def report_study(study: str, runs: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, out_dir: Path,
                 analysis: bool = True, heads: list[StudyHeadline] | None = None) -> list[str]:
    """Figures, analysis tables and the REPORT.md section (returned as lines) of one study; each setting
    group's headline is appended to ``heads`` when given (the cross-model claims of `make_report`).

    A study whose runs differ in a setting (model options, task options, train block:
    `idlab.report.settings`) is reported per setting group, each with its own baseline, crossings,
    figures (``figures/<study>/g<i>/``) and analysis (``analysis/<study>/g<i>/``); the header names
    every group and says in bold that the study holds several.
    """
    meta = study_meta(results_dir, study)
    score = score_col(meta)
    lines = [f"## Study `{study}`", ""]
    desc = (meta.get("study") or {}).get("description")
    if desc:
        lines += [desc, ""]
    seeds = sorted(int(s) for s in runs["seed"].dropna().unique())
    counts = ", ".join(f"{(runs['status'] == s).sum()} {s}" for s in ("ok", "diverged", "failed"))
    tail = (f"Seeds {seeds}; score = {score.replace('score_', '')} validation {runs['metric'].dropna().iloc[0]}. "
            f"{len(runs)} runs: {counts}.")
    if setting_columns(runs):
        lines += header_lines(runs, tail)
    else:  # runs whose config does not parse: the names alone
        lines += [f"Model **{', '.join(map(str, runs['model'].dropna().unique()))}**, task "
                  f"**{', '.join(map(str, runs['task'].dropna().unique()))}**. {tail}", ""]
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
    groups = setting_groups(runs)
    for i, (label, g) in enumerate(groups, 1):
        where = f"g{i}" if len(groups) > 1 else ""
        gcells = cells[cells[GROUP_COL] == label] if not cells.empty else cells
        gcurves = curves[curves["run_id"].isin(set(g["run_id"]))]
        if where:
            lines += [f"### Setting group {where}: {label}", ""]
        sec, head = _group_section(study, where, label, g.reset_index(drop=True), gcells, gcurves, meta, score,
                                   out_dir, analysis)
        lines += sec
        if heads is not None:
            total = pd.to_numeric(g["total_parameters"], errors="coerce").dropna() if "total_parameters" in g \
                else pd.Series(dtype=float)
            heads.append(StudyHeadline(study, where, ", ".join(map(str, g["model"].dropna().unique())),
                                       ", ".join(map(str, g["task"].dropna().unique())),
                                       int(total.median()) if len(total) else None, head))
    return lines


def _group_section(study: str, where: str, label: str, runs: pd.DataFrame, cells: pd.DataFrame,
                   curves: pd.DataFrame, meta: Mapping[str, Any], score: str, out_dir: Path,
                   analysis: bool) -> tuple[list[str], Headline]:
    """Headline, figures and tables of one setting group (the whole study when it has one group)."""
    fig_dir = out_dir / "figures" / study / where if where else out_dir / "figures" / study
    of = f" ({where}: {label})" if where else ""
    meta = {**meta, "settings_label": label} if where else meta
    head = compute_headline(runs, cells, meta, score)
    base, found, sel_runs = head.base, head.found, head.sel_runs
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

    tables, notes = study_tables(runs, out_dir / "analysis" / study / where if where else
                                 out_dir / "analysis" / study, analysis)
    spec = fig_spectra(tables.get("spectra", pd.DataFrame()), runs, fig_dir, meta)
    figs.append(("Singular spectra of ΔW", [p for p in spec if p.stem == "spectra"]))
    figs.append(("Energy curves of ΔW", [p for p in spec if p.stem == "energy"]))
    figs.append(("Subspace similarity: rank vs rank",
                 fig_phi(tables.get("similarity", pd.DataFrame()), "rank", runs, fig_dir, meta)))
    figs.append(("Subspace similarity: seed vs seed",
                 fig_phi(tables.get("similarity", pd.DataFrame()), "seed", runs, fig_dir, meta)))
    figs.append(("Learning curves", fig_curves(curves, sel_runs, fig_dir, meta)))
    figs += instruct_figures(sel_runs, tables, score, fig_dir, meta)  # instruction tasks: forgetting

    lines = [f"### Headline: how many trainable parameters reach 90% of full fine-tuning{of}", ""]
    lines += headline_lines(head)
    claims = method_claims(found)
    if claims:
        lines += [f"### Published claims on these crossings{of}", "", *claims, ""]
    lines += [f"### Figures{of}", ""]
    for caption, paths in figs:
        pngs = [p for p in paths if p.suffix == ".png" and p.exists()]
        for p in pngs:
            rel = p.relative_to(out_dir).as_posix()
            pdf = f" ([PDF]({rel[:-4]}.pdf))" if p.with_suffix(".pdf").exists() else ""
            lines += [f"**{caption}**{pdf}", "", f"![{caption}]({rel})", ""]
        if not pngs:
            lines += [f"- *{caption}*: no data yet.", ""]
    if not cells.empty:
        lines += [f"### Results per cell (seed mean ± std; selected learning rate){of}", ""]
        show = cells[cells["selected"]].copy()
        show["score"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(show["mean"], show["std"])]
        cols = ["variant", "r", "d", "lr", "n_seeds", "seeds", "score", "min", "max", "trainable_parameters"]
        lines += [md_table(show, cols), ""]
        multi_lr = cells.groupby("cell")["lr"].nunique()
        if (multi_lr > 1).any():
            lines += ["Learning rate searched per cell; all learning rates. `select_score` is the mean over "
                      "the seeds every rate of the cell shares, a diverged seed a failure (`idlab.d90.select_lr`: "
                      "the rate with the highest is selected, here and in the sweep):", "",
                      md_table(cells, ["variant", "r", "d", "lr", "seeds", "mean", "std", "select_score",
                                       "selected"]), ""]
        front = pareto_front(cells)
        if not front.empty:
            lines += [f"### Pareto front: the best cell at each budget of trainable parameters{of}", "",
                      "A cell is on the front when no cell with fewer or equal trainable parameters has a higher "
                      "seed mean (selected learning rate; every method).", "",
                      md_table(front, [c for c in ("trainable_parameters", "method", "variant", "size", "lr",
                                                   "n_seeds", "mean", "std") if c in front]), ""]
    lines += instruct_lines(sel_runs, score, of)
    lines += _delta_lines(tables, of, runs)
    for n in notes:
        lines += [f"- note: {n}"]
    if notes:
        lines.append("")
    return lines, head


def _rank_summary(ranks: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per curve (variant) and size: the mean ranks of ΔW over modules, layers and seeds, and whether the
    update is low-rank (energy rank at p = 0.9 at most a quarter of the full rank)."""
    if "run_id" not in ranks or "variant" not in runs:
        return pd.DataFrame()
    rk = ranks.merge(runs[["run_id", "variant", "size"]], on="run_id", how="inner")
    if rk.empty:
        return pd.DataFrame()
    rk = rk.assign(size=rk["size"].astype(object).where(rk["size"].notna(), "–").astype(str))
    agg = (rk.groupby(["variant", "size"], sort=True)[["n_singular", "energy_rank", "effective_rank", "stable_rank"]]
           .mean().reset_index())
    agg["low-rank?"] = ["yes" if e <= 0.25 * n else "no" for e, n in zip(agg["energy_rank"], agg["n_singular"])]
    return agg


def _delta_lines(tables: Mapping[str, pd.DataFrame], of: str, runs: pd.DataFrame | None = None) -> list[str]:
    """The Delta W tables: Hu et al. Table 7 layout, ranks (per module type; per curve: is ΔW low-rank?),
    intruder dimensions; one line per curve whose runs have no ΔW."""
    lines: list[str] = []
    if runs is not None and "no_delta" in runs:
        for v, why in sorted({(str(a), str(b)) for a, b in zip(runs["variant"], runs["no_delta"]) if pd.notna(b)}):
            lines += [f"- {v}: no ΔW ({why}); left out of the ΔW analysis."]
        if lines:
            lines.append("")
    align = tables.get("alignment", pd.DataFrame())
    amp, cap = amplification_table(align) if not align.empty else (pd.DataFrame(), "")
    lines += [f"### ΔW versus W (Hu et al. Table 7 layout){of}", ""]
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
        lines += [f"### Ranks of ΔW (mean over layers and seeds; energy rank at p = 0.9){of}", "",
                  md_table(agg), ""]
        per = _rank_summary(ranks, runs) if runs is not None else pd.DataFrame()
        if not per.empty:
            lines += [f"### Is ΔW low-rank? Per curve and size (mean over modules, layers and seeds){of}", "",
                      "`n_singular` is the full rank min(d_out, d_in); low-rank: energy rank at p = 0.9 at most a "
                      "quarter of it.", "", md_table(per), ""]
    intr = tables.get("intruders", pd.DataFrame())
    if not intr.empty:
        ia = intr.copy()
        ia["label"] = [spectrum_label(r, targets=True)  # type: ignore[arg-type]
                       for r in ia[["method", "r", "d", "target_modules"]].to_dict("records")]
        ia = ia.groupby(["label", "module_type"], sort=True)["count"].mean().reset_index(name="intruders (mean)")
        lines += [f"### Intruder dimensions (k = 10, eps = 0.5; Shuttleworth et al.){of}", "", md_table(ia), ""]
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
    heads: list[StudyHeadline] = []
    for study in studies:
        srun = runs[runs["study"] == study].reset_index(drop=True)
        scurve = curves[curves["study"] == study]
        lines += report_study(study, srun, scurve, results_dir, out, analysis, heads)
        meta = study_meta(results_dir, study)
        c = cell_table(srun, score_col(meta))
        if not c.empty:
            all_cells.append(c)
    if all_cells:
        pd.concat(all_cells, ignore_index=True).drop(columns=["cell"]).to_parquet(out / "cells.parquet", index=False)
    across = model_size_lines(heads)
    if across:
        lines += ["## Across models", "", *across]
    versions = runs[[str(c) for c in runs.columns if str(c).startswith("version_")] + ["git_commit", "device"]].drop_duplicates()
    lines += ["## Environment", "", md_table(versions.reset_index(drop=True)), ""]
    md = out / "REPORT.md"
    atomic_write_text(md, "\n".join(lines))
    return md




__all__ = ["make_report", "md_table", "report_study"]
