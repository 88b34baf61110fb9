"""d90: the smallest subspace dimension reaching 90% of the baseline (Li et al. 2018).

This module is the one owner of the d90 / r90 estimator (docs/SCIENCE.md section 1): the
threshold and baseline (`make_baseline`), the crossing (`threshold_crossing`), the
bootstrap interval, and the adaptive search (`find_d90`). The report (r90 uses the same
crossing over LoRA rank r), the sweep's ``d: auto`` refinement (`next_bisection`) and
``experiments/li2018.py`` all call it, so the same runs give the same d90 everywhere.

Definitions (scores are higher-is-better; x = d, or the LoRA rank r for r90):

- target (`make_target`, by the study's rule): "fraction" (Li's rule, the default) target =
  threshold * baseline; "improvement" target = pretrained + threshold * (baseline - pretrained),
  that fraction of full fine-tuning's gain over the pretrained model (for a loss L = -score:
  L_pre - threshold (L_pre - L_full)). baseline = a fixed value ("global", e.g. 1.0 on MNIST)
  or the mean of direct-training scores ("local", full fine-tuning).
- A cell's learning rate (`select_lr`): rates are ranked by `seed_mean` over the seeds they
  all share (each rate's own seeds when none is shared); the local baseline is the seeds of
  the full-FT rate so selected (`rate_baseline`). The sweep and the report both use it.
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

from idlab.d90.compare import compare_crossings, crossing_text
from idlab.d90.estimator import (
    TARGET_RULES,
    Baseline,
    Crossing,
    D90Result,
    TargetRule,
    analyze_d90,
    bisection_point,
    crossing,
    interpolate_log,
    make_baseline,
    make_target,
    next_bisection,
    rate_baseline,
    rate_scores,
    seed_mean,
    select_lr,
    threshold_crossing,
)
from idlab.d90.search import find_d90

__all__ = [
    "TARGET_RULES",
    "Baseline",
    "Crossing",
    "D90Result",
    "TargetRule",
    "analyze_d90",
    "bisection_point",
    "compare_crossings",
    "crossing",
    "crossing_text",
    "find_d90",
    "interpolate_log",
    "make_baseline",
    "make_target",
    "next_bisection",
    "rate_baseline",
    "rate_scores",
    "seed_mean",
    "select_lr",
    "threshold_crossing",
]
