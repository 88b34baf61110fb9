"""d90: the smallest subspace dimension reaching 90% of the baseline (Li et al. 2018).

This module is the one owner of the d90 / r90 estimator (docs/SCIENCE.md section 1): the
threshold and baseline (`make_baseline`), the crossing (`threshold_crossing`), the
bootstrap interval, and the adaptive search (`find_d90`). The report (r90 uses the same
crossing over LoRA rank r), the sweep's ``d: auto`` refinement (`next_bisection`) and
``experiments/li2018.py`` all call it, so the same runs give the same d90 everywhere.

Definitions (scores are higher-is-better; x = d, or the LoRA rank r for r90):

- target = threshold * baseline; baseline = a fixed value ("global", e.g. 1.0 on MNIST)
  or the mean of direct-training scores ("local", full fine-tuning).
- m(x) = seed-mean score at x over every seed evaluated there; a NaN score (a diverged
  run) counts as a failure (-inf), so a point with a diverged seed does not pass.
- d90 = the smallest evaluated x with m(x) >= target (the "grid value").
- d90_interp: THE interpolation rule is linear in log x between that point x_b and the
  largest evaluated point below it x_a::

      t = (target - m_a) / (m_b - m_a),   d90_interp = exp(log x_a + t (log x_b - log x_a))

  Why log: every grid idlab evaluates is log-spaced (the scan multiplies by ``factor``,
  bisection takes the geometric midpoint round(sqrt(lo hi)), ``d: auto`` has 1-3 points per
  decade, LoRA ranks double), and score curves rise roughly linearly in log d (Li et al.
  Fig. 3; Aghajanyan et al. Fig. 1), which is also the axis every d90 figure is drawn on.
  Linear-in-x interpolation on such a grid pulls the crossing towards the upper point
  (between 1,000 and 10,000 halfway in score is 5,500 instead of 3,162). d90_interp = x_b
  when x_b is the smallest point, when m_a = m_b, or when m_a = -inf.
- Bootstrap: ``n_bootstrap`` (default 1,000) resamples, seeded (``bootstrap_seed``, 0). Each
  resample draws k seeds with replacement from the k distinct seeds and uses the SAME draw at
  every x (a seed's runs at different x share its initialisation); m(x) is the mean over the
  drawn seeds present at x (with multiplicity), or the full mean at x when none of them is.
  The interval ``ci`` is the percentile interval at ``ci_level`` (default 0.95: the 2.5% and
  97.5% order statistics); a resample in which no x passes gives +inf ("not reached"), and
  ``d90_std`` is the standard deviation of the finite resamples.

`find_d90` searches d adaptively instead of on a hand-written grid:

1. coarse log-spaced scan d_k = ceil(d_start * factor^k) (upwards until the first
   d whose seed-mean score passes; downwards from ``d_start`` while it passes),
2. integer bisection on a log scale, `bisection_point` = round(sqrt(lo * hi)), between the
   last failing and the first passing d until (hi - lo) / hi <= rtol or hi - lo = 1,
3. d90, d90_interp and the bootstrap as above (`analyze_d90`).

Every (d, seed) is evaluated at most once (cached; ``prior`` evaluations are
reused). A NaN score raises by default; ``on_nan="fail"`` records it and counts it
as a failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = ["Baseline", "Crossing", "D90Result", "analyze_d90", "bisection_point", "crossing", "find_d90",
           "interpolate_log", "make_baseline", "next_bisection", "seed_mean",
           "threshold_crossing"]


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
        threshold: fraction of the baseline to reach (0.9).
        target: threshold * value.
    """

    value: float
    kind: str
    runs: tuple[float, ...]
    threshold: float
    target: float


def make_baseline(baseline: float | Sequence[float], threshold: float = 0.9, kind: str | None = None) -> Baseline:
    """A `Baseline` from a fixed value (global) or direct-training scores (local: their mean).

    Raises:
        ValueError: an empty sequence, a non-finite or non-positive baseline, a bad threshold.
        TypeError: neither a number nor a sequence of numbers.
    """
    runs: tuple[float, ...]
    if isinstance(baseline, (int, float, np.floating, np.integer)) and not isinstance(baseline, bool):
        value, runs, default = float(baseline), (), "global"
    elif isinstance(baseline, Iterable) and not isinstance(baseline, (str, bytes)):
        runs = tuple(float(b) for b in baseline)
        if not runs:
            raise ValueError("d90: baseline is an empty sequence; pass direct-run scores or a float")
        value, default = float(np.mean(runs)), "local"
    else:
        raise TypeError(
            f"d90: baseline must be a float (global) or a sequence of direct-run scores (local), got {baseline!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"d90: baseline must be finite and > 0, got {value} (from {baseline!r})")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"d90: threshold must be a positive number, got {threshold}")
    return Baseline(value, kind or default, runs, float(threshold), float(threshold) * value)


def _check_score(d: int, seed: int, score: Any, on_nan: str) -> float:
    try:
        v = float(score)
    except (TypeError, ValueError) as e:
        raise TypeError(f"find_d90: evaluate(d={d}, seed={seed}) returned {score!r}, not a float") from e
    if math.isnan(v) and on_nan == "raise":
        raise ValueError(
            f"find_d90: evaluate(d={d}, seed={seed}) returned NaN; fix the run, or pass "
            "on_nan='fail' to count NaN (diverged) runs as failures"
        )
    return v


def seed_mean(vals: Iterable[float]) -> float:
    """Mean with NaN counted as -inf (a diverged run is a failure)."""
    arr = np.array(list(vals), dtype=float)
    arr[np.isnan(arr)] = -np.inf
    return float(arr.mean())


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
    """
    base = make_baseline(baseline, threshold, baseline_kind)
    if n_bootstrap < 100:
        raise ValueError(f"analyze_d90: n_bootstrap must be >= 100, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ValueError(f"analyze_d90: ci_level must be in (0, 1), got {ci_level}")
    df = _as_frame(evaluations)
    if "phase" not in df:
        df["phase"] = "prior"
    common = dict(
        target=base.target, baseline=base.value, baseline_kind=base.kind, baseline_runs=base.runs,
        threshold=base.threshold, ci_level=ci_level, n_bootstrap=n_bootstrap,
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


def find_d90(
    evaluate: Callable[[int, int], float],
    baseline: float | Sequence[float],
    threshold: float = 0.9,
    seeds: Sequence[int] = (0, 1, 2),
    d_min: int = 1,
    d_max: int | None = None,
    *,
    d_start: int | None = None,
    factor: float = 2.0,
    rtol: float = 0.05,
    baseline_kind: str | None = None,
    on_nan: Literal["raise", "fail"] = "raise",
    prior: pd.DataFrame | Mapping[tuple[int, int], float] | None = None,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    bootstrap_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> D90Result:
    """Find d90 with a log-spaced scan, log-scale bisection and a seed bootstrap.

    Args:
        evaluate: ``evaluate(d, seed) -> score`` (higher is better), e.g. the
            validation accuracy after training a `SubspaceModel` of dimension d.
        baseline: a float (global baseline) or the scores of direct-training runs
            (local baseline: their mean).
        threshold: fraction of the baseline to reach; target = threshold * baseline.
        seeds: seeds evaluated at every d; the decision uses their mean.
        d_min, d_max: search range (d_max None: unbounded scan).
        d_start: first d of the scan (default d_min); scans down while it passes.
        factor: ratio of successive scan points (> 1).
        rtol: stop bisecting when (hi - lo) / hi <= rtol (or hi - lo == 1).
        baseline_kind: label overriding "global"/"local".
        on_nan: "raise" (ValueError naming d and seed) or "fail" (NaN = failure).
        prior: earlier evaluations (DataFrame d/seed/score or {(d, seed): score}),
            reused instead of re-running (not counted in n_evaluations).
        n_bootstrap, ci_level, bootstrap_seed: bootstrap settings.
        log: optional callback receiving one line per evaluated d.

    Returns:
        `D90Result`; ``d90 is None`` (with a message) if no d in range passes.

    Raises:
        ValueError: bad range / factor / rtol / threshold / baseline, or a NaN score
            with ``on_nan="raise"``.
    """
    base = make_baseline(baseline, threshold, baseline_kind)
    target = base.target
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"find_d90: seeds must be a non-empty sequence of distinct ints, got {seeds}")
    if d_min < 1:
        raise ValueError(f"find_d90: d_min must be >= 1, got {d_min}")
    if d_max is not None and d_max < d_min:
        raise ValueError(f"find_d90: d_max={d_max} < d_min={d_min}")
    start = d_min if d_start is None else d_start
    if start < d_min or (d_max is not None and start > d_max):
        raise ValueError(f"find_d90: d_start={start} is outside [d_min={d_min}, d_max={d_max}]")
    if not factor > 1:
        raise ValueError(f"find_d90: factor must be > 1, got {factor}")
    if not 0 < rtol < 1:
        raise ValueError(f"find_d90: rtol must be in (0, 1), got {rtol}")
    if on_nan not in ("raise", "fail"):
        raise ValueError(f"find_d90: on_nan must be 'raise' or 'fail', got {on_nan!r}")

    cache: dict[tuple[int, int], tuple[float, str]] = {}
    if prior is not None:
        items = (
            {(d_, s_): v_ for d_, s_, v_, _ in _rows(prior)}
            if isinstance(prior, pd.DataFrame)
            else {(int(d), int(s)): float(v) for (d, s), v in prior.items()}
        )
        cache.update({k: (v, "prior") for k, v in items.items()})
    n_calls = 0

    def mean_at(d: int, phase: str) -> float:
        nonlocal n_calls
        vals = []
        for s in seeds:
            if (d, s) not in cache:
                v = _check_score(d, s, evaluate(d, s), on_nan)
                n_calls += 1
                cache[(d, s)] = (v, phase)
            vals.append(cache[(d, s)][0])
        m = seed_mean(vals)
        if log is not None:
            log(f"d={d}: mean {m:.4f} ({'pass' if m >= target else 'fail'}, target {target:.4f})")
        return m

    lo: int | None = None  # largest known failing d
    hi: int | None = None  # smallest known passing d
    d = start
    if mean_at(d, "scan") >= target:
        hi = d
        while d > d_min:  # scan down while passing
            d = max(d_min, math.floor(d / factor))
            if mean_at(d, "scan") >= target:
                hi = d
            else:
                lo = d
                break
    else:
        lo = d
        while True:
            if d_max is not None and d >= d_max:
                break
            nd = max(d + 1, math.ceil(d * factor))
            d = nd if d_max is None else min(nd, d_max)
            if mean_at(d, "scan") >= target:
                hi = d
                break
            lo = d
    if hi is not None and lo is not None:
        while hi - lo > 1 and (hi - lo) / hi > rtol:
            mid = bisection_point(lo, hi)
            if mean_at(mid, "bisect") >= target:
                hi = mid
            else:
                lo = mid
    df = pd.DataFrame(
        [{"d": d_, "seed": s_, "score": v, "phase": ph} for (d_, s_), (v, ph) in cache.items()],
        columns=["d", "seed", "score", "phase"],
    )
    res = analyze_d90(
        df, base.runs if base.runs else base.value, threshold, baseline_kind=base.kind,
        n_bootstrap=n_bootstrap, ci_level=ci_level, bootstrap_seed=bootstrap_seed, n_evaluations=n_calls,
    )
    if res.d90 is None and d_max is not None:
        object.__setattr__(res, "message", f"no d <= d_max={d_max} reached the target: " + res.message)
    return res
