"""``idlab sweep``: expand a study into runs, skip the finished ones, run the rest.

- Grid: methods x their axes x learning rates x seeds; each run's id is the
  stable hash of its resolved config (`idlab.runs.run_id`).
- Resumable: a run with a complete ``result.json`` is skipped (``failed`` ones are
  retried unless ``retry_failed=false``); leftovers of a killed sweep are removed
  at start once they are 10 minutes old. Kill it at any moment and start it again.
- Two sweeps may share a study: give each a disjoint slice of the grid by overrides
  (``methods=[subspace]`` in one, ``methods=[full,lora]`` in the other); every run
  is written atomically, and neither removes the other's run in progress.
- ``subspace.d: auto``: a log grid of d, then up to ``subspace.refine`` geometric
  bisection points inside the bracket where the seed-mean performance crosses
  ``threshold x baseline``. The refinement points are a function of the stored
  results only, so a restarted sweep recomputes the same ones.
- Executors: ``local`` (in-process), ``multigpu`` (one worker process per device the
  parent sees, each given the parent's own ``CUDA_VISIBLE_DEVICES`` entry -- index or
  UUID -- for its device; runs pulled from a shared queue), ``slurm`` (submitit job
  array, one run per task; ``slurm.backend=local|debug`` uses submitit's LocalExecutor /
  DebugExecutor, for offline tests; ``slurm.mem_gb`` defaults to `idlab.sweep.plan`'s figure).
- Device and precision (``device``, ``train.precision``, both ``auto`` by default) are
  resolved where the runs execute: checked up front for ``local`` / ``multigpu``
  (`preflight`, before anything is written), on each compute node for ``slurm``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlab.config import RunConfig, StudyConfig, target_set_label, to_dict
from idlab.d90 import Baseline, make_baseline, next_bisection, rate_baseline, rate_scores, select_lr
from idlab.runs import RunStore, atomic_write_json, run_id
from idlab.sweep.executors import EXECUTORS, preflight

Run = tuple[str, RunConfig]  # (run id, resolved run config)


# --------------------------------------------------------------------------- grid


def _base(study: StudyConfig, method: str, seed: int, lr: float, **axes: Any) -> RunConfig:
    """The run of ``method`` at ``axes`` with learning rate ``lr`` and ``seed``."""
    train = dataclasses.replace(study.train, lr=lr, seed=seed)
    return RunConfig(method=method, model=study.model, task=study.task, train=train,  # type: ignore[arg-type]
                     **axes)


def _subspace_cells(study: StudyConfig) -> list[dict[str, Any]]:
    s = study.subspace
    # layout and fastfood_state are Fastfood's only (RunConfig.to_dict records them when not the defaults)
    ff = {"layout": s.layout, "fastfood_state": s.fastfood_state}
    return [{"projection": p, "said": said, "head": s.head, **(ff if p == "fastfood" else {})}
            for p in s.projection for said in s.said]


def run_score(result: dict[str, Any], score: str = "final") -> float | None:
    """Performance of a run: its final (or best) value of the task metric; None if unavailable."""
    metric = result.get("metric") or (result.get("task_info") or {}).get("metric", "accuracy")
    src = result.get("best" if score == "best" else "metrics") or {}
    v = src.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


#: ``d: auto`` refinement stops once the bracket is this narrow, (hi - lo) / hi <= 1/6, i.e. hi / lo < 1.2
REFINE_RTOL = 1 / 6


def _rate_scores(study: StudyConfig, store: RunStore, method: str, lrs: Sequence[float],
                 **cell: Any) -> dict[float, dict[int, float]] | None:
    """``{lr: {seed: score}}`` of one cell from stored results, or None until every run is stored.

    A diverged or unscored run scores NaN (a failure, `idlab.d90.seed_mean`).
    """
    scores: dict[float, dict[int, float]] = {}
    for lr in lrs:
        for seed in study.seeds:
            res = store.result(run_id(_base(study, method, seed, lr, **cell)))
            if res is None:
                return None
            sc = run_score(res, study.score) if res.get("status") in ("ok", "diverged") else None
            scores.setdefault(lr, {})[seed] = math.nan if sc is None else sc
    return scores


def baseline_value(study: StudyConfig, store: RunStore) -> Baseline | None:
    """The d90 baseline: ``subspace.baseline`` if set, else full FT's seeds at its selected lr.

    Waits (None) until every full-FT run is stored, then applies the report's rule,
    `idlab.d90.rate_baseline` (`select_lr`), so the sweep and the report pick the same runs.
    """
    s = study.subspace
    if s.baseline is not None:
        return make_baseline(s.baseline, s.threshold)
    if "full" not in study.methods:
        return None
    scores = _rate_scores(study, store, "full", study.full.lr)
    return None if scores is None else rate_baseline(scores, s.threshold)


def _refine_points(study: StudyConfig, store: RunStore, cell: dict[str, Any], grid: Sequence[int],
                   target: float) -> list[int]:
    """Bisection points for one subspace cell (`idlab.d90.next_bisection`), from stored results only.

    The curve is the seed-mean (a diverged or unscored run a failure) at the best learning
    rate of each d; a stage waits until every run of the previous one is stored.
    """
    points: list[int] = []
    for _ in range(study.subspace.refine):
        ds = sorted({*grid, *points})
        means: list[float] = []
        for d in ds:
            scores = _rate_scores(study, store, "subspace", study.subspace.lr, **cell, d=d)
            if scores is None:
                return points  # the previous stage is not complete yet
            best = select_lr(scores)
            means.append(-math.inf if best is None else rate_scores(scores)[best])
        mid = next_bisection(ds, means, target, REFINE_RTOL)
        if mid is None:
            break
        points.append(mid)
    return points


def expand(study: StudyConfig, store: RunStore | None = None) -> list[Run]:
    """Every run of the study (with ``d: auto`` refinement points from ``store``'s results), in order."""
    runs: list[Run] = []

    def add(cfg: RunConfig) -> None:
        runs.append((run_id(cfg), cfg))

    for method in study.methods:
        if method == "full":
            for lr in study.full.lr:
                for seed in study.seeds:
                    add(_base(study, "full", seed, lr))
        elif method == "lora":
            lo = study.lora
            for targets in lo.target_modules:
                for r in lo.r:
                    for rs in lo.use_rslora:
                        for lr in lo.lr:
                            for seed in study.seeds:
                                add(_base(study, "lora", seed, lr, r=r, target_modules=tuple(targets),
                                          lora_alpha=lo.alpha_for(r), use_rslora=rs, lora_dropout=lo.dropout))
        elif method == "subspace":
            s = study.subspace
            grid = s.auto_grid() if s.d == "auto" else tuple(s.d)
            target = None
            if s.d == "auto" and store is not None:
                b = baseline_value(study, store)
                target = None if b is None else b.target
            for cell in _subspace_cells(study):
                ds = list(grid)
                if target is not None and store is not None:
                    ds += [d for d in _refine_points(study, store, cell, grid, target) if d not in ds]
                for d in ds:
                    for lr in s.lr:
                        for seed in study.seeds:
                            add(_base(study, "subspace", seed, lr, **cell, d=d))
    seen: set[str] = set()
    unique = []
    for rid, cfg in runs:
        if rid not in seen:
            seen.add(rid)
            unique.append((rid, cfg))
    return unique


def plan_table(study: StudyConfig, runs: Sequence[Run], store: RunStore) -> str:
    """A text table of what the sweep will run: per method, cells x lrs x seeds, done and to run."""
    rows = []
    for method in study.methods:
        mine = [(rid, c) for rid, c in runs if c.method == method]
        if not mine:
            continue
        done = sum(store.is_done(rid, study.retry_failed) for rid, _ in mine)
        if method == "full":
            axes = f"lr {list(study.full.lr)}"
        elif method == "lora":
            axes = (f"r {list(study.lora.r)} x targets {[target_set_label(t) for t in study.lora.target_modules]}"
                    f" x rslora {list(study.lora.use_rslora)} x lr {list(study.lora.lr)}, alpha={study.lora.alpha}")
        else:
            ds = sorted({c.d for _, c in mine if c.d is not None})
            axes = (f"d {ds}{' (auto)' if study.subspace.d == 'auto' else ''} x projection "
                    f"{list(study.subspace.projection)} x said {list(study.subspace.said)} x lr {list(study.subspace.lr)}"
                    f", head={study.subspace.head}")
        rows.append((method, len(mine), done, len(mine) - done, axes))
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"study {study.name!r}: model {study.model.name}, task {study.task.name}, seeds {list(study.seeds)}, "
             f"executor {study.executor}, results in {study.study_dir()}",
             f"{'method':<{w}}  {'runs':>5}  {'done':>5}  {'to run':>6}  axes"]
    for m, n, d, t, axes in rows:
        lines.append(f"{m:<{w}}  {n:>5}  {d:>5}  {t:>6}  {axes}")
    tot, dn = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{w}}  {tot:>5}  {dn:>5}  {tot - dn:>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


@dataclass
class SweepSummary:
    """What a sweep ended with."""

    study_dir: Path
    total: int
    ok: list[str] = field(default_factory=list)
    diverged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ran: int = 0
    wall_time_s: float = 0.0

    def text(self) -> str:
        """Human-readable summary listing diverged, failed and missing runs."""
        lines = [f"sweep finished in {self.wall_time_s:.1f}s: {self.total} runs, {len(self.ok)} ok, "
                 f"{len(self.diverged)} diverged, {len(self.failed)} failed, {len(self.missing)} missing "
                 f"({self.ran} run now); results in {self.study_dir}"]
        for label, items in (("diverged", self.diverged), ("failed", self.failed)):
            for rid, err in items:
                lines.append(f"  {label} {rid}: {err}")
        for rid in self.missing:
            lines.append(f"  missing {rid}")
        return "\n".join(lines)


def run_sweep(study: StudyConfig, dry_run: bool = False, out: Any = None) -> SweepSummary:
    """Run every missing run of ``study`` with its executor; return the summary.

    Raises:
        ConfigError: the study cannot run (`idlab.config.checks.check_study`); nothing is written.

    Args:
        study: the validated study.
        dry_run: print the plan and stop.
        out: stream for the plan and summary (default stdout).
    """
    from idlab.config.checks import check_study

    check_study(study)  # task, model/task fit, model files: before anything is written (ConfigError)
    out = out or sys.stdout
    t0 = time.perf_counter()
    resolved = preflight(study)  # before anything is written: a bad device / precision stops here
    print(resolved, file=out)
    store = RunStore(study.study_dir())
    removed = store.clean_stale()
    if removed:
        print(f"removed {len(removed)} leftover temp folder(s) of an interrupted sweep", file=out)
    executor = EXECUTORS[study.executor]
    ran = 0
    max_stages = 1 + (study.subspace.refine if study.subspace.d == "auto" else 0)
    for stage in range(max_stages):
        runs = expand(study, store)
        atomic_write_json(store.study_dir / "study.json", {
            "study": to_dict(study), "run_ids": [rid for rid, _ in runs],
            "runs": {rid: cfg.to_dict() for rid, cfg in runs}})
        pending = [(rid, cfg) for rid, cfg in runs if not store.is_done(rid, study.retry_failed)]
        if stage == 0 or pending:
            print(plan_table(study, runs, store), file=out, flush=True)
        for rid, _ in pending:
            _, problem = store.check(rid)
            if problem is not None:
                print(f"run {rid} is pending again: {problem}", file=out, flush=True)
        if dry_run or not pending:
            break
        executor(study, pending)
        ran += len(pending)
    runs = expand(study, store)
    summary = SweepSummary(store.study_dir, len(runs), ran=ran)
    for rid, _ in runs:
        res, problem = store.check(rid)
        if res is None or problem is not None:
            summary.missing.append(rid)
        elif res.get("status") == "ok":
            summary.ok.append(rid)
        elif res.get("status") == "diverged":
            summary.diverged.append((rid, str(res.get("error"))))
        else:
            summary.failed.append((rid, str(res.get("error"))))
    summary.wall_time_s = time.perf_counter() - t0
    if not dry_run:
        print(summary.text(), file=out, flush=True)
    return summary


def auto_config(overrides: Sequence[str] = ()) -> tuple[str, str]:
    """What ``CONFIG=auto`` means for runs that execute where the overrides send them: (name, why).

    ``gpu_study`` when this host has CUDA, or when ``executor=slurm`` sends the runs to nodes with
    ``slurm.gpus_per_node`` >= 1 (default 1) -- a login node without a GPU then still submits the
    GPU study; else ``cpu_study_converged`` (the CPU study trained until converged, 15 runs, about
    24 minutes on 2 cores).
    """
    import torch

    from idlab.config import SlurmConfig, parse_override

    given = dict(parse_override(o) for o in overrides)
    if torch.cuda.is_available():
        return "gpu_study", f"this host has {torch.cuda.device_count()} CUDA device(s)"
    gpus = given.get("slurm.gpus_per_node", SlurmConfig().gpus_per_node)
    if given.get("executor") == "slurm" and isinstance(gpus, int) and gpus >= 1:
        return "gpu_study", (f"executor=slurm with slurm.gpus_per_node={gpus}: the runs execute on GPU nodes "
                             "(this host has no CUDA device)")
    why = "no CUDA device on this host"
    if given.get("executor") == "slurm":
        why += f" and slurm.gpus_per_node={gpus}"
    return "cpu_study_converged", why


def resolve_config_path(config: str, overrides: Sequence[str] = ()) -> Path:
    """``auto`` -> `auto_config` (gpu_study or cpu_study_converged); a bare name -> ``<root>/<name>.yaml``.

    The roots are the study folder of the checkout the command runs in, ``./experiments/configs``,
    then the folders of ``$IDLAB_CONFIG_PATH`` (``os.pathsep``-separated); the library itself knows
    no path into ``experiments/``. A name found nowhere is returned as a path (the loader names it).
    """
    extra = [Path(x) for x in os.environ.get("IDLAB_CONFIG_PATH", "").split(os.pathsep) if x]
    roots = [Path.cwd() / "experiments" / "configs", *extra]
    if config == "auto":
        config = auto_config(overrides)[0]
    p = Path(config)
    if p.is_file():
        return p
    for root in roots:
        for cand in (root / config, root / f"{config}.yaml"):
            if cand.is_file():
                return cand
    return p  # load_study names the missing file


def main_sweep(config: str, overrides: Iterable[str], dry_run: bool = False) -> SweepSummary:
    """Load (with overrides), validate and run a study; the body of ``idlab sweep``."""
    from idlab.config import load_study
    from idlab.training.devices import cpu_torch_on_gpu_machine

    overrides = list(overrides)
    warning = cpu_torch_on_gpu_machine()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    path = resolve_config_path(config, overrides)
    study = load_study(path, overrides)
    why = f" (CONFIG=auto: {auto_config(overrides)[1]})" if config == "auto" else ""
    print(f"config {path}{why}", flush=True)
    return run_sweep(study, dry_run=dry_run)


__all__ = ["SweepSummary", "auto_config", "baseline_value", "expand", "main_sweep", "plan_table",
           "resolve_config_path", "run_score", "run_sweep"]
