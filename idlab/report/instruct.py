"""The report's view of instruction tasks (issue 30 item 5): exact match, forgetting, lm-eval scores.

- `instruct_columns`: the summary columns of one run, read through the typed readers
  (`idlab.runs.RunResult` for result.json, `idlab.runs.evals.read_evals` for eval.json):
  ``exact_match``, ``exact_match_before``, ``generate_n`` (the generation subset's size),
  ``general_loss_before``, ``general_loss_after``, ``forgetting`` (after - before; `RunResult.forgetting`),
  and one ``eval_<task>_<metric>`` column per lm-eval task and metric (``eval_gsm8k_exact_match,strict-match``).
- `instruct_lines`: REPORT.md's tables per curve (variant) and size, seed mean ± std at the selected
  learning rate: response loss, exact match before -> after, general loss before / after, forgetting;
  the lm-eval scores when any run has them.
- `instruct_figures`: ``score_vs_forgetting`` and ``forgetting_vs_intruders`` (the mean intruder count
  over the modules of the run's Delta W, from the analysis table ``intruders``).

A study whose runs have none of these fields gets none of it: no columns' values, no table, no figure
entry (`has_instruct`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from idlab import methods
from idlab.jsontypes import JsonObject
from idlab.report.figures import _colors, _mpl, _save, _title
from idlab.report.text import md_table
from idlab.runs import RunResult
from idlab.runs.evals import read_evals

#: the run fields of an instruction task, as summary columns (always present; NaN where absent)
INSTRUCT_COLS = ("exact_match", "exact_match_before", "generate_n", "general_loss_before", "general_loss_after",
                 "forgetting")
EVAL_PREFIX = "eval_"


def instruct_columns(res: RunResult, run_dir: Path) -> JsonObject:
    """The instruction-task columns of one run (None where the run has no such field).

    eval.json's scores come as ``eval_<task>_<metric,filter>``; an eval.json that does not read is
    left out with one warning line on stderr (the run's other columns stay).
    """
    gen = res.generation or {}
    n = gen.get("n")
    row: JsonObject = {
        "exact_match": res.exact_match, "exact_match_before": res.exact_match_before,
        "generate_n": int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None,
        "general_loss_before": res.general_loss_before, "general_loss_after": res.general_loss_after,
        "forgetting": res.forgetting,
    }
    try:
        scores = read_evals(run_dir)
    except ValueError as e:
        print(f"warning: run {run_dir.name}: lm-eval scores left out ({e})", file=sys.stderr)
        scores = {}
    for task, score in sorted(scores.items()):
        for metric, v in sorted(score.metrics.items()):
            row[f"{EVAL_PREFIX}{task}_{metric}"] = v
    try:
        pre = read_evals(run_dir, pretrained=True)
    except ValueError:
        pre = {}
    for task, score in sorted(pre.items()):  # the pretrained model's (idlab eval --pretrained)
        for metric, v in sorted(score.metrics.items()):
            row[f"{EVAL_PREFIX}pretrained_{task}_{metric}"] = v
    return row


def tidy_instruct_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The instruction columns as float64 (generate_n as Int64), eval columns sorted after the others."""
    for c in INSTRUCT_COLS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64" if c == "generate_n" else "float64")
    evals = sorted(c for c in df.columns if str(c).startswith(EVAL_PREFIX))
    for c in evals:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df[[c for c in df.columns if c not in evals] + evals]


def eval_columns(runs: pd.DataFrame, stderr: bool = False) -> list[str]:
    """The lm-eval columns with a value in ``runs`` (``*_stderr,*`` only when ``stderr``)."""
    return [c for c in runs.columns if str(c).startswith(EVAL_PREFIX) and runs[c].notna().any()
            and (stderr or "_stderr," not in str(c))]


def has_instruct(runs: pd.DataFrame) -> bool:
    """Whether any run has an instruction-task field or an lm-eval score."""
    return any(c in runs and runs[c].notna().any() for c in INSTRUCT_COLS) or bool(eval_columns(runs))


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "ok"] if "status" in runs else runs


def _size_label(method: str, size: object) -> str:
    """``r=4``, ``d=1000``; "" for a method without a size axis (full FT)."""
    v = pd.to_numeric(pd.Series([size]), errors="coerce").iloc[0]
    if pd.isna(v):
        return ""
    try:
        key = methods.get(method).size_key or "size"
    except ValueError:
        key = "size"
    return f"{key}={int(v)}"


def _pm(s: pd.Series) -> str:
    """``mean ± std`` over seeds (std 0 for one seed); – without values."""
    v = pd.to_numeric(s, errors="coerce").dropna()
    if v.empty:
        return "–"
    return f"{v.mean():.4f} ± {(v.std(ddof=1) if len(v) > 1 else 0.0):.4f}"


def _mean(s: pd.Series) -> float | None:
    v = pd.to_numeric(s, errors="coerce").dropna()
    return None if v.empty else float(v.mean())


def _by_curve(runs: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(variant, size label, runs) per curve and size, sorted by variant then numeric size."""
    r = runs.assign(_size=pd.to_numeric(runs["size"], errors="coerce").fillna(-1.0))
    out = []
    for (v, _s), g in r.groupby(["variant", "_size"], sort=True):
        out.append((str(v), _size_label(str(g["method"].iloc[0]), g["size"].iloc[0]), g))
    return sorted(out, key=lambda t: (t[0], float(t[2]["_size"].iloc[0])))


def instruct_table(runs: pd.DataFrame, score: str) -> pd.DataFrame:
    """One row per curve (variant) and size of the ok ``runs``: seeds, learning rate(s), response loss
    (the negated ``neg_loss`` score; other metrics as they are), exact match before -> after (n: the subset
    size), general loss before / after and forgetting, each the seed mean ± std."""
    rows = []
    for v, size, g in _by_curve(_ok(runs)):
        metric = str(g["metric"].dropna().iloc[0]) if g["metric"].notna().any() else "score"
        loss = metric == "neg_loss"
        sc = pd.to_numeric(g[score], errors="coerce") * (-1.0 if loss else 1.0)
        before, n = _mean(g["exact_match_before"]), pd.to_numeric(g["generate_n"], errors="coerce").dropna()
        em = _pm(g["exact_match"])
        em = em if before is None else f"{before:.4f} → {em}"
        if len(n):
            em += f" (n={int(n.max())})"
        rows.append({"variant": v, "size": size or "–", "lr": ", ".join(f"{x:g}" for x in sorted(g["lr"].dropna().unique())),
                     "n_seeds": int(g["seed"].nunique()), "response loss" if loss else metric: _pm(sc),
                     "exact match (before → after)": em, "general loss before": _pm(g["general_loss_before"]),
                     "general loss after": _pm(g["general_loss_after"]), "forgetting": _pm(g["forgetting"])})
    return pd.DataFrame(rows)


def eval_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per curve and size: each lm-eval score (stderr columns left out) as seed mean ± std."""
    cols = eval_columns(runs)
    if not cols:
        return pd.DataFrame()
    rows = []
    for v, size, g in _by_curve(_ok(runs)):
        rows.append({"variant": v, "size": size or "–", "n_seeds": int(g["seed"].nunique()),
                     **{c[len(EVAL_PREFIX):]: _pm(g[c]) for c in cols}})
    return pd.DataFrame(rows)


def instruct_lines(runs: pd.DataFrame, score: str, of: str = "") -> list[str]:
    """REPORT.md's instruction-task section (empty for a study without these fields)."""
    if not has_instruct(runs) or runs.empty:
        return []
    lines = [f"### Instruction task: response loss, exact match and forgetting{of}", "",
             "Per curve and size at the selected learning rate, seed mean ± std. Response loss: next-token loss on "
             "the response tokens of the validation split (the tracked `neg_loss`, negated). Exact match: on the "
             "fixed generation subset (n questions), the pretrained model → the trained one. Forgetting = general "
             "loss after − before (next-token loss on the held-out general corpus; > 0: it got worse).", ""]
    tab = instruct_table(runs, score)
    lines += [md_table(tab) if not tab.empty else "No ok runs.", ""]
    ev = eval_table(runs)
    if not ev.empty:
        lines += [f"### lm-evaluation-harness scores (`idlab eval`; seed mean ± std){of}", "", md_table(ev), ""]
    return lines


def run_intruders(intruders: pd.DataFrame | None) -> pd.Series:
    """Mean intruder count over the modules (and sides) of each run's Delta W, indexed by run_id."""
    if intruders is None or intruders.empty or not {"run_id", "count"} <= set(intruders.columns):
        return pd.Series(dtype="float64")
    return intruders.groupby("run_id", sort=True)["count"].mean().astype("float64")


def _scatter(ax: Any, df: pd.DataFrame, x: str, y: str, colors: Mapping[str, object]) -> None:
    """Seeds faint, the seed mean per curve and size with std bars, marker by method, size annotated."""
    seen: set[str] = set()
    for v, size, g in _by_curve(df):
        m = methods.get(str(g["method"].iloc[0]))
        c = colors[v]
        ax.scatter(g[x], g[y], s=14, alpha=0.35, color=c, marker=m.style.marker)
        mx, my = float(g[x].mean()), float(g[y].mean())
        sx = float(g[x].std(ddof=1)) if len(g) > 1 else 0.0
        sy = float(g[y].std(ddof=1)) if len(g) > 1 else 0.0
        ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], fmt=m.style.marker, color=c,
                    ms=m.style.size + 1, capsize=2, lw=1, label=None if v in seen else v)
        seen.add(v)
        if size:
            ax.annotate(size, (mx, my), xytext=(4, 4), textcoords="offset points", fontsize=7,
                        color=c)


def fig_score_vs_forgetting(runs: pd.DataFrame, score: str, out: Path, meta: Mapping[str, object]) -> list[Path]:
    """Target score against forgetting, per curve and size: the study's score (response loss for
    ``neg_loss``) and, beside it, exact match when the runs have it. File ``score_vs_forgetting``.

    Reads ``runs`` columns status, method, variant, size, seed, metric, ``score``, exact_match,
    forgetting; model, task (title).
    """
    ok = _ok(runs)
    if "forgetting" not in ok:
        return []
    ok = ok[ok["forgetting"].notna()]
    metric = str(ok["metric"].dropna().iloc[0]) if not ok.empty and ok["metric"].notna().any() else "score"
    ok = ok.assign(_score=pd.to_numeric(ok[score], errors="coerce") * (-1.0 if metric == "neg_loss" else 1.0))
    panels = [("_score", "response loss (lower is better)" if metric == "neg_loss" else f"validation {metric}")]
    if ok["exact_match"].notna().any():
        panels.append(("exact_match", "exact match (generation subset)"))
    panels = [(c, lab) for c, lab in panels if ok[c].notna().any()]
    if ok.empty or not panels:
        return []
    plt = _mpl()
    colors = _colors(list(ok["variant"].unique()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 1.6, 4.2), squeeze=False,
                             layout="constrained")
    for ax, (col, lab) in zip(axes[0], panels):
        _scatter(ax, ok[ok[col].notna()], "forgetting", col, colors)
        ax.axvline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("forgetting: general loss after − before (nats)")
        ax.set_ylabel(lab)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(_title(meta, "Target score vs forgetting (seed mean ± std; faint: seeds)", ok))
    return _save(fig, out, "score_vs_forgetting")


def fig_forgetting_vs_intruders(runs: pd.DataFrame, intruders: pd.DataFrame | None, out: Path,
                                meta: Mapping[str, object]) -> list[Path]:
    """Forgetting against the mean intruder-dimension count over the modules of the run's Delta W,
    per curve and size. File ``forgetting_vs_intruders``.

    Reads ``intruders`` (analysis table) columns run_id, count; ``runs`` columns status, run_id,
    method, variant, size, seed, forgetting; model, task (title).
    """
    per_run = run_intruders(intruders)
    ok = _ok(runs)
    if per_run.empty or "forgetting" not in ok:
        return []
    ok = ok.assign(intruders=ok["run_id"].map(per_run).astype("float64"))
    ok = ok[ok["intruders"].notna() & ok["forgetting"].notna()]
    if ok.empty:
        return []
    plt = _mpl()
    colors = _colors(list(ok["variant"].unique()))
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    _scatter(ax, ok, "intruders", "forgetting", colors)
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("intruder dimensions of ΔW (mean over modules; k = 10, eps = 0.5)")
    ax.set_ylabel("forgetting: general loss after − before (nats)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(_title(meta, "Forgetting vs intruder dimensions (Shuttleworth et al.)", ok))
    return _save(fig, out, "forgetting_vs_intruders")


def instruct_figures(runs: pd.DataFrame, tables: Mapping[str, pd.DataFrame], score: str, out: Path,
                     meta: Mapping[str, object]) -> list[tuple[str, list[Path]]]:
    """(caption, paths) of the instruction figures; none for a study without these fields (an empty path
    list: the report's "no data yet" line)."""
    if not has_instruct(runs) or runs.empty:
        return []
    return [("Target score vs forgetting", fig_score_vs_forgetting(runs, score, out, meta)),
            ("Forgetting vs intruder dimensions of ΔW",
             fig_forgetting_vs_intruders(runs, tables.get("intruders"), out, meta))]


__all__ = ["EVAL_PREFIX", "INSTRUCT_COLS", "eval_columns", "eval_table", "fig_forgetting_vs_intruders",
           "fig_score_vs_forgetting", "has_instruct", "instruct_columns", "instruct_figures", "instruct_lines",
           "instruct_table", "run_intruders", "tidy_instruct_columns"]
