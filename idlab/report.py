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

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idlab.runs import atomic_write_text, iter_result_files, read_json

CELL_KEYS = ["study", "method", "variant", "target_set", "r", "projection", "said", "d", "use_rslora"]
PALETTE_SEED = 0


# --------------------------------------------------------------------------- loading


def _variant(cfg: Mapping[str, Any]) -> str:
    m = cfg.get("method")
    if m == "full":
        return "full FT"
    if m == "lora":
        return f"LoRA {cfg.get('target_set', '?')}" + (" rsLoRA" if cfg.get("use_rslora") else "")
    if m == "subspace":
        return f"{'SAID' if cfg.get('said') else 'DID'} {cfg.get('projection', '?')}"
    return str(m)


def _row(path: Path, res: Mapping[str, Any]) -> dict[str, Any]:
    cfg = res.get("config") or {}
    metric = res.get("metric") or "accuracy"
    metrics, best = res.get("metrics") or {}, res.get("best") or {}
    versions = res.get("versions") or {}
    model = cfg.get("model")
    task = cfg.get("task")
    row: dict[str, Any] = {
        "run_id": res.get("run_id", path.parent.name),
        "study": res.get("study", path.parent.parent.parent.name),
        "status": res.get("status"),
        "error": res.get("error"),
        "method": cfg.get("method"),
        "variant": _variant(cfg),
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
        "head": (res.get("method_info") or {}).get("head", cfg.get("head")),
        "metric": metric,
        "higher_is_better": res.get("higher_is_better", True),
        "score_final": metrics.get(metric),
        "score_best": best.get(metric),
        "converged": res.get("converged"),
        "best_step": best.get("step"),
        "steps": res.get("steps"),
        "trainable_parameters": res.get("trainable_parameters"),
        "total_parameters": res.get("total_parameters"),
        "majority_accuracy": (res.get("task_info") or {}).get("majority_accuracy"),
        "wall_time_s": res.get("wall_time_s"),
        "train_time_s": res.get("train_time_s"),
        "peak_memory_bytes": res.get("peak_memory_bytes"),
        "device": res.get("device"),
        "git_commit": res.get("git_commit"),
        **{f"version_{k}": v for k, v in sorted(versions.items())},
        "run_dir": str(path.parent),
    }
    for k, v in sorted(metrics.items()):
        if k != metric and isinstance(v, (int, float)):
            row[f"final_{k}"] = v
    return row


_INT_COLS = ["seed", "r", "d", "steps", "trainable_parameters", "total_parameters", "peak_memory_bytes"]


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """One row per run found under ``results_dir`` (results root, study or runs folder).

    Columns include run_id, study, status, method, variant, model, task, seed, lr, r,
    target_set, d, projection, said, metric, score_final, score_best,
    trainable_parameters, total_parameters, wall_time_s, peak_memory_bytes, device,
    git_commit, version_*. Rows are sorted (study, method, variant, r, d, lr, seed, run_id).
    """
    rows = []
    for p in iter_result_files(results_dir):
        res = read_json(p)
        if res is not None:
            rows.append(_row(p, res))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for c in _INT_COLS:
        if c in df:
            df[c] = pd.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                              for v in df[c]], dtype="Int64")
    for c in ("said", "use_rslora", "higher_is_better"):
        if c in df:
            df[c] = df[c].astype("boolean")
    for c in ("lr", "lora_alpha", "score_final", "score_best", "best_step", "wall_time_s", "train_time_s"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    order = [c for c in ("study", "method", "variant", "r", "d", "lr", "seed", "run_id") if c in df]
    return df.sort_values(order, na_position="first", kind="mergesort").reset_index(drop=True)


def load_curves(results_dir: str | Path) -> pd.DataFrame:
    """Learning curves, long format: run_id, study, method, variant, seed, step, key, value."""
    rows = []
    for p in iter_result_files(results_dir):
        res = read_json(p)
        if res is None:
            continue
        cfg = res.get("config") or {}
        for point in res.get("curve") or []:
            step = point.get("step")
            for k, v in sorted(point.items()):
                if k != "step" and isinstance(v, (int, float)):
                    rows.append({"run_id": res.get("run_id"), "study": res.get("study"), "method": cfg.get("method"),
                                 "variant": _variant(cfg), "seed": cfg.get("seed"), "step": step, "key": k,
                                 "value": float(v)})
    df = pd.DataFrame(rows, columns=["run_id", "study", "method", "variant", "seed", "step", "key", "value"])
    return df.sort_values(["study", "run_id", "step", "key"], kind="mergesort").reset_index(drop=True)


# --------------------------------------------------------------------------- aggregation


def _study_meta(results_dir: Path, study: str) -> dict[str, Any]:
    for cand in (results_dir / study / "study.json", results_dir / "study.json"):
        meta = read_json(cand)
        if meta and (meta.get("study") or {}).get("name") == study:
            return meta
    return {}


def _score_col(meta: Mapping[str, Any]) -> str:
    return "score_best" if (meta.get("study") or {}).get("score") == "best" else "score_final"


def cell_table(df: pd.DataFrame, score: str = "score_final") -> pd.DataFrame:
    """Seed statistics per cell x learning rate (status ok/diverged), with ``selected`` = best lr of the cell.

    Learning rates are compared on the seeds they share: where a cell's rates were run on
    different seeds (a one-seed probe beside a three-seed cell), ``select_score`` is each
    rate's mean over the seeds every rate of the cell has, so that a lucky single seed is not
    weighed against a three-seed mean. Without shared seeds it falls back to the full mean.
    """
    ok = df[df["status"].isin(["ok", "diverged"])].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["score"] = ok[score]
    keys = [k for k in CELL_KEYS if k in ok] + ["lr"]
    filled = ok[keys].astype(object).where(ok[keys].notna(), "-")
    ok = ok.assign(**{f"_k_{k}": filled[k].astype(str) for k in keys})
    g = ok.groupby([f"_k_{k}" for k in keys], sort=True, dropna=False)
    rows = []
    for _, grp in g:
        first = grp.iloc[0]
        s = grp["score"].astype(float)
        rows.append({**{k: first[k] for k in keys}, "n_seeds": int(s.notna().sum()),
                     "seeds": ",".join(str(v) for v in sorted(grp["seed"].dropna().astype(int))),
                     "mean": float(s.mean()), "std": float(s.std(ddof=1)) if s.notna().sum() > 1 else 0.0,
                     "min": float(s.min()), "max": float(s.max()),
                     "_by_seed": {int(k): float(v) for k, v in zip(grp["seed"], s)
                                  if pd.notna(k) and pd.notna(v)},
                     "trainable_parameters": int(grp["trainable_parameters"].dropna().iloc[0])
                     if grp["trainable_parameters"].notna().any() else None,
                     "model": first["model"], "task": first["task"], "metric": first["metric"]})
    cells = pd.DataFrame(rows)
    ck = [k for k in CELL_KEYS if k in cells]
    ck_str = cells[ck].astype(object).where(cells[ck].notna(), "-").astype(str).agg("|".join, axis=1)
    cells["cell"] = ck_str
    cells["select_score"] = cells["mean"]
    for _, grp in cells.groupby("cell", sort=True):
        seed_sets = [set(b) for b in grp["_by_seed"] if b]
        shared = set.intersection(*seed_sets) if seed_sets else set()
        if len(grp) > 1 and shared:
            cells.loc[grp.index, "select_score"] = [
                float(np.mean([b[k] for k in sorted(shared)])) if b else np.nan for b in grp["_by_seed"]]
    cells = cells.drop(columns="_by_seed")
    best_idx = cells.assign(_m=cells["select_score"].fillna(-np.inf)).groupby("cell", sort=True)["_m"].idxmax()
    cells["selected"] = False
    cells.loc[best_idx.values, "selected"] = True
    order = [c for c in ("study", "method", "variant", "r", "d", "lr") if c in cells]
    return cells.sort_values(order, na_position="first", kind="mergesort").reset_index(drop=True)


def _groups(df: pd.DataFrame, col: str) -> list[tuple[str, pd.DataFrame]]:
    """``df`` grouped by ``col``, keys as strings, sorted."""
    return sorted(((str(k), g) for k, g in df.groupby(col, sort=True)), key=lambda kv: kv[0])


def _crossing(ds: Sequence[float], means: Sequence[float], target: float) -> tuple[float | None, float | None]:
    """(smallest grid value reaching target, log-interpolated crossing) of an increasing-x curve."""
    for i, (d, m) in enumerate(zip(ds, means)):
        if m >= target:
            if i == 0:
                return d, d
            d0, m0 = ds[i - 1], means[i - 1]
            if m == m0:
                return d, d
            t = (target - m0) / (m - m0)
            return d, float(math.exp(math.log(d0) + t * (math.log(d) - math.log(d0))))
    return None, None


def threshold_crossing(runs: pd.DataFrame, x: str, target: float, score: str, n_boot: int = 100,
                       seed: int = 0) -> dict[str, Any]:
    """d90 / r90 of one curve: smallest ``x`` whose seed-mean score >= target, interpolation, bootstrap CI.

    The interval is the 5-95% range of the interpolated crossing over ``n_boot``
    resamples of the seeds (with replacement, per x value), seeded for determinism.
    ``n_seeds`` gives the number of scored runs at each grid point (aligned with ``grid``), so
    a caller can flag a crossing that rests on fewer seeds than the rest of the curve.
    """
    per_x = {float(str(k)): g[score].dropna().to_numpy(float) for k, g in runs.groupby(x, sort=True)}
    xs = [k for k, v in per_x.items() if len(v)]
    means = [float(per_x[k].mean()) for k in xs]
    grid, interp = _crossing(xs, means, target)
    rng = np.random.default_rng(seed)
    boots = []
    if len(xs) and max(len(per_x[k]) for k in xs) > 1:
        for _ in range(n_boot):
            ms = [float(rng.choice(per_x[k], size=len(per_x[k]), replace=True).mean()) for k in xs]
            _, b = _crossing(xs, ms, target)
            boots.append(np.inf if b is None else b)
    lo = hi = None
    if boots:
        arr = np.sort(np.array(boots))
        lo, hi = (float(arr[math.floor(q * (len(arr) - 1))]) for q in (0.05, 0.95))
    return {"value": grid, "interp": interp, "ci_low": lo, "ci_high": hi, "n_boot": len(boots),
            "grid": xs, "means": means, "n_seeds": [len(per_x[k]) for k in xs]}


# --------------------------------------------------------------------------- figures


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"svg.hashsalt": "idlab", "pdf.compression": 6, "figure.dpi": 100, "savefig.dpi": 130,
                         "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8})
    return plt


_FORMATS: tuple[str, ...] = ("png", "pdf")  # set by make_report(formats=...)


def _save(fig: Any, out: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``name``.png / .pdf without timestamps or version strings (byte-stable)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    meta = {"png": {"Software": None},
            "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}}
    for ext in _FORMATS:
        paths.append(out / f"{name}.{ext}")
        fig.savefig(paths[-1], metadata=meta[ext], bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _title(meta: Mapping[str, Any], what: str, df: pd.DataFrame) -> str:
    model = df["model"].dropna().iloc[0] if "model" in df and df["model"].notna().any() else "?"
    task = df["task"].dropna().iloc[0] if "task" in df and df["task"].notna().any() else "?"
    seeds = sorted(int(s) for s in df["seed"].dropna().unique()) if "seed" in df else []
    return f"{what}\n{model} on {task}, seeds {seeds}"


_VARIANT_ORDER = ["full FT", "DID fastfood", "SAID fastfood", "DID dense", "SAID dense", "DID sparse", "SAID sparse"]


def _colors(variants: Sequence[str]) -> dict[str, Any]:
    """Fixed colour per variant (the same in every figure): DID/SAID/full first, LoRA sets after."""
    import seaborn as sns

    pal = list(sns.color_palette("tab10", 10)) + list(sns.color_palette("Dark2", 8))
    others = sorted(v for v in set(variants) if v not in _VARIANT_ORDER)
    out = {}
    for v in set(variants):
        i = _VARIANT_ORDER.index(v) if v in _VARIANT_ORDER else len(_VARIANT_ORDER) + others.index(v)
        out[v] = pal[i % len(pal)]
    return out


def _log_axis(axis: Any) -> None:
    """Log scale with plain major labels and no crowded minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())


def fig_perf_vs_d(sel: pd.DataFrame, runs: pd.DataFrame, d90: dict[str, dict[str, Any]], base: dict[str, Any],
                  score: str, out: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Performance vs subspace dimension d per projection and DID/SAID, seeds, baseline, 90% line, d90."""
    plt = _mpl()
    sub = runs[(runs["method"] == "subspace") & runs[score].notna()]
    if sub.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _colors(list(sub["variant"].unique()))
    for v, g in _groups(sub, "variant"):
        ax.scatter(g["d"].astype(float), g[score], s=14, alpha=0.45, color=colors[v])
        m = g.groupby("d")[score].agg(["mean", "min", "max"]).sort_index()
        x = m.index.astype(float)
        ax.plot(x, m["mean"], "-o", color=colors[v], label=f"{v} (mean over seeds)", ms=4)
        ax.fill_between(x, m["min"], m["max"], color=colors[v], alpha=0.15, lw=0)
        res = d90.get(v)
        if res and res.get("interp") is not None:
            ax.axvline(res["interp"], color=colors[v], ls=":", lw=1.2)
            if res.get("ci_low") is not None and math.isfinite(res["ci_high"]):
                ax.axvspan(res["ci_low"], res["ci_high"], color=colors[v], alpha=0.08)
            ax.annotate(f"d90≈{res['interp']:.0f}", (res["interp"], ax.get_ylim()[0]), xytext=(3, 6),
                        textcoords="offset points", color=colors[v], fontsize=8)
    if base.get("value") is not None:
        ax.axhline(base["value"], color="k", lw=1, label=f"baseline ({base['kind']}) {base['value']:.3f}")
        ax.axhline(base["target"], color="k", ls="--", lw=1, label=f"{base['threshold']:.0%} of baseline")
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("subspace dimension d (log)")
    ax.set_ylabel(f"validation {sub['metric'].iloc[0]} ({score.replace('score_', '')})")
    ax.set_title(_title(meta, "Performance vs subspace dimension (band: seed min-max)", sub))
    ax.legend(loc="best")
    return _save(fig, out, "perf_vs_d")


def fig_perf_vs_params(sel: pd.DataFrame, runs: pd.DataFrame, d90: dict[str, dict[str, Any]],
                       r90: dict[str, dict[str, Any]], base: dict[str, Any], score: str, out: Path,
                       meta: Mapping[str, Any]) -> list[Path]:
    """THE HEADLINE: performance vs trainable parameters (log x) for every method, d90 and r90 marked."""
    plt = _mpl()
    cells = sel[sel["selected"] & sel["mean"].notna() & sel["trainable_parameters"].notna()]
    if cells.empty:
        return []
    fig, ax = plt.subplots(figsize=(7.4, 4.8))
    colors = _colors(list(cells["variant"].unique()))
    markers = {"full": "*", "lora": "s", "subspace": "o"}
    for v, g in _groups(cells, "variant"):
        g = g.sort_values("trainable_parameters")
        method = g["method"].iloc[0]
        x = g["trainable_parameters"].astype(float).to_numpy()
        yerr = np.vstack([g["mean"] - g["min"], g["max"] - g["mean"]])
        ax.errorbar(x, g["mean"], yerr=yerr, fmt="-" + markers.get(method, "o"), color=colors[v], label=v,
                    ms=11 if method == "full" else 5, capsize=2, lw=1.2)
        if method == "lora":
            for xi, (_, row) in zip(x, g.iterrows()):
                ax.annotate(f"r{int(row['r'])}", (xi, row["mean"]), xytext=(2, 4), textcoords="offset points",
                            fontsize=7, color=colors[v])
    if base.get("value") is not None:
        ax.axhline(base["value"], color="k", lw=1, label=f"baseline ({base['kind']})")
        ax.axhline(base["target"], color="k", ls="--", lw=1, label=f"{base['threshold']:.0%} of baseline")
    if base.get("floor") is not None:
        ax.axhline(base["floor"], color="grey", ls=":", lw=1, label="majority class")
    for v, res in sorted(d90.items()):
        if res.get("interp") is not None:
            ax.axvline(res["interp"] + res.get("extra", 0), color=colors.get(v, "grey"), ls=":", lw=1.2)
            ax.annotate(f"d90 {v}", (res["interp"] + res.get("extra", 0), base.get("target", 0)), rotation=90,
                        fontsize=7, xytext=(-9, -60), textcoords="offset points", color=colors.get(v, "grey"))
    for v, res in sorted(r90.items()):
        if res.get("params") is not None:
            ax.plot([res["params"]], [res["mean"]], marker="o", ms=13, mfc="none", mec=colors.get(v, "grey"), mew=1.8)
            ax.annotate(f"r90={int(res['value'])}", (res["params"], res["mean"]), xytext=(6, -12),
                        textcoords="offset points", fontsize=8, color=colors.get(v, "grey"))
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"validation {cells['metric'].iloc[0]} (seed mean, bars min-max)")
    ax.set_title(_title(meta, "Performance vs trainable parameters: full FT, DID/SAID, LoRA", runs))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, out, "perf_vs_params")


def fig_lora_heatmap(sel: pd.DataFrame, runs: pd.DataFrame, out: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Rank x target-set heatmap of the seed-mean metric (selected lr)."""
    plt = _mpl()
    import seaborn as sns

    lo = sel[(sel["method"] == "lora") & sel["selected"]]
    if lo.empty:
        return []
    piv = lo.pivot_table(index="target_set", columns="r", values="mean", aggfunc="mean").sort_index()
    piv.columns = [int(c) for c in piv.columns]
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * piv.shape[1], 1.4 + 0.55 * piv.shape[0]))
    sns.heatmap(piv, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar_kws={"label": f"{lo['metric'].iloc[0]}"})
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("target modules")
    ax.set_title(_title(meta, "LoRA: rank x target set (seed mean)", runs[runs["method"] == "lora"]))
    return _save(fig, out, "lora_rank_target_heatmap")


def _spectrum_label(row: Mapping[str, Any], targets: bool = False) -> str:
    """Legend / table label of a run in the analysis tables (LoRA r, subspace d, full FT)."""
    m = row["method"]
    if m == "lora":
        tm = row.get("target_modules")
        if targets and isinstance(tm, str) and tm:
            from idlab.config import target_set_label

            return f"LoRA {target_set_label(tm.split(','))} r={int(row['r'])}"
        return f"LoRA r={int(row['r'])}"
    if m == "subspace":
        return f"subspace d={int(row['d'])}"
    return "full FT"


def _type_label(t: str, df: pd.DataFrame) -> str:
    """Module type for titles; a numeric type (``net.0`` -> ``0``) is shown as the module name."""
    if not str(t).isdigit():
        return str(t)
    mods = sorted(df.loc[df["module_type"] == t, "module"].unique())
    return f"module {mods[0]}" if len(mods) == 1 else f"modules *.{t}"


def fig_spectra(spectra: pd.DataFrame, runs: pd.DataFrame, out: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Normalised singular spectra and energy curves of Delta W per module type and rank/method."""
    plt = _mpl()
    import seaborn as sns

    if spectra is None or spectra.empty:
        return []
    sp = spectra.copy()
    if "target_modules" in sp and runs is not None and "target_set" in runs:
        ts = runs.set_index("run_id")["target_set"].to_dict()
        sp["target_set"] = sp["run_id"].map(ts)
    sp["label"] = [_spectrum_label(r) for r in sp[["method", "r", "d"]].to_dict("records")]  # type: ignore[arg-type]
    sp["s_norm"] = sp["singular_value"] / sp.groupby(["run_id", "module"])["singular_value"].transform("max")
    sp = sp[sp["index"] <= 64]
    agg = (sp.groupby(["module_type", "label", "index"], sort=True)[["s_norm", "energy_cumulative"]]
           .mean().reset_index())
    types = sorted(agg["module_type"].unique())[:6]
    agg = agg[agg["module_type"].isin(types)]
    labels = sorted(agg["label"].unique(), key=lambda s: (s.split()[0], int(s.split("=")[1]) if "=" in s else 0))
    pal = dict(zip(labels, sns.color_palette("viridis", len(labels))))
    if "full FT" in pal:
        pal["full FT"] = (0.8, 0.1, 0.1)
    paths = []
    for col, ylab, name, logy in (("s_norm", "singular value / largest", "spectra", True),
                                  ("energy_cumulative", "cumulative energy sum s_i^2 / sum s^2", "energy", False)):
        fig, axes = plt.subplots(1, len(types), figsize=(3.3 * len(types) + 1.6, 3.6), squeeze=False, sharey=True,
                                 layout="constrained")
        for ax, t in zip(axes[0], types):
            g = agg[agg["module_type"] == t]
            for lab in labels:
                gg = g[g["label"] == lab]
                if not gg.empty:
                    ax.plot(gg["index"], gg[col], "-", marker="o", ms=3, color=pal[lab], label=lab)
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            if col == "energy_cumulative":
                ax.axhline(0.9, color="k", ls="--", lw=0.8)
            ax.set_title(f"{_type_label(t, sp)} (mean: layers, seeds, target sets)", fontsize=9)
            ax.set_xlabel("singular value index i (log)")
        axes[0][0].set_ylabel(ylab)
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.suptitle(_title(meta, "Singular spectra of Delta W" if col == "s_norm" else
                            "Energy of Delta W (90% line = energy rank k_0.9)", runs))
        paths += _save(fig, out, name)
    return paths


def fig_phi(sim: pd.DataFrame, kind: str, runs: pd.DataFrame, out: Path, meta: Mapping[str, Any]) -> list[Path]:
    """phi(i, j) maps (Hu et al. 7.2) for rank pairs (r=8 vs 64 preferred) or seed pairs, beside the random baseline."""
    plt = _mpl()
    import seaborn as sns

    if sim is None or sim.empty:
        return []
    s = sim[sim["pair_kind"] == kind]
    if s.empty:
        return []
    pairs = s[["r_a", "r_b"]].drop_duplicates().dropna().astype(int).apply(tuple, axis=1).tolist()
    if not pairs:
        return []
    want = (8, 64) if kind == "rank" else (64, 64)
    pair = want if want in pairs else max(pairs, key=lambda p: (p[1], p[0]) if kind == "seed" else (p[1] - p[0], p[1]))
    s = s[(s["r_a"] == pair[0]) & (s["r_b"] == pair[1])]
    types = sorted(s["module_type"].unique())[:3]
    fig, axes = plt.subplots(1, len(types) + 1, figsize=(3.6 * (len(types) + 1), 3.4), squeeze=False,
                             layout="constrained")
    vmax = 1.0
    for ax, t in zip(axes[0], types):
        g = s[s["module_type"] == t]
        m = g.groupby(["i", "j"])["phi"].mean().unstack("j").sort_index()
        sns.heatmap(m, ax=ax, vmin=0, vmax=vmax, cmap="magma", cbar=False)
        ax.set_title(f"{_type_label(t, g)}: phi, {g['module'].nunique()} layer(s)")
        ax.set_xlabel(f"j (r={pair[1]} run)" if kind == "rank" else "j (second seed)")
        ax.set_ylabel(f"i (r={pair[0]} run)" if kind == "rank" else "i (first seed)")
    ax = axes[0][-1]
    base = s.groupby(["i", "j"])["random_baseline"].mean().unstack("j").sort_index()
    sns.heatmap(base, ax=ax, vmin=0, vmax=vmax, cmap="magma", cbar=True, cbar_kws={"label": "phi"})
    ax.set_title("random subspaces: E phi = max(i,j)/k", fontsize=9)
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    for a in axes[0]:
        a.tick_params(labelsize=6)
    what = (f"Subspace similarity phi, LoRA r={pair[0]} vs r={pair[1]} (same seed)" if kind == "rank"
            else f"Subspace similarity phi, LoRA r={pair[0]}, seed vs seed")
    fig.suptitle(_title(meta, what, runs[runs["method"] == "lora"]))
    return _save(fig, out, f"phi_{kind}")


def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame, out: Path, meta: Mapping[str, Any]) -> list[Path]:
    """Learning curves (validation metric vs step), one line per run, coloured by variant."""
    plt = _mpl()
    if curves is None or curves.empty or runs.empty:
        return []
    metric = runs["metric"].dropna().iloc[0]
    c = curves[(curves["key"] == metric) & curves["run_id"].isin(runs["run_id"])]
    if c.empty:
        return []
    colors = _colors(list(c["variant"].unique()))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    seen = set()
    for _rid, g in c.groupby("run_id", sort=True):
        v = g["variant"].iloc[0]
        ax.plot(g["step"], g["value"], color=colors[v], alpha=0.5, lw=1, label=None if v in seen else v)
        seen.add(v)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(_title(meta, "Learning curves (one line per run)", runs))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, out, "curves")


# --------------------------------------------------------------------------- analysis


def _analysis(study_runs: pd.DataFrame, out: Path, enabled: bool) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Run (or reuse) `idlab.analysis.export.analyze_runs` for the ok runs that have deltas."""
    notes: list[str] = []
    if not enabled:
        return {}, ["analysis disabled (--no-analysis)"]
    try:
        from idlab.analysis.export import analyze_runs
    except ImportError as e:
        return {}, [f"idlab.analysis.export not available ({e}): no spectra / phi / amplification"]
    ok = study_runs[(study_runs["status"] == "ok")]
    dirs = sorted(Path(d) for d in ok["run_dir"] if (Path(d) / "delta.safetensors").exists())
    if not dirs:
        return {}, ["no delta.safetensors among the ok runs: no spectra / phi / amplification"]
    manifest = out / "runs.json"
    want = [d.name for d in dirs]
    names = ["spectra", "ranks", "similarity", "similarity_summary", "alignment", "intruders", "notes"]
    prev = read_json(manifest)
    if prev and prev.get("run_ids") == want and all((out / f"{n}.parquet").exists() for n in names):
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
                weights = _base_weights(grp)
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
    atomic_write_text(manifest, json.dumps({"run_ids": want}, indent=1) + "\n")
    return {n: tables.get(n, pd.DataFrame()) for n in names}, notes


def _const(weights: dict[str, Any]) -> Any:
    """A ``base_weights`` callable returning ``weights`` whatever the model name."""

    def f(_name: str) -> dict[str, Any]:
        return weights

    return f


def _base_weights(grp: pd.DataFrame) -> dict[str, Any]:
    """W_0 (every nn.Linear weight) of the base model of these runs' seed, rebuilt as the sweep built it."""
    from idlab.methods import build_task_and_model, linear_weights

    res = read_json(Path(grp["run_dir"].iloc[0]) / "result.json") or {}
    cfg = dict(res["config"])
    _, model = build_task_and_model(cfg)
    return {n: w.detach().float().cpu() for n, w in linear_weights(model).items()}


# --------------------------------------------------------------------------- markdown


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


def amplification_table(align: pd.DataFrame, ranks: Sequence[int] = (4, 64)) -> tuple[pd.DataFrame, str]:
    """Hu et al. Table 7 layout: rows ||U^T W V^T||_F for Delta W / W / random, ||W||_F, ||Delta W||_F, amplification.

    Columns are the LoRA runs at ranks ``ranks`` (the available ones nearest to them
    when absent) for the most common module type (q_proj preferred), averaged over
    layers and seeds. Returns (table, caption).
    """
    lo = align[align["method"] == "lora"] if not align.empty else align
    if lo.empty:
        return pd.DataFrame(), ""
    types = lo["module_type"].value_counts()
    mtype = "q_proj" if "q_proj" in types.index else str(sorted(types.index, key=lambda t: (-types[t], t))[0])
    lo = lo[lo["module_type"] == mtype]
    avail = sorted(int(r) for r in lo["r"].dropna().unique())
    chosen: list[int] = []
    for want in ranks:
        best = min(avail, key=lambda a: (abs(math.log(a) - math.log(want)), a))
        if best not in chosen:
            chosen.append(best)
    rows = {"||U^T W V^T||_F, U,V from ΔW": "proj_delta", "||U^T W V^T||_F, U,V from W (top r)": "proj_weight",
            "||U^T W V^T||_F, U,V random": "proj_random", "||W||_F": "weight_fro", "||ΔW||_F": "delta_fro",
            "amplification ||ΔW||_F / ||U^T W V^T||_F": "amplification"}
    data = {}
    for r in chosen:
        g = lo[lo["r"] == r]
        data[f"r = {r}"] = [float(g[c].mean()) for c in rows.values()]
    table = pd.DataFrame(data, index=list(rows)).reset_index(names="quantity")
    layers = sorted(int(x) for x in lo["layer"].dropna().unique()) if "layer" in lo else []
    cap = (f"{mtype}, mean over {len(layers) or lo['module'].nunique()} layer(s) and "
           f"{lo['seed'].nunique()} seed(s); Hu et al. report layer 48 of GPT-3 Wq "
           "(ΔW 0.32/1.90, W 21.67/37.71, random 0.02/0.33; amplification ≈21.5 / ≈2 at r=4/64).")
    return table, cap


# --------------------------------------------------------------------------- report


def _baseline(runs: pd.DataFrame, cells: pd.DataFrame, meta: Mapping[str, Any]) -> dict[str, Any]:
    sub = (meta.get("study") or {}).get("subspace") or {}
    threshold = float(sub.get("threshold", 0.9))
    if sub.get("baseline") is not None:
        v = float(sub["baseline"])
        return {"value": v, "kind": "global (fixed)", "threshold": threshold, "target": threshold * v}
    full = cells[(cells["method"] == "full") & cells["selected"]] if not cells.empty else cells
    if full.empty or full["mean"].isna().all():
        return {"value": None, "kind": "missing (no full fine-tuning result)", "threshold": threshold}
    v = float(full["mean"].iloc[0])
    return {"value": v, "kind": f"local: full FT mean of {int(full['n_seeds'].iloc[0])} seed(s)",
            "threshold": threshold, "target": threshold * v}


def _selected_runs(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Runs at the selected learning rate of their cell."""
    if cells.empty:
        return runs.iloc[0:0]
    sel = cells[cells["selected"]]
    keys = [k for k in CELL_KEYS if k in runs] + ["lr"]

    def key(df: pd.DataFrame) -> pd.Series:
        return df[keys].astype(object).where(df[keys].notna(), "-").astype(str).agg("|".join, axis=1)

    return runs[key(runs).isin(set(key(sel)))]


def _ci_text(res: Mapping[str, Any], fmt: str) -> str:
    """'[lo, hi]' of a bootstrap interval; 'not reached' for an end beyond the grid; '–' without one."""
    lo, hi = res.get("ci_low"), res.get("ci_high")
    if res.get("value") is None or lo is None or hi is None:
        return "–"

    def one(v: float) -> str:
        return fmt.format(v) if math.isfinite(v) else "not reached"

    return f"[{one(lo)}, {one(hi)}]"


def _crossings(sel_runs: pd.DataFrame, cells: pd.DataFrame, target: float | None,
               score: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """d90 per subspace variant and r90 per LoRA target set for one target score."""
    d90: dict[str, dict[str, Any]] = {}
    r90: dict[str, dict[str, Any]] = {}
    if target is None:
        return d90, r90
    for v, g in _groups(sel_runs[sel_runs["method"] == "subspace"], "variant"):
        res = threshold_crossing(g, "d", target, score)
        extra = g["trainable_parameters"].astype(float) - g["d"].astype(float)
        res["extra"] = float(extra.median()) if len(extra) else 0.0  # directly trained head, counted
        d90[v] = res
    for v, g in _groups(sel_runs[sel_runs["method"] == "lora"], "variant"):
        res = threshold_crossing(g, "r", target, score)
        if res["value"] is not None:
            at = cells[(cells["variant"] == v) & cells["selected"] & (cells["r"] == res["value"])]
            res["params"] = int(at["trainable_parameters"].iloc[0]) if len(at) else None
            res["mean"] = float(at["mean"].iloc[0]) if len(at) else None
        r90[v] = res
    return d90, r90


def _majority_floor(runs: pd.DataFrame) -> float | None:
    """Dev accuracy of always predicting the majority training class, when the metric is accuracy."""
    if "majority_accuracy" not in runs or runs["metric"].dropna().iloc[0] != "accuracy":
        return None
    v = runs["majority_accuracy"].dropna()
    return float(v.iloc[0]) if len(v) else None


def _grid_text(res: Mapping[str, Any]) -> str:
    """'1000 (1 seed), 10000 (3 seeds)': the grid searched with the runs behind each point."""
    return ", ".join(f"{int(x)} ({n} seed{'s' if n != 1 else ''})" for x, n in zip(res["grid"], res["n_seeds"]))


def thin_crossings(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Variants whose grid value rests on fewer seeds than the best-covered point of their curve."""
    out = []
    for v, res in sorted(results.items()):
        if res["value"] is not None:  # the grid value is one of res["grid"]
            n_at, n_max = dict(zip(res["grid"], res["n_seeds"]))[res["value"]], max(res["n_seeds"])
            if n_at < n_max:
                out.append(f"{v} ({n_at} of {n_max} seeds)")
    return out


def _crossing_rows(d90: Mapping[str, Mapping[str, Any]], r90: Mapping[str, Mapping[str, Any]],
                   suffix: str = "") -> list[dict[str, Any]]:
    """Rows of the headline table: d90 per subspace variant, then r90 per LoRA target set."""
    rows = []
    for quantity, results, fmt in (("d90", d90, "{:.0f}"), ("r90", r90, "{:.2f}")):
        for v, res in sorted(results.items()):
            if quantity == "d90":  # d plus the directly trained head
                params = None if res["value"] is None else res["value"] + res.get("extra", 0)
            else:
                params = res.get("params")
            rows.append({"method": v, "quantity": quantity + suffix, "grid value": res["value"],
                         "interpolated": res["interp"], "90% interval (bootstrap over seeds)": _ci_text(res, fmt),
                         "trainable parameters": params, "grid searched (runs per point)": _grid_text(res)})
    return rows


def report_study(study: str, runs: pd.DataFrame, curves: pd.DataFrame, results_dir: Path, out_dir: Path,
                 analysis: bool = True) -> list[str]:
    """Figures, analysis tables and the REPORT.md section (returned as lines) of one study."""
    meta = _study_meta(results_dir, study)
    score = _score_col(meta)
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
            lines.append(f"- missing `{rid}`: {_variant(c) if c else '?'} r={c.get('r', '–')} d={c.get('d', '–')} "
                         f"lr={c.get('lr', '–')} seed={c.get('seed', '–')}")
        for _, row in bad.iterrows():
            lines.append(f"- {row['status']} `{row['run_id']}` ({row['variant']}, seed {row['seed']}): "
                         f"{str(row['error'])[:200]}")
        lines.append("")
    cells = cell_table(runs, score)
    base = _baseline(runs, cells, meta)
    sel_runs = _selected_runs(runs, cells)
    # d90 per subspace variant, r90 per LoRA target set
    d90, r90 = _crossings(sel_runs, cells, base.get("target"), score)
    # the same above the majority-class floor (when the published target is close to it)
    floor = _majority_floor(runs)
    chance: dict[str, Any] = {}
    if floor is not None and base.get("value") is not None:
        t = floor + base["threshold"] * (base["value"] - floor)
        chance = {"floor": floor, "target": t}
        base["floor"] = floor
        chance["d90"], chance["r90"] = _crossings(sel_runs, cells, t, score)
    figs: list[tuple[str, list[Path]]] = []
    figs.append(("Headline: performance vs trainable parameters",
                 fig_perf_vs_params(cells, runs, d90, r90, base, score, fig_dir, meta)))
    figs.append(("Performance vs subspace dimension d", fig_perf_vs_d(cells, sel_runs, d90, base, score, fig_dir, meta)))
    figs.append(("LoRA rank x target set", fig_lora_heatmap(cells, runs, fig_dir, meta)))
    tables, notes = _analysis(runs, out_dir / "analysis" / study, analysis)
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
                  "(or `subspace.baseline`).", ""]
    else:
        lines += [f"Baseline {base['value']:.4f} ({base['kind']}); target {base['threshold']:.0%} = "
                  f"{base['target']:.4f}.", ""]
        rows = _crossing_rows(d90, r90)
        if chance:
            floor, t = chance["floor"], chance["target"]
            lines += [f"Majority-class floor {floor:.4f} (always predicting the most frequent training class). "
                      + (f"**The {base['threshold']:.0%} target is at or below this floor: a model that ignores "
                         "its input meets it, so d90 / r90 by the published definition say nothing here.** "
                         if base["target"] <= floor else "")
                      + f"Rows marked 'above chance' use target = floor + {base['threshold']:.0%} x "
                      f"(baseline - floor) = {t:.4f}.", ""]
            rows += _crossing_rows(chance["d90"], chance["r90"], " (above chance)")
        if rows:
            lines += [md_table(pd.DataFrame(rows)), "",
                      "A grid value of – means the threshold was not reached on the grid. "
                      "Interpolation is linear in log(d) / log(r) between the bracketing grid points.", ""]
            thin = [t for res in (d90, r90, *((chance["d90"], chance["r90"]) if chance else ()))
                    for t in thin_crossings(res)]
            if thin:
                lines += ["**Warning: some crossings rest on fewer seeds than the rest of their curve:** "
                          + "; ".join(thin) + ". Run the missing seeds at that point before quoting them.", ""]
            from idlab.convergence import unconverged_crossings

            unconv = unconverged_crossings([(d90, "d"), (r90, "r"), *(((chance["d90"], "d"), (chance["r90"], "r"))
                                                                     if chance else ())], sel_runs.to_dict("records"))
            if unconv:
                lines += ["**Warning: some crossings rest on runs whose validation metric had not plateaued "
                          "(idlab.convergence):** " + "; ".join(unconv) + ". Train them longer "
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
                      "the seeds every rate of the cell shares (the rate with the highest is selected):", "",
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
        rk["label"] = [_spectrum_label(r, targets=True)  # type: ignore[arg-type]
                       for r in rk[["method", "r", "d", "target_modules"]].to_dict("records")]
        agg = (rk.groupby(["label", "module_type"], sort=True)[["energy_rank", "effective_rank", "stable_rank",
                                                                 "fro_norm"]].mean().reset_index())
        lines += ["### Ranks of ΔW (mean over layers and seeds; energy rank at p = 0.9)", "",
                  md_table(agg), ""]
    intr = tables.get("intruders", pd.DataFrame())
    if not intr.empty:
        ia = intr.copy()
        ia["label"] = [_spectrum_label(r, targets=True)  # type: ignore[arg-type]
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
    """
    global _FORMATS
    bad = [f for f in formats if f not in ("png", "pdf")]
    if bad or not formats:
        raise ValueError(f"make_report: formats {list(formats)}; allowed values: png, pdf")
    _FORMATS = tuple(formats)
    results_dir = Path(results_dir)
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
        meta = _study_meta(results_dir, study)
        c = cell_table(srun, _score_col(meta))
        if not c.empty:
            all_cells.append(c)
    if all_cells:
        pd.concat(all_cells, ignore_index=True).drop(columns=["cell"]).to_parquet(out / "cells.parquet", index=False)
    versions = runs[[str(c) for c in runs.columns if str(c).startswith("version_")] + ["git_commit", "device"]].drop_duplicates()
    lines += ["## Environment", "", md_table(versions.reset_index(drop=True)), ""]
    md = out / "REPORT.md"
    atomic_write_text(md, "\n".join(lines))
    return md


__all__ = ["amplification_table", "cell_table", "load_curves", "load_results", "make_report", "md_table",
           "report_study", "thin_crossings", "threshold_crossing"]
