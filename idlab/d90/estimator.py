"""The d90 / r90 estimator: baseline and target, crossing, joint seed bootstrap (rules: `idlab.d90`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

#: THE threshold rules of a crossing (docs/SCIENCE.md section 6): "fraction" (Li et al.: target =
#: threshold x baseline, for a score in [0, 1]) and "improvement" (target = pretrained + threshold x
#: (baseline - pretrained): that fraction of full fine-tuning's gain over the pretrained model, for a loss)
TargetRule = Literal["fraction", "improvement"]
TARGET_RULES: tuple[str, ...] = ("fraction", "improvement")


@dataclass(frozen=True)
class D90Result:
    """Outcome of a d90 search.

    Attributes:
        d90: smallest evaluated d whose seed-mean score >= target (None: none passed).
        d90_interp: the crossing interpolated linearly in log d (module docstring; None if d90
            is None; equal to d90 when nothing below d90 was evaluated).
        ci: bootstrap percentile interval of d90_interp at ``ci_level`` (inf: resamples
            in which no evaluated d passes).
        d90_std: bootstrap standard deviation of d90_interp (finite resamples).
        target: threshold * baseline.
        baseline: the baseline value used (mean of the runs for "local").
        baseline_kind: "global" or "local" (or the label given).
        baseline_runs: the direct-training scores of a local baseline.
        threshold: fraction of the baseline to reach (0.9).
        seeds: every seed evaluated (each d averages the seeds evaluated there).
        n_evaluations: calls of ``evaluate`` made by this search (training runs).
        evaluations: DataFrame with columns d, seed, score, phase (scan / bisect / prior).
        ci_level, n_bootstrap: bootstrap settings.
        message: why d90 is None, or "".
        rule: the threshold rule (`TARGET_RULES`); pretrained: the pretrained score of rule "improvement".
    """

    d90: int | None
    d90_interp: float | None
    ci: tuple[float, float] | None
    d90_std: float | None
    target: float
    baseline: float
    baseline_kind: str
    baseline_runs: tuple[float, ...]
    threshold: float
    seeds: tuple[int, ...]
    n_evaluations: int
    evaluations: pd.DataFrame = field(repr=False)
    ci_level: float = 0.95
    n_bootstrap: int = 1000
    message: str = ""
    rule: str = "fraction"
    pretrained: float | None = None

    @property
    def found(self) -> bool:
        """Whether some evaluated d reached the target."""
        return self.d90 is not None

    def curve(self) -> pd.DataFrame:
        """Seed-mean, std, min and max score per evaluated d (sorted by d)."""
        g = self.evaluations.groupby("d")["score"]
        return pd.DataFrame(
            {"mean": g.mean(), "std": g.std(ddof=0), "min": g.min(), "max": g.max(), "n": g.count()}
        ).reset_index()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (evaluations as a list of records)."""
        return {
            "d90": self.d90,
            "d90_interp": self.d90_interp,
            "ci": list(self.ci) if self.ci is not None else None,
            "d90_std": self.d90_std,
            "target": self.target,
            "baseline": self.baseline,
            "baseline_kind": self.baseline_kind,
            "baseline_runs": list(self.baseline_runs),
            "threshold": self.threshold,
            "seeds": list(self.seeds),
            "n_evaluations": self.n_evaluations,
            "ci_level": self.ci_level,
            "n_bootstrap": self.n_bootstrap,
            "message": self.message,
            "rule": self.rule,
            "pretrained": self.pretrained,
            "evaluations": [
                {"d": d, "seed": s, "score": v, "phase": ph} for d, s, v, ph in _rows(self.evaluations)
            ],
        }


def _rows(df: pd.DataFrame) -> list[tuple[int, int, float, str]]:
    """(d, seed, score, phase) per row of an evaluations DataFrame (phase "prior" if absent)."""
    phase = df["phase"].astype(str).tolist() if "phase" in df else ["prior"] * len(df)
    return [
        (int(d), int(s), float(v), ph)
        for d, s, v, ph in zip(df["d"].tolist(), df["seed"].tolist(), df["score"].tolist(), phase)
    ]


@dataclass(frozen=True)
class Baseline:
    """The baseline of a d90 / r90 and its target.

    Attributes:
        value: the baseline score (mean of ``runs`` for a local baseline).
        kind: "global" (a fixed value), "local" (direct-training runs), or the label given.
        runs: the direct-training scores of a local baseline (empty for a global one).
        threshold: fraction of the baseline (rule "fraction") or of its gain over the pretrained
            score (rule "improvement") to reach (0.9).
        target: threshold * value (fraction); pretrained + threshold * (value - pretrained) (improvement).
        rule: the threshold rule, one of `TARGET_RULES`.
        pretrained: the pretrained model's score (rule "improvement"; None for "fraction").
    """

    value: float
    kind: str
    runs: tuple[float, ...]
    threshold: float
    target: float
    rule: str = "fraction"
    pretrained: float | None = None


def _baseline_value(baseline: float | Sequence[float]) -> tuple[float, tuple[float, ...], str]:
    """(value, runs, default kind) of a fixed baseline or of direct-training scores (their mean)."""
    if isinstance(baseline, (int, float, np.floating, np.integer)) and not isinstance(baseline, bool):
        return float(baseline), (), "global"
    if isinstance(baseline, Iterable) and not isinstance(baseline, (str, bytes)):
        runs = tuple(float(b) for b in baseline)
        if not runs:
            raise ValueError("d90: baseline is an empty sequence; pass direct-run scores or a float")
        return float(np.mean(runs)), runs, "local"
    raise TypeError(
        f"d90: baseline must be a float (global) or a sequence of direct-run scores (local), got {baseline!r}"
    )


def make_baseline(baseline: float | Sequence[float], threshold: float = 0.9, kind: str | None = None) -> Baseline:
    """A `Baseline` (rule "fraction") from a fixed value (global) or direct-training scores (local: their mean).

    Raises:
        ValueError: an empty sequence, a non-finite or non-positive baseline, a bad threshold.
        TypeError: neither a number nor a sequence of numbers.
    """
    value, runs, default = _baseline_value(baseline)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"d90: baseline must be finite and > 0, got {value} (from {baseline!r}); the fraction "
                         "rule needs a score in [0, 1] (a loss: rule 'improvement', target.rule: improvement)")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"d90: threshold must be a positive number, got {threshold}")
    return Baseline(value, kind or default, runs, float(threshold), float(threshold) * value)


def make_target(baseline: float | Sequence[float], threshold: float = 0.9, kind: str | None = None, *,
                rule: str = "fraction", pretrained: float | None = None) -> Baseline:
    """THE target of a crossing under ``rule`` (`TARGET_RULES`; docs/SCIENCE.md section 6).

    Scores are higher-is-better (a loss enters as its negative, ``neg_loss``). "fraction":
    `make_baseline` (``pretrained`` is not used). "improvement": target = pretrained + threshold x
    (baseline - pretrained), i.e. for a loss L = -score: L_pre - threshold (L_pre - L_full).

    Raises:
        ValueError: an unknown rule; for "improvement" a missing or non-finite pretrained score, a
            non-finite baseline, or a baseline that does not improve on the pretrained score.
    """
    if rule == "fraction":
        return make_baseline(baseline, threshold, kind)
    if rule != "improvement":
        raise ValueError(f"d90: unknown threshold rule {rule!r}; rules: {', '.join(TARGET_RULES)}")
    value, runs, default = _baseline_value(baseline)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"d90: threshold must be a positive number, got {threshold}")
    if pretrained is None or not math.isfinite(pretrained):
        raise ValueError(f"d90: rule 'improvement' needs a finite pretrained score, got {pretrained} "
                         "(train.eval_at_start: true records it; or set target.pretrained)")
    if not math.isfinite(value):
        raise ValueError(f"d90: baseline must be finite, got {value} (from {baseline!r})")
    if value <= pretrained:
        raise ValueError(f"d90: full fine-tuning ({value:.6g}) does not improve on the pretrained score "
                         f"({pretrained:.6g}): no gain to reach a fraction of")
    t = float(pretrained) + float(threshold) * (value - float(pretrained))
    return Baseline(value, kind or default, runs, float(threshold), t, "improvement", float(pretrained))


def seed_mean(vals: Iterable[float]) -> float:
    """Mean with NaN counted as -inf (a diverged run is a failure)."""
    arr = np.array(list(vals), dtype=float)
    arr[np.isnan(arr)] = -np.inf
    return float(arr.mean())


def rate_scores(scores: Mapping[float, Mapping[int, float]]) -> dict[float, float]:
    """The score that ranks each learning rate of one cell: `seed_mean` over the shared seeds.

    ``scores[lr][seed]`` is a run's score (NaN for a diverged or unscored run: a failure).
    Rates are compared on the seeds every rate has, so that a one-seed probe is not weighed
    against a three-seed mean; with no seed shared by all, each rate's own `seed_mean`.
    """
    seed_sets = [set(by_seed) for by_seed in scores.values() if by_seed]
    shared = set.intersection(*seed_sets) if len(seed_sets) > 1 else set()
    return {lr: seed_mean(by_seed[k] for k in sorted(shared)) if shared else
            (seed_mean(by_seed.values()) if by_seed else -math.inf)
            for lr, by_seed in scores.items()}


def select_lr(scores: Mapping[float, Mapping[int, float]]) -> float | None:
    """THE learning-rate rule of a cell: the rate with the highest `rate_scores` (the smaller rate on a tie).

    The sweep (the full-FT baseline, ``d: auto`` refinement) and the report (``selected``)
    both call it. None when there is no rate.
    """
    ranked = rate_scores(scores)
    return max(sorted(ranked), key=lambda lr: ranked[lr], default=None)


def rate_baseline(scores: Mapping[float, Mapping[int, float]], threshold: float = 0.9,
                  kind: str | None = None, *, rule: str = "fraction", pretrained: float | None = None) -> Baseline | None:
    """The local baseline from direct-training (full FT) runs: the seeds of the `select_lr` rate; its
    target by ``rule`` (`make_target`).

    None when there is no rate or the selected rate has a failed seed (then every rate has one).
    """
    lr = select_lr(scores)
    if lr is None:
        return None
    vals = [scores[lr][k] for k in sorted(scores[lr])]
    if not vals or not all(math.isfinite(v) for v in vals):
        return None
    return make_target(vals, threshold, kind, rule=rule, pretrained=pretrained)


def interpolate_log(x_a: float, m_a: float, x_b: float, m_b: float, target: float) -> float:
    """Crossing of ``target`` on the segment (x_a, m_a) -> (x_b, m_b), linear in log x (see module docstring)."""
    if not math.isfinite(m_a) or m_b == m_a:
        return float(x_b)
    t = (target - m_a) / (m_b - m_a)
    return float(math.exp(math.log(x_a) + t * (math.log(x_b) - math.log(x_a))))


def crossing(xs: Sequence[float], means: Sequence[float], target: float) -> tuple[float | None, float | None]:
    """(smallest x with mean >= target, interpolated crossing) of a curve sorted by increasing x > 0."""
    for i, (x, m) in enumerate(zip(xs, means)):
        if m >= target:
            if i == 0:
                return float(x), float(x)
            return float(x), interpolate_log(float(xs[i - 1]), float(means[i - 1]), float(x), float(m), target)
    return None, None


def bisection_point(lo: int, hi: int) -> int:
    """The geometric midpoint round(sqrt(lo * hi)) of a bracket, clamped into (lo, hi)."""
    mid = round(math.sqrt(lo * hi))
    return min(max(mid, lo + 1), hi - 1)


def next_bisection(xs: Sequence[int], means: Sequence[float], target: float, rtol: float) -> int | None:
    """The next point of the search on an evaluated curve, or None when it has converged.

    The bracket is (largest failing x below the first passing one, first passing x); the
    search goes on while ``hi - lo > 1`` and ``(hi - lo) / hi > rtol`` (`find_d90`'s rule).
    None also when nothing passes or the smallest x already passes.
    """
    hi_f, _ = crossing(xs, means, target)
    if hi_f is None:
        return None
    hi = int(hi_f)
    below = [int(x) for x in xs if x < hi]
    if not below:
        return None
    lo = max(below)
    if hi - lo <= 1 or (hi - lo) / hi <= rtol:
        return None
    return bisection_point(lo, hi)


@dataclass(frozen=True)
class Crossing:
    """Where a seed-averaged curve first reaches a target, with its bootstrap interval.

    Attributes:
        value: smallest evaluated x whose seed-mean >= target (None: none).
        interp: the crossing interpolated linearly in log x (None if value is None).
        ci: percentile interval of ``interp`` over the bootstrap at ``ci_level``
            (inf: "not reached"); None without a crossing.
        std: standard deviation of the finite bootstrap values (None without any).
        grid: the evaluated x, sorted; means: seed-mean at each; n_seeds: seeds at each.
        seeds: every seed evaluated (sorted).
        target, n_bootstrap, ci_level: the settings.
    """

    value: float | None
    interp: float | None
    ci: tuple[float, float] | None
    std: float | None
    grid: tuple[float, ...]
    means: tuple[float, ...]
    n_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    target: float
    n_bootstrap: int
    ci_level: float


def _as_frame(evaluations: pd.DataFrame | Mapping[tuple[int, int], float], x: str = "d") -> pd.DataFrame:
    if isinstance(evaluations, pd.DataFrame):
        return evaluations.copy()
    return pd.DataFrame([{x: d, "seed": s, "score": v} for (d, s), v in evaluations.items()],
                        columns=[x, "seed", "score"])


def threshold_crossing(
    evaluations: pd.DataFrame | Mapping[tuple[int, int], float],
    target: float,
    *,
    x: str = "d",
    score: str = "score",
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    bootstrap_seed: int = 0,
) -> Crossing:
    """The crossing of ``target`` by the seed-mean curve of ``evaluations`` (rules: module docstring).

    Args:
        evaluations: DataFrame with columns ``x``, seed and ``score`` (one row per run; NaN =
            diverged = failure), or a mapping (x, seed) -> score.
        target: the score to reach (threshold * baseline, or any other target).
        x: the column of the axis (d for d90, r for r90).
        score: the column of the score.
        n_bootstrap: resamples of the seeds (>= 100).
        ci_level: coverage of the percentile interval, in (0, 1).
        bootstrap_seed: seed of the resampling.
    """
    if n_bootstrap < 100:
        raise ValueError(f"d90: n_bootstrap must be >= 100, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ValueError(f"d90: ci_level must be in (0, 1), got {ci_level}")
    df = _as_frame(evaluations, x)
    table: dict[float, dict[int, float]] = {}
    for xv, sv, v in zip(df[x].tolist(), df["seed"].tolist(), df[score].tolist()):
        table.setdefault(float(xv), {})[int(sv)] = float("nan") if v is None or pd.isna(v) else float(v)
    xs = sorted(table)
    means = [seed_mean(table[xv].values()) for xv in xs]
    seeds = tuple(sorted({s for row in table.values() for s in row}))
    value, interp = crossing(xs, means, target)
    ci: tuple[float, float] | None = None
    std: float | None = None
    if value is not None:
        rng = np.random.default_rng(bootstrap_seed)
        k = len(seeds)
        # (n_x, k) scores with NaN where a seed is absent at x; diverged runs are -inf
        grid = np.full((len(xs), k), np.nan)
        for i, xv in enumerate(xs):
            for j, s in enumerate(seeds):
                if s in table[xv]:
                    v = table[xv][s]
                    grid[i, j] = -np.inf if math.isnan(v) else v
        present = ~np.isnan(grid)
        filled = np.where(present, grid, 0.0)
        full_mean = np.array(means)
        boot = np.empty(n_bootstrap)
        for b in range(n_bootstrap):
            counts = np.bincount(rng.integers(0, k, size=k), minlength=k).astype(float)  # (k,)
            w = present * counts  # (n_x, k): multiplicity of each drawn seed present at x
            n = w.sum(1)
            with np.errstate(invalid="ignore"):
                m = np.where(n > 0, (np.where(w > 0, filled, 0.0) * w).sum(1) / np.maximum(n, 1), full_mean)
            _, xb = crossing(xs, m.tolist(), target)
            boot[b] = np.inf if xb is None else xb
        alpha = (1 - ci_level) / 2
        srt = np.sort(boot)
        ci = (float(srt[math.floor(alpha * (n_bootstrap - 1))]), float(srt[math.ceil((1 - alpha) * (n_bootstrap - 1))]))
        finite = boot[np.isfinite(boot)]
        std = float(finite.std()) if len(finite) else None
    return Crossing(value, interp, ci, std, tuple(xs), tuple(means), tuple(len(table[xv]) for xv in xs), seeds,
                    float(target), n_bootstrap, ci_level)


def analyze_d90(
    evaluations: pd.DataFrame | Mapping[tuple[int, int], float],
    baseline: float | Sequence[float],
    threshold: float = 0.9,
    *,
    baseline_kind: str | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    bootstrap_seed: int = 0,
    n_evaluations: int | None = None,
    rule: str = "fraction",
    pretrained: float | None = None,
) -> D90Result:
    """d90, interpolation and bootstrap from given evaluations (no new runs).

    Args:
        evaluations: DataFrame with columns d, seed, score (phase optional) or a
            mapping (d, seed) -> score. Each d averages the seeds evaluated there.
        baseline, threshold, baseline_kind: as in `find_d90` (`make_baseline`).
        n_bootstrap: resamples of the seeds (>= 100).
        ci_level: coverage of the percentile interval.
        bootstrap_seed: seed of the resampling.
        n_evaluations: recorded as is (default: the number of rows).
        rule, pretrained: the threshold rule and the pretrained score (`make_target`).
    """
    base = make_target(baseline, threshold, baseline_kind, rule=rule, pretrained=pretrained)
    if n_bootstrap < 100:
        raise ValueError(f"analyze_d90: n_bootstrap must be >= 100, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ValueError(f"analyze_d90: ci_level must be in (0, 1), got {ci_level}")
    df = _as_frame(evaluations)
    if "phase" not in df:
        df["phase"] = "prior"
    common = dict(
        target=base.target, baseline=base.value, baseline_kind=base.kind, baseline_runs=base.runs,
        threshold=base.threshold, ci_level=ci_level, n_bootstrap=n_bootstrap, rule=base.rule,
        pretrained=base.pretrained,
    )
    if df.empty:
        return D90Result(None, None, None, None, seeds=(), n_evaluations=n_evaluations or 0,
                         evaluations=df, message="no evaluations", **common)  # type: ignore[arg-type]
    df = df.sort_values(["d", "seed"], kind="stable").reset_index(drop=True)
    cr = threshold_crossing(df, base.target, n_bootstrap=n_bootstrap, ci_level=ci_level,
                            bootstrap_seed=bootstrap_seed)
    n_eval = len(df) if n_evaluations is None else n_evaluations
    if cr.value is None:
        msg = (f"no evaluated d reached the target {base.target:.4g} (largest d {int(cr.grid[-1])}, "
               f"best mean {max(cr.means):.4g})")
        return D90Result(None, None, None, None, seeds=cr.seeds, n_evaluations=n_eval, evaluations=df,
                         message=msg, **common)  # type: ignore[arg-type]
    return D90Result(int(cr.value), cr.interp, cr.ci, cr.std, seeds=cr.seeds, n_evaluations=n_eval,
                     evaluations=df, **common)  # type: ignore[arg-type]


__all__ = ["TARGET_RULES", "Baseline", "Crossing", "D90Result", "TargetRule", "analyze_d90", "bisection_point",
           "crossing", "interpolate_log", "make_baseline", "make_target", "next_bisection", "rate_baseline", "rate_scores", "seed_mean", "select_lr",
           "threshold_crossing"]
