"""`find_d90`: the adaptive search for d90 (log scan, log-scale bisection; rules: `idlab.d90`)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import pandas as pd

from idlab.d90.estimator import (
    D90Result,
    _rows,
    analyze_d90,
    bisection_point,
    make_target,
    seed_mean,
)
from idlab.jsontypes import as_float


def _check_score(d: int, seed: int, score: object, on_nan: str) -> float:
    try:
        v = as_float(score)
    except (TypeError, ValueError) as e:
        raise TypeError(f"find_d90: evaluate(d={d}, seed={seed}) returned {score!r}, not a float") from e
    if math.isnan(v) and on_nan == "raise":
        raise ValueError(
            f"find_d90: evaluate(d={d}, seed={seed}) returned NaN; fix the run, or pass "
            "on_nan='fail' to count NaN (diverged) runs as failures"
        )
    return v



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
    progress: bool = True,
    rule: str = "fraction",
    pretrained: float | None = None,
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
        progress: print one line per evaluation to stderr (``find_d90: d=..., seed=...,
            score=... (k of n at this d; evaluation m, t s)``); each evaluation trains a model,
            so a search takes minutes.
        rule, pretrained: the threshold rule ("fraction": threshold x baseline; "improvement":
            pretrained + threshold x (baseline - pretrained)) and the pretrained score
            (`idlab.d90.make_target`).

    Returns:
        `D90Result`; ``d90 is None`` (with a message) if no d in range passes.

    Raises:
        ValueError: bad range / factor / rtol / threshold / baseline, or a NaN score
            with ``on_nan="raise"``.
    """
    base = make_target(baseline, threshold, baseline_kind, rule=rule, pretrained=pretrained)
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
    t_start = time.perf_counter()

    def mean_at(d: int, phase: str) -> float:
        nonlocal n_calls
        vals = []
        for k, s in enumerate(seeds, 1):
            if (d, s) not in cache:
                v = _check_score(d, s, evaluate(d, s), on_nan)
                n_calls += 1
                cache[(d, s)] = (v, phase)
                if progress:
                    print(f"find_d90: d={d}, seed={s}, score={v:.4f} ({k} of {len(seeds)} at this d, {phase}; "
                          f"evaluation {n_calls}, {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
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
        rule=base.rule, pretrained=base.pretrained,
    )
    if res.d90 is None and d_max is not None:
        object.__setattr__(res, "message", f"no d <= d_max={d_max} reached the target: " + res.message)
    return res


__all__ = ["find_d90"]
