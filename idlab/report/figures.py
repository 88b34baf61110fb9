"""Figures of the report (seaborn; PNG and PDF without timestamps, so byte-stable).

Every ``fig_*`` function takes the tables it draws, writes ``<name>.png|pdf`` into ``out``
and returns the paths (empty where its data does not exist). Its docstring names the
columns it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from idlab import methods
from idlab.report.tables import Crossings, CurveCrossing, groups

if TYPE_CHECKING:
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update({"svg.hashsalt": "idlab", "pdf.compression": 6, "figure.dpi": 100, "savefig.dpi": 130,
                         "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8})
    return plt


_FORMATS: tuple[str, ...] = ("png", "pdf")  # set by make_report(formats=...) through set_formats


def set_formats(formats: Sequence[str]) -> None:
    """The figure formats ``_save`` writes (among png and pdf)."""
    global _FORMATS
    bad = [f for f in formats if f not in ("png", "pdf")]
    if bad or not formats:
        raise ValueError(f"make_report: formats {list(formats)}; allowed values: png, pdf")
    _FORMATS = tuple(formats)


def _save(fig: Figure, out: Path, name: str) -> list[Path]:
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


def _title(meta: Mapping[str, object], what: str, df: pd.DataFrame) -> str:
    model = df["model"].dropna().iloc[0] if "model" in df and df["model"].notna().any() else "?"
    task = df["task"].dropna().iloc[0] if "task" in df and df["task"].notna().any() else "?"
    seeds = sorted(int(s) for s in df["seed"].dropna().unique()) if "seed" in df else []
    group = f" ({meta['settings_label']})" if meta.get("settings_label") else ""  # one setting group
    return f"{what}\n{model}{group} on {task}, seeds {seeds}"


_VARIANT_ORDER = ["full FT", "DID fastfood", "SAID fastfood", "DID dense", "SAID dense", "DID sparse", "SAID sparse"]


def _colors(variants: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """Fixed colour per variant (the same in every figure): DID/SAID/full first, LoRA sets after."""
    import seaborn as sns

    pal = list(sns.color_palette("tab10", 10)) + list(sns.color_palette("Dark2", 8))
    others = sorted(v for v in set(variants) if v not in _VARIANT_ORDER)
    out = {}
    for v in set(variants):
        i = _VARIANT_ORDER.index(v) if v in _VARIANT_ORDER else len(_VARIANT_ORDER) + others.index(v)
        out[v] = pal[i % len(pal)]
    return out


def _log_axis(axis: Axis) -> None:
    """Log scale with plain major labels and no crowded minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())


def fig_perf_vs_size(method: str, runs: pd.DataFrame, found: Mapping[str, CurveCrossing],
                     base: Mapping[str, object], score: str, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """Performance vs a method's size axis (subspace d, LoRA r, ...) per variant: seeds, baseline, the
    threshold line and the crossing (d90, r90, ...) with its bootstrap interval. File ``perf_vs_<size>``.

    Reads ``runs`` columns method, variant, size, metric and ``score``; ``found[variant]``'s interp,
    ci_low, ci_high; ``base`` keys value, kind, target, threshold.
    """
    plt = _mpl()
    m = methods.get(method)
    key, quantity = m.size_key or "size", m.quantity or "crossing"
    sub = runs[(runs["method"] == method) & runs[score].notna() & runs["size"].notna()]
    if sub.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = _colors(list(sub["variant"].unique()))
    for v, g in groups(sub, "variant"):
        ax.scatter(g["size"].astype(float), g[score], s=14, alpha=0.45, color=colors[v])
        stats = g.groupby("size")[score].agg(["mean", "min", "max"]).sort_index()
        x = stats.index.astype(float)
        ax.plot(x, stats["mean"], "-o", color=colors[v], label=f"{v} (mean over seeds)", ms=4)
        ax.fill_between(x, stats["min"], stats["max"], color=colors[v], alpha=0.15, lw=0)
        res = found.get(v)
        if res is not None and res.interp is not None:
            ax.axvline(res.interp, color=colors[v], ls=":", lw=1.2)
            if res.ci_low is not None and res.ci_high is not None and math.isfinite(res.ci_high):
                ax.axvspan(res.ci_low, res.ci_high, color=colors[v], alpha=0.08)
            ax.annotate(f"{quantity}≈{res.interp:.3g}", (res.interp, ax.get_ylim()[0]), xytext=(3, 6),
                        textcoords="offset points", color=colors[v], fontsize=8)
    if base.get("value") is not None:
        ax.axhline(base["value"], color="k", lw=1, label=f"baseline ({base['kind']}) {base['value']:.3f}")
        ax.axhline(base["target"], color="k", ls="--", lw=1, label=_target_label(base))
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel(f"{m.title or method} {key} (log)")
    ax.set_ylabel(f"validation {sub['metric'].iloc[0]} ({score.replace('score_', '')})")
    ax.set_title(_title(meta, f"Performance vs {m.title or method} {key} (band: seed min-max)", sub))
    ax.legend(loc="best")
    return _save(fig, out, f"perf_vs_{key}")


def fig_perf_vs_params(sel: pd.DataFrame, runs: pd.DataFrame, found: Crossings, base: Mapping[str, object],
                       score: str, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """THE HEADLINE: performance vs trainable parameters (log x) for every method, each crossing marked.

    Reads ``sel`` (the cell table) columns selected, mean, min, max, trainable_parameters, variant,
    method, size, metric; ``runs`` columns model, task, seed (title); per method in ``found``: a
    size that counts parameters (d90) is a vertical line at interp_params (interp + extra), any other
    (r90) a circle at its grid value's (params, mean); ``base`` keys value, kind, target, threshold, floor.
    """
    plt = _mpl()
    cells = sel[sel["selected"] & sel["mean"].notna() & sel["trainable_parameters"].notna()]
    if cells.empty:
        return []
    fig, ax = plt.subplots(figsize=(7.4, 4.8))
    colors = _colors(list(cells["variant"].unique()))
    for v, g in groups(cells, "variant"):
        g = g.sort_values("trainable_parameters")
        m = methods.get(str(g["method"].iloc[0]))
        x = g["trainable_parameters"].astype(float).to_numpy()
        yerr = np.vstack([g["mean"] - g["min"], g["max"] - g["mean"]])
        ax.errorbar(x, g["mean"], yerr=yerr, fmt="-" + m.style.marker, color=colors[v], label=v,
                    ms=m.style.size, capsize=2, lw=1.2)
        if m.size_key is not None and not m.size_counts_parameters:  # name the grid points (r4, ...)
            for xi, (_, row) in zip(x, g.iterrows()):
                if pd.notna(row["size"]):
                    ax.annotate(f"{m.size_key}{int(row['size'])}", (xi, row["mean"]), xytext=(2, 4),
                                textcoords="offset points", fontsize=7, color=colors[v])
    if base.get("value") is not None:
        ax.axhline(base["value"], color="k", lw=1, label=f"baseline ({base['kind']})")
        ax.axhline(base["target"], color="k", ls="--", lw=1, label=_target_label(base))
    if base.get("floor") is not None:
        ax.axhline(base["floor"], color="grey", ls=":", lw=1, label="majority class")
    for name, results in found.items():
        m = methods.get(name)
        for v, res in sorted(results.items()):
            c = colors.get(v, "grey")
            if m.size_counts_parameters and res.interp_params is not None:
                ax.axvline(res.interp_params, color=c, ls=":", lw=1.2)
                ax.annotate(f"{m.quantity} {v}", (res.interp_params, base.get("target", 0)), rotation=90,
                            fontsize=7, xytext=(-9, -60), textcoords="offset points", color=c)
            elif not m.size_counts_parameters and None not in (res.params, res.mean, res.value):
                ax.plot([res.params], [res.mean], marker="o", ms=13, mfc="none", mec=c, mew=1.8)
                ax.annotate(f"{m.quantity}={res.value:g}", (res.params, res.mean), xytext=(6, -12),
                            textcoords="offset points", fontsize=8, color=c)
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"validation {cells['metric'].iloc[0]} (seed mean, bars min-max)")
    ax.set_title(_title(meta, "Performance vs trainable parameters, every method", runs))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, out, "perf_vs_params")


def fig_size_heatmap(method: str, sel: pd.DataFrame, runs: pd.DataFrame, out: Path,
                     meta: Mapping[str, object]) -> list[Path]:
    """Size x variant heatmap of the seed-mean metric at the selected lr (LoRA: rank x target set).
    File ``<method>_heatmap``.

    Reads ``sel`` (the cell table) columns method, selected, variant, size, mean, metric; ``runs``
    columns method, model, task, seed (title).
    """
    plt = _mpl()
    import seaborn as sns

    m = methods.get(method)
    lo = sel[(sel["method"] == method) & sel["selected"] & sel["size"].notna()]
    if lo.empty:
        return []
    piv = lo.pivot_table(index="variant", columns="size", values="mean", aggfunc="mean").sort_index()
    piv.columns = [int(c) for c in piv.columns]
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * piv.shape[1], 1.4 + 0.55 * piv.shape[0]))
    sns.heatmap(piv, annot=True, fmt=".3f", cmap="viridis", ax=ax, cbar_kws={"label": f"{lo['metric'].iloc[0]}"})
    ax.set_xlabel(f"{m.title or method} {m.size_key}")
    ax.set_ylabel("variant")
    ax.set_title(_title(meta, f"{m.title or method}: {m.size_key} x variant (seed mean)", runs[runs["method"] == method]))
    return _save(fig, out, f"{method}_heatmap")


def _target_label(base: Mapping[str, object]) -> str:
    """The legend of the target line: '90% of baseline' (rule fraction) or '90% of the gain over pretrained'."""
    if base.get("rule") == "improvement":
        return f"{base['threshold']:.0%} of the gain over pretrained"
    return f"{base['threshold']:.0%} of baseline"


def spectrum_label(row: Mapping[str, Any], targets: bool = False) -> str:
    """Legend / table label of a run in the analysis tables: the method's title and its size
    (``LoRA r=4``, ``subspace d=1000``, ``full FT``); ``targets`` adds the target modules."""
    name = str(row["method"])
    try:
        m = methods.get(name)
    except ValueError:
        return name
    label = m.title or name
    size = row.get(m.size_key) if m.size_key else None
    if size is not None and pd.notna(size):
        label += f" {m.size_key}={int(size)}"
    tm = row.get("target_modules")
    if targets and isinstance(tm, str) and tm:
        label += f" [{tm}]"
    return label


def _type_label(t: str, df: pd.DataFrame) -> str:
    """Module type for titles; a numeric type (``net.0`` -> ``0``) is shown as the module name."""
    if not str(t).isdigit():
        return str(t)
    mods = sorted(df.loc[df["module_type"] == t, "module"].unique())
    return f"module {mods[0]}" if len(mods) == 1 else f"modules *.{t}"


def fig_spectra(spectra: pd.DataFrame, runs: pd.DataFrame, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """Normalised singular spectra and energy curves of Delta W per module type and rank/method.

    Reads ``spectra`` (analysis table) columns run_id, module, module_type, method, r, d, index,
    singular_value, energy_cumulative (target_modules if present); ``runs`` columns run_id,
    target_set, model, task, seed.
    """
    plt = _mpl()
    import seaborn as sns

    if spectra is None or spectra.empty:
        return []
    sp = spectra.copy()
    if "target_modules" in sp and runs is not None and "target_set" in runs:
        ts = runs.set_index("run_id")["target_set"].to_dict()
        sp["target_set"] = sp["run_id"].map(ts)
    sp["label"] = [spectrum_label(r) for r in sp[["method", "r", "d"]].to_dict("records")]  # type: ignore[arg-type]
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


def fig_phi(sim: pd.DataFrame, kind: str, runs: pd.DataFrame, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """phi(i, j) maps (Hu et al. 7.2) for rank pairs (r=8 vs 64 preferred) or seed pairs, beside the random baseline.

    Reads ``sim`` (analysis similarity table) columns pair_kind, r_a, r_b, module_type, module, i, j,
    phi, random_baseline; ``runs`` columns method, model, task, seed (title).
    """
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
    fig.suptitle(_title(meta, what, runs[runs["r"].notna()]))
    return _save(fig, out, f"phi_{kind}")


def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """Learning curves (validation metric vs step), one line per run, coloured by variant.

    Reads ``curves`` columns run_id, variant, step, key, value; ``runs`` columns run_id, metric,
    model, task, seed.
    """
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




__all__ = [
    "fig_curves",
    "fig_perf_vs_params",
    "fig_perf_vs_size",
    "fig_phi",
    "fig_size_heatmap",
    "fig_spectra",
    "set_formats",
    "spectrum_label",
]
