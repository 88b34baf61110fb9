"""Tables of the report: seed statistics per cell (`cell_table`), d90 / r90 crossings through
`idlab.d90` (`threshold_crossing`, `crossings`), the baseline, the Hu et al. Table 7 layout. A crossing stays typed (`CurveCrossing`) into the figures and
the markdown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from idlab import methods
from idlab.config.schema import TargetConfig, target_of
from idlab.d90 import Crossing, make_target, rate_baseline, rate_scores, select_lr
from idlab.report.settings import GROUP_COL, group_labels, setting_columns, varying_settings

#: what tells cells apart: the method, its curve (variant) and the point on its size axis; the rest for
#: the tables (a method's other axes are in its variant)
CELL_KEYS = ["study", "method", "variant", "size", "target_set", "r", "projection", "said", "d", "use_rslora"]
PALETTE_SEED = 0


def cell_table(df: pd.DataFrame, score: str = "score_final") -> pd.DataFrame:
    """Seed statistics per cell x learning rate (status ok/diverged), with ``selected`` = best lr of the cell.

    A cell is a study's method at one point of its axes (`CELL_KEYS`) **in one setting group**: runs
    whose settings differ (any ``setting_*`` column of `idlab.report.load.load_results` that is not the
    same for every run of the study: model options, task options, train block) are never pooled. The
    cells carry those columns and ``settings``, the group's label (``model.hidden=[4]``; "" in a study
    of one group), `idlab.report.settings.group_labels`.

    ``select_score`` and ``selected`` come from `idlab.d90.rate_scores` / `select_lr`, the rule the
    sweep uses too: each rate's seed mean over the seeds every rate of the cell has (a one-seed
    probe is not weighed against a three-seed mean; all its seeds when none is shared), a
    diverged seed counting as a failure (-inf).
    """
    vary = varying_settings(df)
    ok = df.assign(**{GROUP_COL: group_labels(df)})[df["status"].isin(["ok", "diverged"])].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["score"] = ok[score]
    keys = [k for k in CELL_KEYS if k in ok] + [GROUP_COL, *vary, "lr"]
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
                     "_by_seed": {int(k): float(v) for k, v in zip(grp["seed"], s) if pd.notna(k)},
                     "trainable_parameters": int(grp["trainable_parameters"].dropna().iloc[0])
                     if grp["trainable_parameters"].notna().any() else None,
                     "model": first["model"], "task": first["task"], "metric": first["metric"]})
    cells = pd.DataFrame(rows)
    ck = [k for k in CELL_KEYS if k in cells] + [GROUP_COL, *vary]
    ck_str = cells[ck].astype(object).where(cells[ck].notna(), "-").astype(str).agg("|".join, axis=1)
    cells["cell"] = ck_str
    cells["select_score"] = -np.inf
    cells["selected"] = False
    for _, grp in cells.groupby("cell", sort=True):  # THE lr rule: idlab.d90.select_lr
        lrs = [float(lr) if pd.notna(lr) else math.inf for lr in grp["lr"]]  # an unrecorded lr sorts last
        by_lr = dict(zip(lrs, grp["_by_seed"]))
        ranked, best = rate_scores(by_lr), select_lr(by_lr)
        cells.loc[grp.index, "select_score"] = [ranked[lr] for lr in lrs]
        cells.loc[grp.index, "selected"] = [lr == best for lr in lrs]
    cells = cells.drop(columns="_by_seed")
    order = [c for c in ("study", GROUP_COL, "method", "variant", "r", "d", "lr") if c in cells]
    return cells.sort_values(order, na_position="first", kind="mergesort").reset_index(drop=True)


def groups(df: pd.DataFrame, col: str) -> list[tuple[str, pd.DataFrame]]:
    """``df`` grouped by ``col``, keys as strings, sorted."""
    return sorted(((str(k), g) for k, g in df.groupby(col, sort=True)), key=lambda kv: kv[0])


@dataclass(frozen=True)
class CurveCrossing:
    """d90 / r90 of one curve of the report: the `idlab.d90.Crossing` and what the report adds to it.

    Attributes:
        crossing: the estimator's result (grid value, interpolation, bootstrap interval, grid).
        extra: d90 only: trainable parameters beyond d (a directly trained head, median over
            the variant's runs), added to d where the figures and tables count parameters.
        params: r90 only: trainable parameters of the selected cell at the grid value (None:
            no crossing, or no such cell).
        mean: r90 only: that cell's seed mean.
    """

    crossing: Crossing
    extra: float = 0.0
    params: int | None = None
    mean: float | None = None

    @property
    def value(self) -> float | None:
        """The grid value: smallest evaluated x whose seed mean reaches the target (None: none)."""
        return self.crossing.value

    @property
    def interp(self) -> float | None:
        """The crossing interpolated linearly in log x (None without one)."""
        return self.crossing.interp

    @property
    def ci_low(self) -> float | None:
        """Lower end of the bootstrap interval (None without one)."""
        return None if self.crossing.ci is None else self.crossing.ci[0]

    @property
    def ci_high(self) -> float | None:
        """Upper end of the bootstrap interval (inf: not reached; None without one)."""
        return None if self.crossing.ci is None else self.crossing.ci[1]

    @property
    def n_boot(self) -> int:
        """Bootstrap resamples behind the interval (0 without one)."""
        return self.crossing.n_bootstrap if self.crossing.ci is not None else 0

    @property
    def ci_level(self) -> float:
        return self.crossing.ci_level

    @property
    def grid(self) -> tuple[float, ...]:
        """The evaluated x, sorted."""
        return self.crossing.grid

    @property
    def means(self) -> tuple[float, ...]:
        """Seed mean at each grid point."""
        return self.crossing.means

    @property
    def n_seeds(self) -> tuple[int, ...]:
        """Seeds scored at each grid point (aligned with `grid`)."""
        return self.crossing.n_seeds

    @property
    def value_params(self) -> float | None:
        """d90: trainable parameters at the grid value (d + extra); None without a crossing."""
        return None if self.value is None else self.value + self.extra

    @property
    def interp_params(self) -> float | None:
        """The interpolated crossing in trainable parameters (interp + extra)."""
        return None if self.interp is None else self.interp + self.extra


def threshold_crossing(runs: pd.DataFrame, x: str, target: float, score: str) -> CurveCrossing:
    """d90 / r90 of one curve by `idlab.d90.threshold_crossing` (the one estimator).

    ``runs``: one row per run with columns ``x`` (d or r), seed, ``score`` and status (rows of
    status ok or diverged are used; a NaN score, a diverged run, counts as a failure at its x).
    """
    from idlab.d90 import threshold_crossing as crossing

    if "status" in runs:  # a failed run has no score and is no evidence either way
        runs = runs[runs["status"].isin(["ok", "diverged"])]
    ev = runs[[x, "seed", score]].rename(columns={score: "score"})
    ev = ev[ev[x].notna() & ev["seed"].notna()]
    return CurveCrossing(crossing(ev, target, x=x))


def amplification_table(align: pd.DataFrame, ranks: Sequence[int] = (4, 64)) -> tuple[pd.DataFrame, str]:
    """Hu et al. Table 7 layout: rows ||U^T W V^T||_F for Delta W / W / random, ||W||_F, ||Delta W||_F, amplification.

    Columns are the LoRA runs at ranks ``ranks`` (the available ones nearest to them
    when absent) for the most common module type (q_proj preferred), averaged over
    layers and seeds. Returns (table, caption).
    """
    lo = align[align["r"].notna()] if not align.empty else align  # the low-rank runs (a rank r)
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



def pretrained_score(runs: pd.DataFrame, target: TargetConfig, score: str = "score_start") -> tuple[float | None, str]:
    """(pretrained score, where it came from) for the "improvement" rule: ``target.pretrained`` if set, else
    the mean over seeds of the baseline method's (full FT's) step-0 evaluation (``score_start``), else None."""
    if target.pretrained is not None:
        return target.pretrained, "fixed (target.pretrained)"
    base = methods.baseline_method().name
    if runs.empty or score not in runs:
        return None, "no step-0 evaluation (train.eval_at_start: true, or target.pretrained)"
    full = runs[(runs["method"] == base) & runs[score].notna()]
    if full.empty:
        return None, "no step-0 evaluation of a full fine-tuning run (train.eval_at_start: true, or target.pretrained)"
    per_seed = full.groupby(full["seed"].astype(str))[score].mean()  # the step-0 model does not depend on the lr
    return float(per_seed.mean()), f"step-0 evaluation of full FT, mean of {len(per_seed)} seed(s)"


def rule_text(base: Mapping[str, object]) -> str:
    """How a baseline's target was set: 'fraction: 90% x baseline' or 'improvement: pretrained + 90% x (baseline -
    pretrained)' (`idlab.d90.make_target`)."""
    th = f"{base.get('threshold', 0.9):.0%}"
    if base.get("rule", "fraction") == "improvement":
        return f"improvement: pretrained + {th} x (baseline - pretrained)"
    return f"fraction: {th} x baseline"


def baseline(runs: pd.DataFrame, meta: Mapping[str, Any], score: str) -> dict[str, Any]:
    """The study's crossing baseline: ``target.baseline``, else the baseline method's runs (full FT) at the
    lr of `idlab.d90.rate_baseline`; its target by the study's ``target.rule`` (`idlab.d90.make_target`)."""
    target = target_of(meta.get("study") or {})
    threshold, rule = target.threshold, target.rule
    start = "exact_match_before" if score == "exact_match" else "score_start"  # the pretrained model's score
    pre, pre_kind = pretrained_score(runs, target, start) if rule == "improvement" else (None, "")
    info = {"rule": rule, "pretrained": pre, "pretrained_kind": pre_kind, "threshold": threshold}
    if "higher_is_better" in runs and (runs["higher_is_better"] == False).any():  # noqa: E712 (a nullable column)
        metric = runs["metric"].dropna().iloc[0] if "metric" in runs and runs["metric"].notna().any() else "?"
        return {**info, "value": None, "kind": f"missing (metric {metric} is lower-is-better; crossings compare "
                "higher-is-better scores: track neg_loss and use target.rule: improvement)"}
    if rule == "improvement" and pre is None:
        return {**info, "value": None, "kind": f"missing (rule improvement needs the pretrained score: {pre_kind})"}
    try:
        if target.baseline is not None:
            b = make_target(target.baseline, threshold, "global (fixed)", rule=rule, pretrained=pre)
            return {**info, "value": b.value, "kind": b.kind, "target": b.target}
        base = methods.baseline_method().name
        full = runs[(runs["method"] == base) & runs["status"].isin(["ok", "diverged"])] if not runs.empty else runs
        by_lr: dict[float, dict[int, float]] = {}
        for lr, seed, sc in zip(full.get("lr", []), full.get("seed", []), full.get(score, [])):
            if pd.notna(lr) and pd.notna(seed):
                by_lr.setdefault(float(lr), {})[int(seed)] = float(sc) if pd.notna(sc) else math.nan
        got = rate_baseline(by_lr, threshold, rule=rule, pretrained=pre)
    except ValueError as e:  # no pretrained score, no gain over it, a loss under the fraction rule
        return {**info, "value": None, "kind": f"missing ({e})"}
    if got is None:
        why = "no full fine-tuning result" if not by_lr else "every full-FT learning rate has a failed seed"
        return {**info, "value": None, "kind": f"missing ({why})"}
    return {**info, "value": got.value, "kind": f"local: full FT mean of {len(got.runs)} seed(s)",
            "target": got.target}


def selected_runs(runs: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Runs at the selected learning rate of their cell (of their setting group: `cell_table`)."""
    if cells.empty:
        return runs.iloc[0:0]
    sel = cells[cells["selected"]]
    keys = [k for k in CELL_KEYS if k in runs] + [c for c in setting_columns(cells) if c in runs] + ["lr"]

    def key(df: pd.DataFrame) -> pd.Series:
        return df[keys].astype(object).where(df[keys].notna(), "-").astype(str).agg("|".join, axis=1)

    return runs[key(runs).isin(set(key(sel)))]


#: ``{method name: {variant: crossing}}`` for every method with a size axis (d90, r90, ...)
Crossings = dict[str, dict[str, CurveCrossing]]


def crossings(sel_runs: pd.DataFrame, cells: pd.DataFrame, target: float | None, score: str) -> Crossings:
    """The crossing of ``target`` on the size axis of every method that has one, per variant.

    Each carries ``extra`` (median trainable - size: a directly trained head) and, at its grid
    value, the selected cell's trainable parameters and seed mean (``params``, ``mean``).
    """
    out: Crossings = {}
    if target is None or sel_runs.empty:
        return out
    for name in methods.names():
        if methods.get(name).size_key is None:
            continue
        for v, g in groups(sel_runs[sel_runs["method"] == name], "variant"):
            if g["size"].isna().all():  # a curve without a size axis (IA3, LN tuning): one point, no crossing
                continue
            res = threshold_crossing(g, "size", target, score)
            extra = g["trainable_parameters"].astype(float) - g["size"].astype(float)
            res = replace(res, extra=float(extra.median()) if len(extra) else 0.0)
            if res.value is not None:
                at = cells[(cells["variant"] == v) & cells["selected"] & (cells["size"] == res.value)]
                if len(at):
                    res = replace(res, params=int(at["trainable_parameters"].iloc[0]), mean=float(at["mean"].iloc[0]))
            out.setdefault(name, {})[v] = res
    return out


def pareto_front(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells that are best at some budget of trainable parameters, by increasing budget.

    ``cells``: `cell_table` rows (only the selected learning rate of each cell is used when a
    ``selected`` column is there). A cell is on the front when no cell with fewer or equal trainable
    parameters has a higher seed-mean score; any method, any variant.
    """
    if cells.empty or "trainable_parameters" not in cells:
        return cells.iloc[0:0]
    c = cells[cells["selected"].astype(bool)] if "selected" in cells else cells
    c = c[c["trainable_parameters"].notna() & c["mean"].notna()]
    p, m = c["trainable_parameters"].astype(float).to_numpy(), c["mean"].astype(float).to_numpy()
    on = [not bool(((p <= p[i]) & (m > m[i])).any()) for i in range(len(c))]
    return c[on].sort_values(["trainable_parameters", "mean"], ascending=[True, False],
                             kind="mergesort").reset_index(drop=True)


def majority_floor(runs: pd.DataFrame) -> float | None:
    """Dev accuracy of always predicting the majority training class, when the metric is accuracy."""
    if "majority_accuracy" not in runs or runs["metric"].dropna().iloc[0] != "accuracy":
        return None
    v = runs["majority_accuracy"].dropna()
    return float(v.iloc[0]) if len(v) else None


def thin_crossings(results: Mapping[str, CurveCrossing]) -> list[str]:
    """Variants whose grid value rests on fewer seeds than the best-covered point of their curve."""
    out = []
    for v, res in sorted(results.items()):
        if res.value is not None:  # the grid value is one of res.grid
            n_at, n_max = dict(zip(res.grid, res.n_seeds))[res.value], max(res.n_seeds)
            if n_at < n_max:
                out.append(f"{v} ({n_at} of {n_max} seeds)")
    return out




__all__ = ["CELL_KEYS", "Crossings", "CurveCrossing", "amplification_table", "baseline", "cell_table", "crossings", "groups",
           "majority_floor", "pareto_front", "pretrained_score", "rule_text", "selected_runs", "thin_crossings", "threshold_crossing"]
