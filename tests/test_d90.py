"""find_d90 on synthetic curves with a known crossing."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from idlab.d90 import (
    D90Result,
    analyze_d90,
    bisection_point,
    crossing,
    find_d90,
    interpolate_log,
    make_baseline,
    next_bisection,
    threshold_crossing,
)


def sigmoid_curve(d_true: float, noise: float = 0.0):  # type: ignore[no-untyped-def]
    """Score rising in log d, crossing 0.9 exactly at d_true (plus seeded per-(d, seed) noise)."""
    calls: list[tuple[int, int]] = []

    def f(d: int, seed: int) -> float:
        calls.append((d, seed))
        x = math.log(d) - math.log(d_true)
        base = 1 / (1 + math.exp(-3 * x)) * 0.2 + 0.8  # 0.9 at d_true
        eps = np.random.default_rng([d, seed]).normal(0, noise) if noise else 0.0
        return base + eps

    return f, calls


def test_finds_known_crossing_exactly_without_noise() -> None:
    f, calls = sigmoid_curve(300.0)
    res = find_d90(f, baseline=1.0, threshold=0.9, seeds=(0, 1, 2), d_min=1, d_max=100_000, rtol=0.01)
    assert res.baseline_kind == "global" and res.target == pytest.approx(0.9)
    assert 300 <= res.d90 <= 303  # type: ignore[operator]
    assert res.d90_interp == pytest.approx(300, rel=0.01)
    assert len(calls) == len(set(calls)) == res.n_evaluations  # never the same (d, seed) twice
    assert res.ci is not None and res.ci[0] == pytest.approx(res.ci[1])  # no seed spread
    assert isinstance(res.evaluations, pd.DataFrame)
    assert list(res.evaluations.columns) == ["d", "seed", "score", "phase"]
    # equal precision on a fixed log grid from 1 to 100k at 1% steps needs far more runs
    grid_points = math.ceil(math.log(100_000) / math.log(1.01))
    assert res.n_evaluations < 3 * grid_points / 20


def test_noisy_curve_local_baseline_and_bootstrap() -> None:
    f, calls = sigmoid_curve(750.0, noise=0.01)
    res = find_d90(f, baseline=[0.99, 1.0, 1.01], threshold=0.9, seeds=(0, 1, 2), d_min=16, d_start=64,
                   rtol=0.05, n_bootstrap=200)
    assert res.baseline_kind == "local" and res.baseline == pytest.approx(1.0)
    assert res.baseline_runs == (0.99, 1.0, 1.01)
    assert 400 < res.d90 < 1400  # type: ignore[operator]
    lo, hi = res.ci  # type: ignore[misc]
    assert lo <= res.d90_interp <= hi  # type: ignore[operator]
    assert res.d90_std is not None and res.d90_std >= 0
    assert len(calls) == len(set(calls))
    curve = res.curve()
    assert (curve["n"] == 3).all()
    # d90 is the smallest evaluated d whose mean passes
    passing = curve[curve["mean"] >= res.target]
    assert res.d90 == int(passing["d"].min())
    d = res.to_dict()
    json.dumps(d)
    assert d["d90"] == res.d90 and len(d["evaluations"]) == len(res.evaluations)


def test_prior_evaluations_are_reused_and_analysis_matches() -> None:
    f, _ = sigmoid_curve(100.0)
    first = find_d90(f, 1.0, seeds=(0, 1), d_min=8)
    g, calls = sigmoid_curve(100.0)
    again = find_d90(g, 1.0, seeds=(0, 1), d_min=8, prior=first.evaluations)
    assert calls == [] and again.n_evaluations == 0 and again.d90 == first.d90
    # a global baseline from the same evaluations, no new runs
    same = analyze_d90(first.evaluations, [1.0, 1.0], 0.9)
    assert same.d90 == first.d90 and same.baseline_kind == "local"


def test_scan_down_from_d_start_and_d_min_passing() -> None:
    f, _ = sigmoid_curve(40.0)
    res = find_d90(f, 1.0, seeds=(0,), d_min=2, d_start=512)
    assert 40 <= res.d90 <= 42  # type: ignore[operator]
    h, _ = sigmoid_curve(1.0)
    res = find_d90(h, 1.0, seeds=(0,), d_min=5, d_max=100)
    assert res.d90 == 5 and res.d90_interp == 5.0


def test_no_d_passes_within_d_max() -> None:
    f, calls = sigmoid_curve(10_000.0)
    res = find_d90(f, 1.0, seeds=(0, 1), d_min=1, d_max=1000)
    assert res.d90 is None and res.d90_interp is None and res.ci is None and not res.found
    assert "d_max=1000" in res.message
    assert max(d for d, _ in calls) == 1000
    assert isinstance(res, D90Result)


def test_nan_raises_or_counts_as_failure() -> None:
    def f(d: int, seed: int) -> float:
        if d == 8 and seed == 1:
            return float("nan")
        return 1.0 if d >= 8 else 0.0

    with pytest.raises(ValueError, match=r"d=8, seed=1.*NaN"):
        find_d90(f, 1.0, seeds=(0, 1), d_min=1)
    res = find_d90(f, 1.0, seeds=(0, 1), d_min=1, on_nan="fail")
    assert res.d90 == 9  # d=8 fails because one seed diverged


def test_bad_arguments() -> None:
    f, _ = sigmoid_curve(10.0)
    for kwargs, match in [
        ({"baseline": 0.0}, "baseline"),
        ({"baseline": []}, "empty"),
        ({"baseline": 1.0, "d_min": 0}, "d_min"),
        ({"baseline": 1.0, "d_min": 10, "d_max": 5}, "d_max"),
        ({"baseline": 1.0, "factor": 1.0}, "factor"),
        ({"baseline": 1.0, "rtol": 0.0}, "rtol"),
        ({"baseline": 1.0, "seeds": ()}, "seeds"),
        ({"baseline": 1.0, "n_bootstrap": 10}, "n_bootstrap"),
        ({"baseline": 1.0, "on_nan": "ignore"}, "on_nan"),
    ]:
        with pytest.raises(ValueError, match=match):
            find_d90(f, **kwargs)  # type: ignore[arg-type]


def test_interpolation_is_linear_in_log_d() -> None:
    # mean 0.8 at d = 1000, 1.0 at d = 10000, target 0.9: halfway in score is halfway in log d
    # (sqrt(1000 * 10000) = 3162.3), not halfway in d (5500, the linear rule)
    ev = {(1000, 0): 0.8, (10000, 0): 1.0}
    res = analyze_d90(ev, 1.0, 0.9)
    assert res.d90 == 10000
    assert res.d90_interp == pytest.approx(math.sqrt(1000 * 10000), rel=1e-12)
    assert abs(res.d90_interp - 5500) > 2000  # type: ignore[operator]
    # a quarter of the way in score is a quarter of the way in log d
    assert interpolate_log(10, 0.0, 1000, 1.0, 0.25) == pytest.approx(10 ** 1.5)
    assert crossing([10, 100], [0.5, 0.7], 0.6) == (100.0, pytest.approx(10 ** 1.5))
    assert crossing([10, 100], [0.9, 0.95], 0.6) == (10.0, 10.0) and crossing([10], [0.1], 0.6) == (None, None)


def test_bootstrap_resamples_seeds_jointly_at_95_percent() -> None:
    # seed 0 passes from d = 10, seed 1 from d = 100: every joint resample is {0,0}, {0,1}/{1,0} or {1,1}
    ev = {(10, 0): 1.0, (10, 1): 0.0, (100, 0): 1.0, (100, 1): 1.0}
    res = analyze_d90(ev, 1.0, 0.9, n_bootstrap=2000)
    assert res.d90 == 100 and res.ci_level == 0.95 and res.n_bootstrap == 2000
    assert res.d90_interp == pytest.approx(10 ** 1.8)  # mean 0.5 at 10, 1.0 at 100: t = 0.8 in log d
    # draws (p): {0,0} (1/4) -> 10; mixed (1/2) -> 10^1.8; {1,1} (1/4, mean 0 at 10) -> 10^1.9.
    # Resampling each d on its own would also draw means 0.5 / 1.0 at d = 100 independently of d = 10.
    lo, hi = res.ci  # type: ignore[misc]
    assert lo == 10.0 and hi == pytest.approx(10 ** 1.9)


def test_unequal_seeds_average_what_exists_and_nan_fails() -> None:
    ev = pd.DataFrame({"d": [10, 100, 100, 100], "seed": [0, 0, 1, 2], "score": [0.95, 0.9, 0.9, float("nan")]})
    cr = threshold_crossing(ev, 0.9)
    assert cr.n_seeds == (1, 3) and cr.seeds == (0, 1, 2)
    assert cr.value == 10 and cr.means[1] == -math.inf  # a diverged seed makes d = 100 fail
    assert make_baseline([0.8, 1.0]).value == pytest.approx(0.9) and make_baseline(1.0).kind == "global"


def test_next_bisection_follows_find_d90() -> None:
    assert bisection_point(100, 1000) == 316
    assert next_bisection([10, 100, 1000], [0.1, 0.5, 0.95], 0.9, rtol=0.05) == 316
    assert next_bisection([10, 100, 1000], [0.95, 0.96, 0.97], 0.9, rtol=0.05) is None  # first point passes
    assert next_bisection([10, 100, 1000], [0.1, 0.2, 0.3], 0.9, rtol=0.05) is None  # nothing passes
    assert next_bisection([300, 316], [0.1, 0.95], 0.9, rtol=0.1) is None  # bracket narrower than rtol


def test_select_lr_compares_rates_on_shared_seeds_and_fails_diverged_seeds() -> None:
    from idlab.d90 import rate_baseline, rate_scores, select_lr

    # 1e-3 has seeds 0-2 (mean 0.80, 0.60 on seed 0); a one-seed probe at 1e-2 has 0.70 on seed 0
    probe = {1e-3: {0: 0.6, 1: 0.9, 2: 0.9}, 1e-2: {0: 0.7}}
    assert rate_scores(probe) == {1e-3: pytest.approx(0.6), 1e-2: pytest.approx(0.7)}
    assert select_lr(probe) == 1e-2
    # no seed shared by all: each rate's own mean
    assert select_lr({1e-3: {0: 0.6, 1: 0.9}, 1e-2: {2: 0.7}}) == 1e-3
    # a diverged seed is a failure, whatever the other seeds score
    failing = {1e-3: {0: 0.99, 1: math.nan}, 1e-4: {0: 0.5, 1: 0.5}}
    assert select_lr(failing) == 1e-4 and rate_scores(failing)[1e-3] == -math.inf
    assert rate_baseline(failing, 0.9) == make_baseline([0.5, 0.5], 0.9)
    assert rate_baseline({1e-3: {0: math.nan}}) is None and select_lr({}) is None
    # a tie goes to the smaller rate
    assert select_lr({1e-2: {0: 0.5}, 1e-3: {0: 0.5}}) == 1e-3
