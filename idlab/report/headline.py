"""The headline of a study's report (or of one setting group): the baseline, each method's crossing
(d90, r90, ...) and the same above the majority-class floor (`headline`), as markdown lines."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import pandas as pd

from idlab import methods
from idlab.report.tables import (
    Crossings,
    CurveCrossing,
    baseline,
    crossings,
    majority_floor,
    rule_text,
    selected_runs,
    thin_crossings,
)
from idlab.report.text import md_table
from idlab.training.convergence import unconverged_crossings


class AboveChance(NamedTuple):
    """The crossings for the target above the majority-class floor."""

    floor: float
    target: float
    found: Crossings


def _ci_text(res: CurveCrossing, fmt: str) -> str:
    """'[lo, hi]' of a bootstrap interval; 'not reached' for an end beyond the grid; '–' without one."""
    lo, hi = res.ci_low, res.ci_high
    if res.value is None or lo is None or hi is None:
        return "–"

    def one(v: float) -> str:
        return fmt.format(v) if math.isfinite(v) else "not reached"

    return f"[{one(lo)}, {one(hi)}]"



def _grid_text(res: CurveCrossing) -> str:
    """'1000 (1 seed), 10000 (3 seeds)': the grid searched with the runs behind each point."""
    return ", ".join(f"{int(x)} ({n} seed{'s' if n != 1 else ''})" for x, n in zip(res.grid, res.n_seeds))



def _crossing_rows(found: Crossings, rule: str, suffix: str = "") -> list[dict[str, Any]]:
    """Rows of the headline table: each method's crossing (d90, r90, ...) per variant, with the threshold
    rule of its target (`idlab.report.tables.rule_text`)."""
    rows = []
    for name, results in found.items():
        m = methods.get(name)
        fmt = "{:.0f}" if m.size_counts_parameters else "{:.2f}"
        for v, res in sorted(results.items()):
            # a size that counts parameters: that size plus the directly trained head; otherwise the
            # parameters of the selected cell at the grid value
            params = res.value_params if m.size_counts_parameters else res.params
            rows.append({"method": v, "quantity": f"{m.quantity}{suffix}", "grid value": res.value,
                         "interpolated": res.interp, f"{res.ci_level:.0%} interval (bootstrap over seeds)": _ci_text(res, fmt),
                         "trainable parameters": params, "grid searched (runs per point)": _grid_text(res),
                         "threshold rule": rule})
    return rows


def _unconverged(found: Crossings, runs: pd.DataFrame) -> list[str]:
    """`idlab.training.convergence.unconverged_crossings` with each method's size axis named."""
    out = []
    for name, results in found.items():
        key = methods.get(name).size_key or "size"
        mine = runs[runs["method"] == name]
        out += unconverged_crossings([(results, key)], mine.assign(**{key: mine["size"]}).to_dict("records"))
    return sorted(set(out))


class Headline(NamedTuple):
    """One setting group's baseline, its runs at their selected learning rate and the crossings."""

    base: dict[str, Any]
    sel_runs: pd.DataFrame
    found: Crossings
    chance: AboveChance | None


def compute_headline(runs: pd.DataFrame, cells: pd.DataFrame, meta: Mapping[str, Any], score: str) -> Headline:
    """Baseline, selected runs and crossings of ``runs`` (one setting group) and their ``cells``."""
    base = baseline(runs, meta, score)
    sel_runs = selected_runs(runs, cells)
    # each method's crossing on its size axis (d90 per subspace variant, r90 per LoRA target set, ...)
    found = crossings(sel_runs, cells, base.get("target"), score)
    # the same above the majority-class floor (when the published target is close to it)
    floor = majority_floor(runs)
    chance: AboveChance | None = None
    if floor is not None and base.get("value") is not None:
        t = floor + base["threshold"] * (base["value"] - floor)
        base["floor"] = floor
        chance = AboveChance(floor, t, crossings(sel_runs, cells, t, score))
    return Headline(base, sel_runs, found, chance)


def headline_lines(h: Headline) -> list[str]:
    """The headline's markdown: the baseline and target, the crossing table, its warnings."""
    base, found, chance, sel_runs = h.base, h.found, h.chance, h.sel_runs
    if base.get("value") is None:
        return [f"No baseline: {base['kind']}. d90 and r90 need full fine-tuning results "
                f"(or `target.baseline`); threshold rule {rule_text(base)}.", ""]
    rule = rule_text(base)
    pre = (f" Pretrained score {base['pretrained']:.4f} ({base['pretrained_kind']})."
           if base.get("rule") == "improvement" and base.get("pretrained") is not None else "")
    lines = [f"Baseline {base['value']:.4f} ({base['kind']}); target by the rule {rule} = "
             f"{base['target']:.4f}.{pre}", ""]
    rows = _crossing_rows(found, rule)
    if chance is not None:
        floor, t = chance.floor, chance.target
        lines += [f"Majority-class floor {floor:.4f} (always predicting the most frequent training class). "
                  + (f"**The {base['threshold']:.0%} target is at or below this floor: a model that ignores "
                     "its input meets it, so d90 / r90 by the published definition say nothing here.** "
                     if base["target"] <= floor else "")
                  + f"Rows marked 'above chance' use target = floor + {base['threshold']:.0%} x "
                  f"(baseline - floor) = {t:.4f}.", ""]
        rows += _crossing_rows(chance.found, f"above chance: floor + {base['threshold']:.0%} x (baseline - floor)",
                               " (above chance)")
    if not rows:
        return lines
    lines += [md_table(pd.DataFrame(rows)), "",
              "A grid value of – means the threshold was not reached on the grid. "
              "Interpolation is linear in log(d) / log(r) between the bracketing grid points.", ""]
    every = [*found.values(), *(chance.found.values() if chance is not None else ())]
    thin = [t for res in every for t in thin_crossings(res)]
    if thin:
        lines += ["**Warning: some crossings rest on fewer seeds than the rest of their curve:** "
                  + "; ".join(thin) + ". Run the missing seeds at that point before quoting them.", ""]
    unconv = sorted({*_unconverged(found, sel_runs),
                     *(_unconverged(chance.found, sel_runs) if chance is not None else ())})
    if unconv:
        lines += ["**Warning: some crossings rest on runs whose validation metric had not plateaued "
                  "(idlab.training.convergence):** " + "; ".join(unconv) + ". Train them longer "
                  "(`train.until: converged`) before quoting them.", ""]
    return lines


__all__ = ["AboveChance", "Headline", "compute_headline", "headline_lines"]
