"""Two crossings side by side: which is lower, and whether their bootstrap intervals resolve it.

A published claim such as "SAID's d90 is at most DID's" (Aghajanyan et al. 2021) or "the larger
pretrained model has the lower d90" is tested here on two `Crossing` results of the one estimator
(`idlab.d90.estimator`). A crossing is read at its interpolated value (``interp``); a curve that
never reaches the target on its grid is "not reached" and counts as larger than any reached one.

`compare_crossings(a, b)` states whether a <= b holds, and how firmly:

- both reached: holds when a.interp <= b.interp; *resolved* when the 95% intervals do not overlap
  (a's upper end below b's lower end, or the reverse), else "within the seed spread";
- only a reached: holds (b did not reach the target on its grid); only b: does not hold;
  neither: undecided;
- without intervals (one seed) the verdict says so: a point estimate only.
"""

from __future__ import annotations

import math

from idlab.d90.estimator import Crossing


def crossing_text(c: Crossing, unit: str = "") -> str:
    """'2,362 [1,010, 5,120]' (interpolated crossing and its bootstrap interval), 'not reached (grid
    300-10,000)' without a crossing; ``unit`` is appended to the value ('2,362 d')."""
    if c.interp is None:
        grid = f"{min(c.grid):,.0f}-{max(c.grid):,.0f}" if c.grid else "empty grid"
        return f"not reached (grid {grid})"
    ci = ""
    if c.ci is not None:
        lo, hi = c.ci
        ci = " [" + ", ".join(f"{v:,.0f}" if math.isfinite(v) else "not reached" for v in (lo, hi)) + "]"
    return f"{c.interp:,.0f}{unit}{ci}"


def compare_crossings(a: Crossing, b: Crossing) -> str:
    """Whether crossing ``a`` <= crossing ``b`` (see the module docstring), as a short verdict."""
    if a.interp is None and b.interp is None:
        return "undecided (neither reaches the target on its grid)"
    if b.interp is None:
        return "**holds** (only the first reaches the target on its grid)"
    if a.interp is None:
        return "**does not hold** (only the second reaches the target on its grid)"
    holds = a.interp <= b.interp
    word = "**holds**" if holds else "**does not hold**"
    if a.ci is None or b.ci is None:
        return f"{word} on the point estimates (no bootstrap interval: one seed)"
    if a.ci[1] < b.ci[0] or b.ci[1] < a.ci[0]:
        return f"{word}, resolved (the {a.ci_level:.0%} intervals do not overlap)"
    return f"{word} on the point estimates, within the seed spread (the {a.ci_level:.0%} intervals overlap)"


__all__ = ["compare_crossings", "crossing_text"]
