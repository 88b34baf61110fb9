"""The grid of a study: methods x their cells x learning rates x seeds -> `RunConfig` per run.

Each method gives its cells (`idlab.methods.Method.cells`); a method whose grid depends on
stored results (``subspace.d: auto`` refines near the d90 crossing) reads them through a
`idlab.methods.GridContext`, so the points are a function of the stored results only and a
restarted sweep recomputes the same ones. Each run's id is the stable hash of its resolved
config (`idlab.runs.run_id`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from idlab import methods
from idlab.config import RunConfig, StudyConfig
from idlab.d90 import Baseline, make_target, rate_baseline
from idlab.methods import Axes, CellScores, GridContext
from idlab.runs import RunStore, run_id

Run = tuple[str, RunConfig]  # (run id, resolved run config)


def run_config(study: StudyConfig, method: str, axes: Axes, lr: float, seed: int) -> RunConfig:
    """The run of ``method`` at ``axes`` with learning rate ``lr`` and ``seed``."""
    train = dataclasses.replace(study.train, lr=lr, seed=seed)
    return RunConfig(method=method, model=study.model, task=study.task, train=train, axes=axes)


def cell_scores(study: StudyConfig, store: RunStore, method: str, axes: Axes,
                lrs: Sequence[float]) -> CellScores | None:
    """``{lr: {seed: score}}`` of one cell from stored results, or None until every run is stored.

    A diverged or unscored run scores NaN (a failure, `idlab.d90.seed_mean`).
    """
    scores: CellScores = {}
    for lr in lrs:
        for seed in study.seeds:
            res = store.result(run_id(run_config(study, method, axes, lr, seed)))
            if res is None:
                return None
            sc = res.score(study.score) if res.status in ("ok", "diverged") else None
            scores.setdefault(lr, {})[seed] = math.nan if sc is None else sc
    return scores


def _pretrained(study: StudyConfig, store: RunStore) -> float | None:
    """``target.pretrained``, else the mean over seeds of the baseline method's step-0 evaluation (the report's
    rule, `idlab.report.tables.pretrained_score`); None without either."""
    if study.target.pretrained is not None:
        return study.target.pretrained
    base = methods.baseline_method()
    if base.name not in study.methods:
        return None
    settings = study.settings(base.name)
    (cell,) = base.cells(settings)
    by_seed: dict[int, list[float]] = {}
    for lr in base.learning_rates(settings):
        for seed in study.seeds:
            res = store.result(run_id(run_config(study, base.name, cell, lr, seed)))
            v = None if res is None else next((pt.get(res.metric) for pt in res.curve if pt.get("step") == 0), None)
            if v is not None:
                by_seed.setdefault(seed, []).append(float(v))
    return sum(sum(v) / len(v) for v in by_seed.values()) / len(by_seed) if by_seed else None


def baseline_value(study: StudyConfig, store: RunStore) -> Baseline | None:
    """The crossing baseline: ``target.baseline`` if set, else the baseline method's seeds at its
    selected learning rate (`idlab.d90.rate_baseline`, the report's rule); its target by ``target.rule``.
    None until all are stored, or when the rule cannot be applied (no pretrained score, no gain over it)."""
    t = study.target
    pre = _pretrained(study, store) if t.rule == "improvement" else None
    try:
        if t.baseline is not None:
            return make_target(t.baseline, t.threshold, rule=t.rule, pretrained=pre)
        base = methods.baseline_method()
        if base.name not in study.methods:
            return None
        settings = study.settings(base.name)
        (cell,) = base.cells(settings)
        scores = cell_scores(study, store, base.name, cell, base.learning_rates(settings))
        return None if scores is None else rate_baseline(scores, t.threshold, rule=t.rule, pretrained=pre)
    except ValueError:
        return None


def _context(study: StudyConfig, store: RunStore, method: str) -> GridContext:
    def target() -> float | None:
        b = baseline_value(study, store)
        return None if b is None else b.target

    return GridContext(target=target,
                       scores=lambda axes, lrs: cell_scores(study, store, method, axes, lrs))


def expand(study: StudyConfig, store: RunStore | None = None) -> list[Run]:
    """Every run of the study (with refinement points from ``store``'s results), in order."""
    runs: list[Run] = []
    seen: set[str] = set()
    for name in study.methods:
        m = methods.get(name)
        settings = study.settings(name)
        ctx = _context(study, store, name) if store is not None else None
        for axes in m.cells(settings, ctx):
            for lr in m.learning_rates_for(settings, axes):
                for seed in study.seeds:
                    cfg = run_config(study, name, axes, lr, seed)
                    rid = run_id(cfg)
                    if rid not in seen:
                        seen.add(rid)
                        runs.append((rid, cfg))
    return runs


def stages(study: StudyConfig) -> int:
    """How many times the sweep expands the grid (the most any of its methods needs)."""
    return max(methods.get(n).stages(study.settings(n)) for n in study.methods)


def plan_table(study: StudyConfig, runs: Sequence[Run], store: RunStore) -> str:
    """A text table of what the sweep will run: per method, cells x lrs x seeds, done and to run."""
    rows = []
    for name in study.methods:
        mine = [(rid, c) for rid, c in runs if c.method == name]
        if not mine:
            continue
        done = sum(store.is_done(rid, study.retry_failed) for rid, _ in mine)
        axes = methods.get(name).describe(study.settings(name), [c.axes for _, c in mine])
        rows.append((name, len(mine), done, len(mine) - done, axes))
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"study {study.name!r}: model {study.model.name}, task {study.task.name}, seeds {list(study.seeds)}, "
             f"executor {study.executor}, results in {study.study_dir()}",
             f"{'method':<{w}}  {'runs':>5}  {'done':>5}  {'to run':>6}  axes"]
    for m, n, d, t, axes in rows:
        lines.append(f"{m:<{w}}  {n:>5}  {d:>5}  {t:>6}  {axes}")
    tot, dn = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{w}}  {tot:>5}  {dn:>5}  {tot - dn:>6}")
    return "\n".join(lines)


__all__ = ["Run", "baseline_value", "cell_scores", "expand", "plan_table", "run_config", "stages"]
