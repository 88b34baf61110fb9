"""Published claims tested on a report's crossings, with their bootstrap intervals.

- Per study (`method_claims`): each method states the claims about its own crossings
  (`idlab.methods.base.Method.claims`; the subspace method: Aghajanyan et al.'s SAID <= DID).
- Across studies (`model_size_lines`): Aghajanyan et al. 2021 find that a larger pretrained model has
  a lower intrinsic dimension on the same task. Where a report holds the same task on two or more
  models, every crossing (d90 per subspace variant, r90 per LoRA target set, ...) is tabled per model
  by total parameter count, and the claim is tested between the smallest and the largest model with
  `idlab.d90.compare_crossings`. Two models of different families and pretraining differ in more than
  size; the text says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd

from idlab import methods
from idlab.d90 import compare_crossings, crossing_text
from idlab.report.headline import Headline
from idlab.report.tables import Crossings
from idlab.report.text import md_table


class StudyHeadline(NamedTuple):
    """One setting group's headline with what identifies its model and task."""

    study: str
    group: str
    model: str
    task: str
    total_parameters: int | None
    headline: Headline


def method_claims(found: Crossings) -> list[str]:
    """Every method's claims about its crossings in ``found`` (markdown lines, possibly none)."""
    out: list[str] = []
    for name, results in found.items():
        out += methods.get(name).claims({v: r.crossing for v, r in results.items()})
    return out


def model_size_lines(entries: Sequence[StudyHeadline]) -> list[str]:
    """The cross-model section (module docstring): a table per task with two or more models, and one
    verdict per crossing present on the smallest and the largest model. Empty when no task has two."""
    rows = [e for e in entries if e.total_parameters]
    lines: list[str] = []
    for task in sorted({e.task for e in rows}):
        mine = sorted((e for e in rows if e.task == task), key=lambda e: int(e.total_parameters or 0))
        if len({e.model for e in mine}) < 2:
            continue
        table = []
        for e in mine:
            for name, results in e.headline.found.items():
                for v, r in sorted(results.items()):
                    table.append({"model": e.model, "total parameters": f"{e.total_parameters:,}",
                                  "study": e.study + (f" ({e.group})" if e.group else ""), "curve": v,
                                  "quantity": methods.get(name).quantity,
                                  "crossing [95% interval]": crossing_text(r.crossing)})
        if not table:
            continue
        small, large = mine[0], mine[-1]
        lines += [f"### Across models on `{task}`", "",
                  "Aghajanyan et al. 2021: the larger pretrained model has the lower intrinsic dimension on the "
                  "same task. The models here differ in family, tokenizer and pretraining data as well as in "
                  "size, so a difference is not a size effect alone.", "", md_table(pd.DataFrame(table)), ""]
        for name, results in large.headline.found.items():
            for v, r in sorted(results.items()):
                other = small.headline.found.get(name, {}).get(v)
                if other is None:
                    continue
                verdict = compare_crossings(r.crossing, other.crossing)
                lines.append(f"- {v} {methods.get(name).quantity}: larger model {large.model} "
                             f"{crossing_text(r.crossing)} <= smaller {small.model} {crossing_text(other.crossing)}: "
                             f"{verdict}.")
        lines.append("")
    return lines


__all__ = ["StudyHeadline", "method_claims", "model_size_lines"]
