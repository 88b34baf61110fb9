"""Whether a training run has converged: one stated rule, used by the loop and the report.

A run's evaluations form a curve ``(step_k, m_k)``, k = 1..K, of the task's
validation metric m (sign s = +1 when higher is better, -1 otherwise). Two tests:

* **Plateau** (recorded for every run): with the last evaluated step T and the
  window start t0 = (1 - window) * T, the run has plateaued when the best value
  inside the window improves on the best value up to t0 by less than ``tol``::

      gain = max_{step_k > t0} s * m_k  -  max_{step_k <= t0} s * m_k  <  tol

  (the window must hold at least one evaluation and so must the part before it;
  otherwise the curve is too short to tell and the run counts as not converged).
* **Patience** (the early stop of ``until: converged``): stop once the last
  ``patience`` evaluations all failed to beat the best earlier value by at least
  ``tol``. A run stopped this way counts as converged.

``tol`` is absolute, in the metric's own units (0.002 accuracy = 0.2 points).
`unconverged_points` marks the (method, axis value) points of a study whose runs
did not converge, the way `idlab.report.thin_crossings` marks thin seeds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from idlab.jsontypes import JsonObject, as_float, as_int
from idlab.options import doc

Until = Literal["steps", "converged"]




@dataclass(frozen=True)
class ConvergenceRule:
    """The convergence rule (see the module docstring for the equations)."""

    tol: float = field(default=0.002, metadata=doc("smallest improvement of the metric that counts (absolute)"))
    window: float = field(default=0.2, metadata=doc("plateau window: the last fraction of the evaluated steps"))
    patience: int | None = field(
        default=3, metadata=doc("early stop after this many evaluations without a tol improvement (None: off)")
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"ConvergenceRule.tol must be a finite number >= 0, got {self.tol}; use e.g. 0.002")
        if not 0 < self.window < 1:
            raise ValueError(f"ConvergenceRule.window must be in (0, 1), got {self.window}; use e.g. 0.2")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"ConvergenceRule.patience must be >= 1 or None, got {self.patience}")


@dataclass(frozen=True)
class Convergence:
    """Verdict of `check_convergence` on one curve (JSON-able through ``to_dict``).

    Attributes:
        converged: plateaued, or stopped early by patience.
        reason: one line saying why.
        gain: the plateau window's improvement (in the metric's units, sign-adjusted so
            that positive = better), None when the curve is too short to tell.
        early_stopped: the loop stopped on patience before its cap.
        rule: the rule's fields.
    """

    converged: bool
    reason: str
    gain: float | None
    early_stopped: bool
    rule: dict[str, Any]

    def to_dict(self) -> JsonObject:
        return asdict(self)


def _points(curve: Sequence[Mapping[str, float]], metric: str) -> list[tuple[float, float]]:
    """(step, value) of the evaluations in ``curve`` that hold a finite ``metric``."""
    out = []
    for row in curve:
        v = row.get(metric)
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append((float(row["step"]), v))
    return out


def plateau_gain(
    curve: Sequence[Mapping[str, float]], metric: str, higher_is_better: bool = True, window: float = 0.2
) -> float | None:
    """``gain`` of the plateau test: best in the last ``window`` of steps minus best before it.

    Args:
        curve: `TrainResult.curve` rows (``step`` and the metric; rows without it are skipped).
        metric: the key of the validation metric.
        higher_is_better: sign of the metric.
        window: fraction of the last evaluated step that forms the window.

    Returns:
        The gain (positive = the window improved), or None when the window or the part
        before it holds no evaluation.
    """
    pts = _points(curve, metric)
    if not pts:
        return None
    s = 1.0 if higher_is_better else -1.0
    t0 = (1.0 - window) * pts[-1][0]
    before = [s * v for t, v in pts if t <= t0]
    inside = [s * v for t, v in pts if t > t0]
    if not before or not inside:
        return None
    return max(inside) - max(before)


def patience_exhausted(
    curve: Sequence[Mapping[str, float]], metric: str, higher_is_better: bool, rule: ConvergenceRule
) -> bool:
    """True when the last ``rule.patience`` evaluations all missed ``best_before + tol``."""
    if rule.patience is None:
        return False
    s = 1.0 if higher_is_better else -1.0
    vals = [s * v for _, v in _points(curve, metric)]
    if len(vals) <= rule.patience:
        return False
    best_before = max(vals[: -rule.patience])
    return all(v < best_before + rule.tol for v in vals[-rule.patience :])


def check_convergence(
    curve: Sequence[Mapping[str, float]],
    metric: str,
    higher_is_better: bool = True,
    rule: ConvergenceRule | None = None,
    *,
    early_stopped: bool = False,
) -> Convergence:
    """Apply the rule to a finished run's curve.

    Args:
        curve: `TrainResult.curve`.
        metric: the task's validation metric key.
        higher_is_better: its sign.
        rule: the rule (default ``ConvergenceRule()``).
        early_stopped: the loop stopped on patience (counts as converged).

    Returns:
        A `Convergence`.
    """
    rule = rule or ConvergenceRule()
    gain = plateau_gain(curve, metric, higher_is_better, rule.window)
    if early_stopped:
        reason = f"stopped early: {rule.patience} evaluations without a {rule.tol:g} improvement"
        return Convergence(True, reason, gain, True, asdict(rule))
    if gain is None:
        n = len(_points(curve, metric))
        reason = f"too few evaluations ({n}) to tell: evaluate more often (eval_every)"
        return Convergence(False, reason, None, False, asdict(rule))
    ok = gain < rule.tol
    verb = "plateaued" if ok else "still improving"
    reason = f"{verb}: the last {rule.window:.0%} of steps improved {metric} by {gain:.4g} (tol {rule.tol:g})"
    return Convergence(ok, reason, gain, False, asdict(rule))


def validate_until(until: str, cap_steps: int | None, epochs: float | None, eval_every: int | None) -> None:
    """Check the ``until`` settings of a `idlab.training.loop.TrainConfig`.

    ``until="converged"`` needs a finite cap (``steps``, or ``epochs``) and ``eval_every``
    (the stop check runs after each evaluation).

    Raises:
        ValueError: an unknown ``until``, no cap, or no evaluation schedule, naming the fix.
    """
    if until not in ("steps", "converged"):
        raise ValueError(f"until={until!r} is unknown; use 'steps' or 'converged'")
    if until != "converged":
        return
    if cap_steps is None and (epochs is None or not math.isfinite(epochs)):
        raise ValueError(
            f"until='converged' needs a step cap: set steps or a finite epochs (got steps=None, epochs={epochs})"
        )
    if not eval_every:
        raise ValueError(
            "until='converged' checks the rule after each evaluation: set eval_every (e.g. the steps of one epoch)"
        )


class _Record(Protocol):
    converged: bool | None
    extra: Mapping[str, object]


def run_converged(record: _Record | Mapping[str, object]) -> bool | None:
    """The ``converged`` flag of a run record (a `idlab.runs.RunResult`, or a mapping: a result.json
    or a row), at top level or under ``train`` / ``result`` (li2018 records); None if absent."""
    if not isinstance(record, Mapping):  # a RunResult (this layer does not import idlab.runs)
        if record.converged is not None:
            return record.converged
        record = record.extra
    for src in (record, record.get("train") or {}, record.get("result") or {}):
        if isinstance(src, Mapping) and _flag(src.get("converged")) is not None:
            return _flag(src["converged"])
    return None


def unconverged_points(
    rows: Iterable[Mapping[str, object]], *, method_key: str = "method", axis_key: str = "axis_value"
) -> dict[tuple[str, object], list[int]]:
    """Points of a study resting on runs that did not converge.

    Args:
        rows: run records (each with ``method_key``, ``axis_key``, optional ``seed`` and a
            ``converged`` flag at top level or under ``train``/``result``).

    Returns:
        ``{(method, axis value): [seeds whose run did not converge]}`` for every point with
        at least one such run; runs without a flag (older results) are not counted.
    """
    out: dict[tuple[str, object], list[int]] = {}
    for r in rows:
        if run_converged(r) is False:
            out.setdefault((str(r.get(method_key)), r.get(axis_key)), []).append(as_int(r.get("seed", -1)))
    return {k: sorted(v) for k, v in out.items()}


def mark_unconverged(value: object, point: tuple[str, object], flagged: Mapping[tuple[str, object], list[int]]) -> str:
    """``value`` as text, with a trailing ``†`` when ``point`` rests on an unconverged run."""
    text = str(value)
    return f"{text} †" if point in flagged else text


def _flag(value: object) -> bool | None:
    """A converged flag as True / False, or None when absent (None, NaN, pandas NA)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return bool(value)
    except TypeError:  # pandas NA
        return None


def _number(value: object) -> float | None:
    """A grid value as float, or None when absent (None, NaN, pandas NA)."""
    try:
        x = as_float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


class GridCrossing(Protocol):
    """What `unconverged_crossings` reads of a crossing (`idlab.report.tables.CurveCrossing` has it)."""

    @property
    def value(self) -> float | None: ...

    @property
    def grid(self) -> Sequence[float]: ...


class GridCrossingDict(TypedDict, total=False):
    """A crossing given as a mapping (the keys `GridCrossing` has as attributes)."""

    value: float | None
    grid: Sequence[float]


def unconverged_crossings(
    crossings: Sequence[tuple[Mapping[str, GridCrossing | GridCrossingDict], str]],
    rows: Iterable[Mapping[Hashable, object]],
) -> list[str]:
    """d90 / r90 values resting on runs that did not converge (the report's warning lines).

    A crossing rests on the runs at its grid value and at the grid point just below it
    (the interpolation bracket). The counterpart of `idlab.report.thin_crossings` for seeds.

    Args:
        crossings: ``[(results, axis)]``, ``results = {variant: crossing}`` with ``value`` (grid
            value or None) and ``grid`` (axis values searched): the `idlab.report.tables.CurveCrossing`
            of `idlab.report.threshold_crossing` (or a mapping with those keys); ``axis`` = ``"d"``
            (d90) or ``"r"`` (r90).
        rows: run rows with ``variant``, the axis column, ``seed`` and ``converged`` (True /
            False / None = not recorded, not counted).

    Returns:
        One line per flagged variant, e.g. ``"SAID: d=8000 seeds [0, 2] unconverged"``, sorted.
    """
    rows = list(rows)
    out: set[str] = set()
    for results, axis in crossings:
        for v, res in results.items():
            value, grid = (res.get("value"), res.get("grid", ())) if isinstance(res, Mapping) else (res.value, res.grid)
            if value is None:
                continue
            below = [g for g in grid if g < value]
            points = {float(value), *([float(max(below))] if below else [])}
            bad: dict[float, list[int]] = {}
            for r in rows:
                x = _number(r.get(axis))
                if r.get("variant") != v or x not in points or _flag(r.get("converged")) is not False:
                    continue
                bad.setdefault(x, []).append(as_int(r.get("seed", -1)))
            if bad:
                out.add(f"{v}: " + ", ".join(f"{axis}={x:g} seeds {sorted(s)} unconverged" for x, s in sorted(bad.items())))
    return sorted(out)


UNCONVERGED_NOTE = "† rests on at least one run whose validation metric had not plateaued (idlab.training.convergence)"
