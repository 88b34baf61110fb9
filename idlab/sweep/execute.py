"""One run from its config to its folder: build, wrap for its method, train, read out Delta W
(`execute_run`, never raises), and write it atomically unless done (`run_one`, what every
executor calls: in-process, per-GPU worker, Slurm array task). `run_one` claims the run first
(`idlab.runs.claims`): a run another live process holds is skipped with status `CLAIMED`.

A failure becomes ``status: failed`` with the traceback, a NaN/inf loss ``status: diverged``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from idlab import methods
from idlab.config.run import RunConfig
from idlab.runs import RunResult, RunStore
from idlab.runs.claims import CLAIMED, Claim
from idlab.sweep.build import build_task_and_model


def environment() -> dict[str, Any]:
    """Host, versions and git commit recorded with every result."""
    from idlab.runs import git_commit, package_versions

    return {"versions": package_versions(), "git_commit": git_commit(), "hostname": platform.node(),
            "python": platform.python_version(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def execute_run(run: RunConfig, rid: str, study: str, device: str = "auto",
                progress: bool = False, study_dir: Path | None = None,
                ) -> tuple[RunResult, Callable[[Path], None] | None]:
    """Build, train and extract one run. Never raises.

    With ``train.checkpoint_every`` and the ``study_dir`` the loop saves its state in the run's
    `RunStore.checkpoint_dir` and resumes from it (``result.json["resumed_from"]``: the step);
    ``train.log_to`` streams to the trackers (TensorBoard under ``<study_dir>/tensorboard/<run_id>/``). Under
    torchrun every rank calls this; only rank 0 extracts Delta W (``write_artifacts`` is None on the others).

    The method's one-time `Method.warm_up` (the subspace kernel's first build) runs before the
    clock starts, so it is not in ``wall_time_s``.

    Returns:
        ``(result, write_artifacts)``: the run's `RunResult` (status ok | diverged | failed)
        and a function writing the artifacts (delta.safetensors, adapter/ or
        subspace.safetensors) into a folder, or None when there are none.
    """
    from idlab.data.instruct import GENERATIONS_FILE, write_generations
    from idlab.deltas import save_deltas
    from idlab.training.checkpoint import CheckpointSpec
    from idlab.training.distributed import env_rank
    from idlab.training.loop import train
    from idlab.training.tracking import TrackSpec

    try:  # one-time work (the C++ kernel's first build, ~30 s) stays out of the run's wall time
        methods.get(run.method).warm_up(run.axes)
    except Exception:  # prepare meets the same error and records the run as failed
        pass
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {"run_id": rid, "study": study, "config": run.to_dict(), "started_at": started,
                              **environment()}
    try:
        task, model = build_task_and_model(run)
        total = sum(p.numel() for p in model.parameters())
        method = methods.get(run.method)
        prep = method.prepare(model, run.axes, run.seed)
        cfg = dataclasses.replace(run.train, device=device, progress=progress)
        every, every_min = run.train.checkpoint_every, run.train.checkpoint_every_min
        folder = Path(study_dir) if study_dir is not None else None
        spec = (CheckpointSpec(RunStore(folder).checkpoint_dir(rid), rid, every, every_min)
                if (every or every_min) and folder else None)
        track = TrackSpec(tuple(run.train.log_to), study, rid, (folder or Path(".")) / "tensorboard", run.to_dict())
        res = train(prep.model, task, cfg, desc=f"{rid} {run.method}", checkpoint=spec, shardable=method.shardable,
                    tracking=track)
        status = "diverged" if res.diverged else "ok"
        result.update({
            "status": status, "error": res.error, "metrics": res.metrics, "best": res.best, "curve": res.curve,
            "steps": res.steps, "trainable_parameters": res.trainable_parameters,
            "total_parameters": total, "train_time_s": res.wall_time_s,
            "peak_memory_bytes": res.peak_memory_bytes, "device": res.device, "precision": res.precision,
            "task_info": task.describe(),
            "metric": task.metric, "higher_is_better": task.higher_is_better, "method_info": prep.info,
            "converged": res.converged, "convergence": res.convergence,
        })
        record = dict(res.task_record)  # the task's own fields (instruction tasks: exact match, forgetting)
        rows = record.pop("generations", None)
        result.update(record)
        if res.resumed_from is not None:
            result["resumed_from"] = res.resumed_from
        if res.distributed:
            result["distributed"] = res.distributed
        writer: Callable[[Path], None] | None = None
        if status == "ok" and env_rank() == 0:
            deltas = prep.deltas()

            def writer(d: Path) -> None:
                prep.save(d)
                save_deltas(d / "delta.safetensors", deltas, metadata={"run_id": rid, "method": run.method})
                if rows is not None:
                    write_generations(d / GENERATIONS_FILE, rows)
    except Exception as e:  # a failed run is a result, the sweep goes on
        result.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(), "metrics": {}, "best": {}, "curve": []})
        writer = None
    from idlab.sweep.slurm_env import slurm_record

    where = slurm_record()  # job id, array task, node and logs inside a Slurm task
    if where is not None:
        result["slurm"] = where
    result["wall_time_s"] = time.perf_counter() - t0
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return RunResult.from_dict(result), writer


def torchrun_command(nproc: int) -> list[str]:
    """``torchrun`` on PATH beside this Python, else ``python -m torch.distributed.run``."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    base = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    return [*base, "--standalone", f"--nproc_per_node={nproc}"]


def launch_torchrun(store: RunStore, study_name: str, rid: str, run: RunConfig, nproc: int, device: str,
                    progress: bool) -> str:
    """Train run ``rid`` on ``nproc`` processes; returns its status (the folder is written)."""
    fd, cfg_path = tempfile.mkstemp(prefix=f"idlab-{rid}-", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(run, f)
    started = time.time()
    try:
        cmd = [*torchrun_command(nproc), "-m", "idlab.sweep.torchrun", str(store.study_dir), study_name, rid,
               cfg_path, device, "1" if progress else "0"]
        proc = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL)
    finally:
        os.unlink(cfg_path)
    written = store.run_dir(rid) / "result.json"
    if written.exists() and written.stat().st_mtime >= started:
        res = store.result(rid)
        if res is not None:
            return res.status
    failed = RunResult.from_dict({
        "run_id": rid, "study": study_name, "config": run.to_dict(), "status": "failed",
        "error": f"torchrun exited with status {proc.returncode} before rank 0 wrote the run (a rank died)",
        "metrics": {}, "best": {}, "curve": [], **environment()})
    store.write(rid, failed, None)
    return "failed"


def _finished(store: RunStore, rid: str, retry_failed: bool) -> tuple[str | None, str | None]:
    """(status of a complete result that needs no rerun, why its files are not whole)."""
    done, problem = store.check(rid)
    if done is not None and problem is None and not (retry_failed and done.status == "failed"):
        return done.status, None
    return None, problem


def run_one(study_dir: str, study_name: str, rid: str, run: RunConfig, device: str = "auto",
            retry_failed: bool = True, progress: bool = False, nproc_per_node: int = 1, torchrun: bool = False) -> str:
    """Execute run ``rid`` and write it atomically, unless it is already complete or claimed.

    This is what every executor calls (in-process, per-GPU worker, Slurm array task). The run is
    claimed first (`RunStore.claim`, released once its folder is written or it failed); a run
    another live process holds is skipped with one line and `CLAIMED` ("claimed"): pending
    elsewhere, not failed.

    A checkpoint of the run (``train.checkpoint_every``) is resumed; one of another run id raises
    `idlab.training.checkpoint.CheckpointMismatch` (a ConfigError) before anything is written; the
    checkpoint is removed once the run is written ok (unless ``train.keep_checkpoints``).
    ``nproc_per_node`` > 1, or ``torchrun`` (executor torchrun, any N: a one-process FSDP2 run too), trains it on
    that many processes started by torchrun (`launch_torchrun`).

    Returns:
        the run's status: ok | diverged | failed, or `CLAIMED`.
    """
    store = RunStore(study_dir)
    claim = claim_run(store, rid, retry_failed)
    if not isinstance(claim, Claim):
        return claim
    try:
        if nproc_per_node > 1 or torchrun:
            status = launch_torchrun(store, study_name, rid, run, nproc_per_node, device, progress)
        else:
            status = write_run(store, rid, *execute_run(run, rid, study_name, device=device, progress=progress,
                                                        study_dir=store.study_dir))
        finish_run(store, rid, run, status)
        return status
    finally:
        claim.release()


def claim_run(store: RunStore, rid: str, retry_failed: bool) -> Claim | str:
    """Claim run ``rid`` to train it (`Claim`), or say why not: its status when it is complete, `CLAIMED`
    when another live process holds it. A checkpoint of another run id raises `CheckpointMismatch`."""
    from idlab.training.checkpoint import check_checkpoint

    status, _ = _finished(store, rid, retry_failed)
    if status is not None:
        return status
    claim = store.claim(rid)
    if not isinstance(claim, Claim):
        print(f"skipping run {rid}: claimed by {claim.describe()} (running elsewhere)", file=sys.stderr, flush=True)
        return CLAIMED
    try:
        status, problem = _finished(store, rid, retry_failed)  # finished while we were claiming it
        if status is not None:
            claim.release()
            return status
        if problem is not None:
            print(f"rerunning {rid}: {problem}", file=sys.stderr, flush=True)
        step = check_checkpoint(store.checkpoint_dir(rid), rid)
    except BaseException:
        claim.release()
        raise
    if step is not None:
        print(f"resuming {rid} from its checkpoint at step {step}", file=sys.stderr, flush=True)
    return claim


def finish_run(store: RunStore, rid: str, run: RunConfig, status: str) -> None:
    """After the run's folder is written: drop its checkpoint once it is ok (unless keep_checkpoints)."""
    if status == "ok" and not run.train.keep_checkpoints:
        shutil.rmtree(store.checkpoint_dir(rid), ignore_errors=True)


def write_run(store: RunStore, rid: str, result: RunResult, writer: Callable[[Path], None] | None) -> str:
    """Write run ``rid``'s folder (a failure writing the artifacts is recorded as the run's failure)."""
    try:
        store.write(rid, result, writer)
    except Exception as e:  # artifacts could not be written: record the failure instead
        result = result.replace(status="failed", error=f"writing artifacts: {type(e).__name__}: {e}",
                                traceback=traceback.format_exc())
        store.write(rid, result, None)
    return result.status


__all__ = ["CLAIMED", "claim_run", "environment", "execute_run", "finish_run", "launch_torchrun", "run_one",
           "torchrun_command", "write_run"]
