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
- Executors: ``local`` (in-process), ``multigpu`` (one worker process per GPU,
  ``CUDA_VISIBLE_DEVICES`` set per worker, runs pulled from a shared queue),
  ``slurm`` (submitit job array, one run per task; ``slurm.backend=local|debug``
  uses submitit's LocalExecutor / DebugExecutor, for offline tests).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlab.config import StudyConfig, target_set_label, to_dict
from idlab.runs import RunStore, atomic_write_json, run_id

Run = tuple[str, dict[str, Any]]  # (run id, resolved run config)


# --------------------------------------------------------------------------- grid


def _base(study: StudyConfig, method: str, seed: int, lr: float) -> dict[str, Any]:
    model, task, train = to_dict(study.model), to_dict(study.task), to_dict(study.train)
    if train["until"] == "steps":  # the convergence fields only stop until=converged runs: recorded only
        for k in ("until", "patience", "tol", "plateau_window"):  # then, so that existing run ids stay valid
            train.pop(k)
    return {"model": model.pop("name"), "model_options": model, "task": task.pop("name"), "task_options": task,
            "train": train, "method": method, "seed": seed, "lr": lr}


def _subspace_cells(study: StudyConfig) -> list[dict[str, Any]]:
    s = study.subspace
    # fastfood_state changes speed and memory, not results: recorded only when not the default,
    # so that existing run ids stay valid
    state = {"fastfood_state": s.fastfood_state} if s.fastfood_state != "all" else {}
    return [
        {"projection": p, "said": said, "head": s.head, **(state if p == "fastfood" else {})}
        for p in s.projection
        for said in s.said
    ]


def run_score(result: dict[str, Any], score: str = "final") -> float | None:
    """Performance of a run: its final (or best) value of the task metric; None if unavailable."""
    metric = result.get("metric") or (result.get("task_info") or {}).get("metric", "accuracy")
    src = result.get("best" if score == "best" else "metrics") or {}
    v = src.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def baseline_value(study: StudyConfig, store: RunStore) -> float | None:
    """The d90 baseline: ``subspace.baseline`` if set, else the seed-mean of full FT at its best lr."""
    if study.subspace.baseline is not None:
        return study.subspace.baseline
    if "full" not in study.methods:
        return None
    best: float | None = None
    for lr in study.full.lr:
        scores = []
        for seed in study.seeds:
            res = store.result(run_id(_base(study, "full", seed, lr)))
            if res is None or res.get("status") != "ok":
                break
            sc = run_score(res, study.score)
            if sc is None:
                break
            scores.append(sc)
        else:
            m = _mean(scores)
            best = m if best is None else max(best, m)
    return best


def _refine_points(study: StudyConfig, store: RunStore, cell: dict[str, Any], grid: Sequence[int],
                   target: float) -> list[int]:
    """Bisection points for one subspace cell, derived from stored results only."""
    points: list[int] = []
    for _ in range(study.subspace.refine):
        perf: dict[int, float] = {}
        for d in sorted({*grid, *points}):
            best: float | None = None
            for lr in study.subspace.lr:
                scores = []
                for seed in study.seeds:
                    res = store.result(run_id({**_base(study, "subspace", seed, lr), **cell, "d": d}))
                    sc = run_score(res, study.score) if res and res.get("status") in ("ok", "diverged") else None
                    if res is None:
                        return points  # the previous stage is not complete yet
                    scores.append(sc if sc is not None else -math.inf)
                m = _mean(scores)
                best = m if best is None else max(best, m)
            perf[d] = best if best is not None else -math.inf
        ds = sorted(perf)
        hi = next((d for d in ds if perf[d] >= target), None)
        if hi is None or hi == ds[0]:
            break
        lo = max(d for d in ds if d < hi)
        mid = round(math.sqrt(lo * hi))
        if mid <= lo or mid >= hi or hi / lo < 1.2:
            break
        points.append(mid)
    return points


def expand(study: StudyConfig, store: RunStore | None = None) -> list[Run]:
    """Every run of the study (with ``d: auto`` refinement points from ``store``'s results), in order."""
    runs: list[Run] = []

    def add(cfg: dict[str, Any]) -> None:
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
                                add({**_base(study, "lora", seed, lr), "r": r, "target_modules": list(targets),
                                     "target_set": target_set_label(targets), "lora_alpha": lo.alpha_for(r),
                                     "use_rslora": rs, "lora_dropout": lo.dropout})
        elif method == "subspace":
            s = study.subspace
            grid = s.auto_grid() if s.d == "auto" else tuple(s.d)
            target = None
            if s.d == "auto" and store is not None:
                b = baseline_value(study, store)
                target = None if b is None else s.threshold * b
            for cell in _subspace_cells(study):
                ds = list(grid)
                if target is not None and store is not None:
                    ds += [d for d in _refine_points(study, store, cell, grid, target) if d not in ds]
                for d in ds:
                    for lr in s.lr:
                        for seed in study.seeds:
                            add({**_base(study, "subspace", seed, lr), **cell, "d": d})
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
        mine = [(rid, c) for rid, c in runs if c["method"] == method]
        if not mine:
            continue
        done = sum(store.is_done(rid, study.retry_failed) for rid, _ in mine)
        if method == "full":
            axes = f"lr {list(study.full.lr)}"
        elif method == "lora":
            axes = (f"r {list(study.lora.r)} x targets {[target_set_label(t) for t in study.lora.target_modules]}"
                    f" x rslora {list(study.lora.use_rslora)} x lr {list(study.lora.lr)}, alpha={study.lora.alpha}")
        else:
            ds = sorted({c['d'] for _, c in mine})
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


# --------------------------------------------------------------------------- one run


def run_one(study_dir: str, study_name: str, rid: str, run: dict[str, Any], device: str = "auto",
            retry_failed: bool = True, progress: bool = False) -> str:
    """Execute run ``rid`` and write it atomically, unless it is already complete. Returns its status.

    This is what every executor calls (in-process, per-GPU worker, Slurm array task).
    """
    from idlab.methods import execute_run

    store = RunStore(study_dir)
    done = store.result(rid)
    if done is not None and not (retry_failed and done.get("status") == "failed"):
        return str(done.get("status", "ok"))
    result, writer = execute_run(run, rid, study_name, device=device, progress=progress)
    try:
        store.write(rid, result, writer)
    except Exception as e:  # artifacts could not be written: record the failure instead
        import traceback

        result.update({"status": "failed", "error": f"writing artifacts: {type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()})
        store.write(rid, result, None)
    return str(result["status"])


# --------------------------------------------------------------------------- executors


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)


def _run_local(study: StudyConfig, pending: Sequence[Run]) -> None:
    bar = _progress(len(pending), f"{study.name} (local)")
    for rid, cfg in pending:
        bar.set_postfix_str(_short(cfg))
        status = run_one(str(study.study_dir()), study.name, rid, cfg, study.device, study.retry_failed,
                         study.progress)
        bar.update(1)
        if status != "ok":
            bar.write(f"run {rid} ({_short(cfg)}): {status}")
    bar.close()


def _short(cfg: dict[str, Any]) -> str:
    m = cfg["method"]
    extra = {"lora": lambda: f" r={cfg['r']} {cfg['target_set']}",
             "subspace": lambda: f" d={cfg['d']} {cfg['projection']}{' said' if cfg['said'] else ''}"}
    return f"{m}{extra.get(m, lambda: '')()} lr={cfg['lr']:g} seed={cfg['seed']}"


def _gpu_worker(gpu: int, study_dir: str, study_name: str, retry_failed: bool, queue: Any, done: Any,
                device: str = "cuda:0") -> None:
    """One worker process per GPU: pulls (run id, config) from ``queue`` until a None arrives."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch initialises CUDA in this process
    while True:
        item = queue.get()
        if item is None:
            return
        rid, cfg = item
        try:
            status = run_one(study_dir, study_name, rid, cfg, device, retry_failed)
        except Exception as e:  # pragma: no cover - run_one already records failures
            status = f"failed ({e})"
        done.put((rid, status))


def _run_multigpu(study: StudyConfig, pending: Sequence[Run]) -> None:
    import multiprocessing as mp

    gpus = list(study.gpus) if study.gpus is not None else None
    if gpus is None:
        import torch

        gpus = list(range(torch.cuda.device_count()))
    if not gpus:
        raise RuntimeError("executor=multigpu: no CUDA device visible; use executor=local or set gpus=[0,1,...]")
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    for item in pending:
        queue.put(item)
    for _ in gpus:
        queue.put(None)
    # device=cpu keeps the worker plumbing testable on machines without GPUs
    device = "cpu" if study.device == "cpu" else "cuda:0"
    procs = [ctx.Process(target=_gpu_worker, args=(g, str(study.study_dir()), study.name, study.retry_failed,
                                                    queue, done, device), daemon=False) for g in gpus]
    for p in procs:
        p.start()
    bar = _progress(len(pending), f"{study.name} ({len(gpus)} GPUs)")
    finished = 0
    try:
        while finished < len(pending):
            try:
                rid, status = done.get(timeout=5)
            except Exception:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            finished += 1
            bar.update(1)
            if status != "ok":
                bar.write(f"run {rid}: {status}")
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=10)


def _slurm_executor(study: StudyConfig) -> Any:
    import submitit

    s = study.slurm
    folder = Path(s.folder) if s.folder else study.study_dir() / "slurm" / "%j"
    ex: Any
    if s.backend == "debug":
        ex = submitit.DebugExecutor(folder=folder)
    elif s.backend == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=s.time_min)
    else:
        ex = submitit.AutoExecutor(folder=folder)
        params: dict[str, Any] = {"timeout_min": s.time_min, "gpus_per_node": s.gpus_per_node,
                                  "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb,
                                  "slurm_array_parallelism": s.array_parallelism, "name": f"idlab-{study.name}"}
        if s.partition:
            params["slurm_partition"] = s.partition
        extra = {k: v for k, v in (("account", s.account), ("qos", s.qos), ("constraint", s.constraint)) if v}
        if extra:
            params["slurm_additional_parameters"] = extra
        ex.update_parameters(**params)
    return ex


def _run_slurm(study: StudyConfig, pending: Sequence[Run]) -> None:
    ex = _slurm_executor(study)
    n = len(pending)
    sd = str(Path(study.study_dir()).resolve())
    jobs = ex.map_array(run_one, [sd] * n, [study.name] * n, [rid for rid, _ in pending],
                        [cfg for _, cfg in pending], ["auto"] * n, [study.retry_failed] * n)
    print(f"submitted {len(jobs)} array task(s) via submitit ({study.slurm.backend}); job ids "
          f"{jobs[0].job_id}..{jobs[-1].job_id}" if jobs else "nothing submitted", file=sys.stderr)
    bar = _progress(n, f"{study.name} (slurm)")
    for job, (rid, _) in zip(jobs, pending):
        try:
            job.result()
        except Exception as e:  # the array task crashed (time limit, node failure): the run stays missing
            bar.write(f"run {rid}: slurm task {job.job_id} failed: {type(e).__name__}: {str(e)[:300]}")
        bar.update(1)
    bar.close()


EXECUTORS = {"local": _run_local, "multigpu": _run_multigpu, "slurm": _run_slurm}


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

    Args:
        study: the validated study.
        dry_run: print the plan and stop.
        out: stream for the plan and summary (default stdout).
    """
    out = out or sys.stdout
    t0 = time.perf_counter()
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
            "runs": {rid: cfg for rid, cfg in runs}})
        pending = [(rid, cfg) for rid, cfg in runs if not store.is_done(rid, study.retry_failed)]
        if stage == 0 or pending:
            print(plan_table(study, runs, store), file=out, flush=True)
        if dry_run or not pending:
            break
        executor(study, pending)
        ran += len(pending)
    runs = expand(study, store)
    summary = SweepSummary(store.study_dir, len(runs), ran=ran)
    for rid, _ in runs:
        res = store.result(rid)
        if res is None:
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


def resolve_config_path(config: str) -> Path:
    """``auto`` -> gpu_study.yaml with CUDA, else cpu_study.yaml; a bare name -> experiments/configs/<name>.yaml."""
    roots = [Path.cwd() / "experiments" / "configs", Path(__file__).resolve().parents[1] / "experiments" / "configs"]
    if config == "auto":
        import torch

        config = "gpu_study" if torch.cuda.is_available() else "cpu_study"
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

    path = resolve_config_path(config)
    study = load_study(path, list(overrides))
    print(f"config {path}", flush=True)
    return run_sweep(study, dry_run=dry_run)


__all__ = ["SweepSummary", "baseline_value", "expand", "main_sweep", "plan_table", "resolve_config_path",
           "run_one", "run_score", "run_sweep"]
