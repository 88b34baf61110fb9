"""``idlab sweep``: expand a study into runs, skip the finished ones, run the rest.

- Resumable: a run with a complete ``result.json`` is skipped (``failed`` ones are
  retried unless ``retry_failed=false``); leftovers of a killed sweep are removed
  at start once they are 10 minutes old. Kill it at any moment and start it again.
- One experiment per study folder: the first sweep records the study's settings (model, task,
  train, target, score: not the grid, seeds or executor) in ``settings.json``; a sweep with other
  settings is refused before anything is written, unless ``allow_mixed`` (`idlab.sweep.settings`).
- Two sweeps may share a study: give each a disjoint slice of the grid by overrides
  (``methods=[subspace]`` in one, ``methods=[full,lora]`` in the other); every run
  is written atomically, and neither removes the other's run in progress.
- Stages: a method whose grid depends on stored results (``subspace.d: auto``) gets one
  expansion per stage (`idlab.sweep.grid.stages`).
- Executors (`idlab.sweep.executors`): ``local`` (in-process), ``multigpu`` (one worker process
  per visible device), ``slurm`` (submitit job array, one run per task).
- Device and precision (``device``, ``train.precision``, both ``auto`` by default) are
  resolved where the runs execute: checked up front for ``local`` / ``multigpu``
  (`preflight`, before anything is written), on each compute node for ``slurm``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idlab.config import StudyConfig, to_dict
from idlab.runs import RunStore, atomic_write_json
from idlab.sweep.executors import EXECUTORS, preflight
from idlab.sweep.grid import expand, plan_table, stages
from idlab.sweep.settings import check_settings, write_settings


@dataclass
class SweepSummary:
    """What a sweep ended with."""

    study_dir: Path
    total: int
    ok: list[str] = field(default_factory=list)
    diverged: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    #: (run id, who holds it): runs another live process is training (claimed elsewhere, not failed)
    pending: list[tuple[str, str]] = field(default_factory=list)
    ran: int = 0
    wall_time_s: float = 0.0
    detached: bool = False

    def text(self) -> str:
        """Human-readable summary listing diverged, failed and missing runs."""
        lines = [f"sweep finished in {self.wall_time_s:.1f}s: {self.total} runs, {len(self.ok)} ok, "
                 f"{len(self.diverged)} diverged, {len(self.failed)} failed, {len(self.missing)} missing "
                 + (f"+ {len(self.pending)} pending elsewhere " if self.pending else "")
                 + f"({self.ran} run now); results in {self.study_dir}"]
        for label, items in (("diverged", self.diverged), ("failed", self.failed)):
            for rid, err in items:
                lines.append(f"  {label} {rid}: {err}")
        for rid in self.missing:
            lines.append(f"  missing {rid}")
        for rid, who in self.pending:
            lines.append(f"  missing {rid}: pending, {who}")
        return "\n".join(lines)


def run_sweep(study: StudyConfig, dry_run: bool = False, out: Any = None, allow_mixed: bool = False,
              detach: bool = False) -> SweepSummary:
    """Run every missing run of ``study`` with its executor; return the summary.

    Raises:
        ConfigError: the study cannot run (`idlab.config.checks.check_study`), or its folder holds
            runs with other settings (`idlab.sweep.settings.check_settings`); nothing is written.

    Args:
        study: the validated study.
        dry_run: print the plan and stop (the settings are checked, not recorded).
        out: stream for the plan and summary (default stdout).
        allow_mixed: add runs whose settings (model, task, train, target, ...) differ from those the
            study folder records (``idlab sweep --allow-mixed``); the folder then records both.
        detach: executor=slurm only: submit (stage 0 of a staged study) and return without waiting.
    """
    from idlab.config import ConfigError
    from idlab.config.checks import check_study
    from idlab.sweep.checks import check_runs

    check_study(study)  # task, model/task fit, model files: before anything is written (ConfigError)
    check_runs(study)  # the hub, the model type, each method against the model's shapes (meta): once per study
    to_record = check_settings(study, allow_mixed)  # one experiment per folder (ConfigError)
    out = out or sys.stdout
    t0 = time.perf_counter()
    resolved = preflight(study)  # before anything is written: a bad device / precision stops here
    print(resolved, file=out)
    if study.eval.tasks and not dry_run:
        from idlab.sweep.lmeval import check_study_eval

        check_study_eval(study)  # lm-eval installed, every task known: before anything is written
    if detach and study.executor != "slurm":
        raise ConfigError(f"--detach needs executor=slurm (got executor={study.executor})")
    if study.executor == "slurm" and not dry_run:  # sbatch --test-only before anything is written
        from idlab.sweep.slurm import check_request

        check_request(study, expand(study))
    store = RunStore(study.study_dir())
    store.check_writable()  # NotWritableError (a ConfigError): one line naming the folder, nothing written
    # every check passed: the first file written is the study's settings record
    if to_record is not None and not dry_run:
        path = write_settings(study.study_dir(), to_record)
        if len(to_record) > 1:
            print(f"{path} records {len(to_record)} setting sets (--allow-mixed): the report keeps them apart",
                  file=out)
    removed = store.clean_stale()
    if removed:
        print(f"removed {len(removed)} leftover temp folder(s) of an interrupted sweep", file=out)
    executor = EXECUTORS[study.executor]
    ran = 0
    for stage in range(stages(study)):
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
        if detach:
            from idlab.sweep.slurm_jobs import run_slurm

            run_slurm(study, pending, detach=True)
            ran += len(pending)
            if stages(study) > 1:
                print(f"--detach submitted stage 1 of {stages(study)} only: the refinement stages (d: auto) depend "
                      f"on these results and need the driver; once they finish run the same `idlab sweep` "
                      f"command again (without --detach, or with it once per stage)", file=out, flush=True)
            break
        executor(study, pending)
        ran += len(pending)
    runs = expand(study, store)
    summary = SweepSummary(store.study_dir, len(runs), ran=ran)
    for rid, _ in runs:
        res, problem = store.check(rid)
        holder = store.live_claim(rid) if res is None or problem is not None or res.status == "failed" else None
        if holder is not None:
            summary.pending.append((rid, f"claimed elsewhere by {holder.describe()}"))
        elif res is None or problem is not None:
            summary.missing.append(rid)
        elif res.status == "ok":
            summary.ok.append(rid)
        elif res.status == "diverged":
            summary.diverged.append((rid, str(res.error)))
        else:
            summary.failed.append((rid, str(res.error)))
    if study.eval.tasks and not dry_run and summary.ok:
        if study.executor == "slurm":
            print(f"eval: executor=slurm trains on the nodes; score the runs where a device is: `idlab eval "
                  f"{store.study_dir}/runs/* --tasks {','.join(study.eval.tasks)}`", file=out, flush=True)
        else:
            from idlab.sweep.lmeval import evaluate_study

            evaluate_study(study, [store.run_dir(rid) for rid in summary.ok],
                           log=lambda line: print(line, file=out, flush=True))
    summary.wall_time_s = time.perf_counter() - t0
    summary.detached = detach
    if detach:
        print(f"detached: {len(summary.ok)} of {summary.total} runs done, {len(summary.missing)} submitted or "
              f"pending; `idlab status {store.study_dir}` shows them, the same `idlab sweep` command collects",
              file=out, flush=True)
    elif not dry_run:
        print(summary.text(), file=out, flush=True)
    return summary


def auto_config(overrides: Sequence[str] = ()) -> tuple[str, str]:
    """What ``CONFIG=auto`` means for runs that execute where the overrides send them: (name, why).

    ``gpu_study`` when this host has CUDA, or when ``executor=slurm`` sends the runs to nodes with
    ``slurm.gpus_per_node`` >= 1 or null (the default) and no ``device=cpu`` -- a login node without a GPU then still submits the
    GPU study; else ``cpu_study_converged`` (the CPU study trained until converged, 15 runs, about
    24 minutes on 2 cores).
    """
    import torch

    from idlab.config import SlurmConfig, parse_override

    given = dict(parse_override(o) for o in overrides)
    if torch.cuda.is_available():
        return "gpu_study", f"this host has {torch.cuda.device_count()} CUDA device(s)"
    gpus = given.get("slurm.gpus_per_node", SlurmConfig().gpus_per_node)
    if given.get("executor") == "slurm" and given.get("device") != "cpu" and (gpus is None or
                                                                             (isinstance(gpus, int) and gpus >= 1)):
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


__all__ = ["SweepSummary", "auto_config", "resolve_config_path", "run_sweep"]
