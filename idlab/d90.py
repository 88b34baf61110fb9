"""d90: the smallest subspace dimension reaching 90% of the baseline (Li et al. 2018).

`find_d90` searches d adaptively instead of on a hand-written grid:

1. coarse log-spaced scan d_k = ceil(d_start * factor^k) (upwards until the first
   d whose seed-mean score passes ``target = threshold * baseline``; downwards
   from ``d_start`` while it passes),
2. integer bisection on a log scale, mid = round(sqrt(lo * hi)), between the
   last failing and the first passing d until (hi - lo) / hi <= rtol or hi - lo = 1,
3. d90 = the smallest evaluated d whose seed-mean passes; d90_interp = linear
   interpolation of the seed-mean curve between that d and the largest
   evaluated d below it,
   d90_interp = d_a + (target - m_a) (d_b - d_a) / (m_b - m_a),
4. a bootstrap over seeds (seeds resampled with replacement, the same draw at
   every d; ``n_bootstrap`` >= 100 resamples, seeded) of d90_interp gives a
   percentile interval ``ci`` and a standard deviation ``d90_std``.

Every (d, seed) is evaluated at most once (cached; ``prior`` evaluations are
reused). Scores must be higher-is-better (accuracy). A NaN score raises by
default; ``on_nan="fail"`` records it and counts it as a failure (-inf in the
mean), the convention for diverged runs.

Baselines: a float is a *global* baseline (e.g. 1.0 for MNIST); a sequence of
direct-training scores is a *local* baseline (its mean is used). The kind is
recorded in the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = ["D90Result", "analyze_d90", "find_d90"]


@dataclass(frozen=True)
class D90Result:
    """Outcome of a d90 search.

    Attributes:
        d90: smallest evaluated d whose seed-mean score >= target (None: none passed).
        d90_interp: seed-mean curve linearly interpolated at the target (None if d90 is None;
            equal to d90 when nothing below d90 was evaluated).
        ci: bootstrap percentile interval of d90_interp at ``ci_level`` (inf: resamples
            in which no evaluated d passes).
        d90_std: bootstrap standard deviation of d90_interp (finite resamples).
        target: threshold * baseline.
        baseline: the baseline value used (mean of the runs for "local").
        baseline_kind: "global" or "local" (or the label given).
        baseline_runs: the direct-training scores of a local baseline.
        threshold: fraction of the baseline to reach (0.9).
        seeds: seeds evaluated at every d.
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


def _baseline(baseline: float | Sequence[float], kind: str | None) -> tuple[float, str, tuple[float, ...]]:
    runs: tuple[float, ...]
    if isinstance(baseline, (int, float, np.floating, np.integer)) and not isinstance(baseline, bool):
        value, runs, default = float(baseline), (), "global"
    elif isinstance(baseline, Iterable) and not isinstance(baseline, (str, bytes)):
        runs = tuple(float(b) for b in baseline)
        if not runs:
            raise ValueError("find_d90: baseline is an empty sequence; pass direct-run scores or a float")
        value, default = float(np.mean(runs)), "local"
    else:
        raise TypeError(
            f"find_d90: baseline must be a float (global) or a sequence of direct-run scores (local), "
            f"got {baseline!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"find_d90: baseline must be finite and > 0, got {value} (from {baseline!r})")
    return value, kind or default, runs


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


def _means(table: dict[int, dict[int, float]], seeds: Sequence[int]) -> dict[int, float]:
    """Seed-mean per d over ``seeds`` (NaN counts as -inf: a failure)."""
    out = {}
    for d, row in table.items():
        vals = np.array([row[s] for s in seeds], dtype=float)
        vals[np.isnan(vals)] = -np.inf
        out[d] = float(vals.mean())
    return out


def _crossing(ds: np.ndarray, means: np.ndarray, target: float) -> tuple[int | None, float | None]:
    """(smallest d with mean >= target, interpolated crossing) on a curve sorted by d."""
    passing = np.nonzero(means >= target)[0]
    if len(passing) == 0:
        return None, None
    i = int(passing[0])
    if i == 0:
        return int(ds[0]), float(ds[0])
    da, db, ma, mb = float(ds[i - 1]), float(ds[i]), float(means[i - 1]), float(means[i])
    if not math.isfinite(ma) or mb == ma:
        return int(db), db
    return int(db), da + (target - ma) * (db - da) / (mb - ma)


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
            mapping (d, seed) -> score. Only the seeds evaluated at *every* d are used.
        baseline, threshold, baseline_kind: as in `find_d90`.
        n_bootstrap: resamples of the seeds (>= 100).
        ci_level: coverage of the percentile interval.
        bootstrap_seed: seed of the resampling.
        n_evaluations: recorded as is (default: the number of rows).
    """
    value, kind, runs = _baseline(baseline, baseline_kind)
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"analyze_d90: threshold must be a positive number, got {threshold}")
    if n_bootstrap < 100:
        raise ValueError(f"analyze_d90: n_bootstrap must be >= 100, got {n_bootstrap}")
    if not 0 < ci_level < 1:
        raise ValueError(f"analyze_d90: ci_level must be in (0, 1), got {ci_level}")
    if isinstance(evaluations, pd.DataFrame):
        df = evaluations.copy()
    else:
        df = pd.DataFrame([{"d": d, "seed": s, "score": v} for (d, s), v in evaluations.items()])
    if "phase" not in df:
        df["phase"] = "prior"
    target = threshold * value
    common = dict(
        target=target, baseline=value, baseline_kind=kind, baseline_runs=runs, threshold=threshold,
        ci_level=ci_level, n_bootstrap=n_bootstrap,
    )
    if df.empty:
        return D90Result(None, None, None, None, seeds=(), n_evaluations=n_evaluations or 0,
                         evaluations=df, message="no evaluations", **common)  # type: ignore[arg-type]
    df = df.sort_values(["d", "seed"], kind="stable").reset_index(drop=True)
    table: dict[int, dict[int, float]] = {}
    for d_, s_, v_, _ in _rows(df):
        table.setdefault(d_, {})[s_] = v_
    seed_sets = [set(row) for row in table.values()]
    seeds = tuple(sorted(set.intersection(*seed_sets)))
    if not seeds:
        raise ValueError("analyze_d90: no seed is evaluated at every d; cannot average over seeds")
    ds = np.array(sorted(table), dtype=float)
    scores = np.array([[table[int(d)][s] for s in seeds] for d in ds], dtype=float)  # (n_d, n_seeds)
    scores[np.isnan(scores)] = -np.inf
    d90, interp = _crossing(ds, scores.mean(1), target)
    n_eval = len(df) if n_evaluations is None else n_evaluations
    if d90 is None:
        msg = f"no evaluated d reached the target {target:.4g} (largest d {int(ds[-1])}, best mean {scores.mean(1).max():.4g})"
        return D90Result(None, None, None, None, seeds=seeds, n_evaluations=n_eval, evaluations=df,
                         message=msg, **common)  # type: ignore[arg-type]
    rng = np.random.default_rng(bootstrap_seed)
    k = len(seeds)
    boot = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        pick = rng.integers(0, k, size=k)
        _, x = _crossing(ds, scores[:, pick].mean(1), target)
        boot[b] = np.inf if x is None else x
    alpha = (1 - ci_level) / 2
    srt = np.sort(boot)
    lo = float(srt[math.floor(alpha * (n_bootstrap - 1))])
    hi = float(srt[math.ceil((1 - alpha) * (n_bootstrap - 1))])
    finite = boot[np.isfinite(boot)]
    std = float(finite.std()) if len(finite) else None
    return D90Result(d90, interp, (lo, hi), std, seeds=seeds, n_evaluations=n_eval, evaluations=df,
                     **common)  # type: ignore[arg-type]


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
    value, kind, runs = _baseline(baseline, baseline_kind)
    target = threshold * value
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"find_d90: threshold must be a positive number, got {threshold}")
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
        arr = np.array(vals, dtype=float)
        arr[np.isnan(arr)] = -np.inf
        m = float(arr.mean())
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
            mid = round(math.sqrt(lo * hi))
            mid = min(max(mid, lo + 1), hi - 1)
            if mean_at(mid, "bisect") >= target:
                hi = mid
            else:
                lo = mid
    df = pd.DataFrame(
        [{"d": d_, "seed": s_, "score": v, "phase": ph} for (d_, s_), (v, ph) in cache.items()],
        columns=["d", "seed", "score", "phase"],
    )
    res = analyze_d90(
        df, runs if runs else value, threshold, baseline_kind=kind,
        n_bootstrap=n_bootstrap, ci_level=ci_level, bootstrap_seed=bootstrap_seed, n_evaluations=n_calls,
    )
    if res.d90 is None and d_max is not None:
        object.__setattr__(res, "message", f"no d <= d_max={d_max} reached the target: " + res.message)
    return res
