"""``executor=slurm`` jobs: one job per run recorded in ``<study>/slurm/jobs.json`` (run id -> job id, log
paths; written atomically), attach instead of resubmitting, the wait with per-state counts and pending
reasons (squeue; sacct is not needed, a job gone from squeue is judged by its result.json), ``--detach``,
the task's record in result.json and ``idlab status``. The request itself: `idlab.sweep.slurm`.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:  # submitit (the cluster extra) requeues a Checkpointable task on time-out
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - executor=slurm needs submitit; this module still imports
    _Checkpointable = object  # type: ignore[assignment,misc]

from idlab.config import ConfigError, RunConfig, StudyConfig
from idlab.jsontypes import JsonObject, JsonValue
from idlab.runs import RunStore
from idlab.sweep.slurm import check_request, job_name

Run = tuple[str, RunConfig]

#: seconds between squeue polls and at least between two progress lines
POLL_S = float(os.environ.get("IDLAB_SLURM_POLL_S", "5"))
REPORT_S = 30.0
#: squeue states of a job that is still alive (attach to it, never submit its run again)
ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                    "STAGE_OUT", "SIGNALING", "REQUEUE_HOLD", "REQUEUE_FED"})
#: pending reasons that do not clear by waiting (the job is reported, then cancelled after stuck_timeout_min)
STUCK_REASONS = ("PartitionConfig", "ReqNodeNotAvail", "PartitionNodeLimit", "PartitionTimeLimit", "PartitionDown",
                 "PartitionInactive", "BadConstraints", "InvalidAccount", "InvalidQOS", "DependencyNeverSatisfied",
                 "JobHeldAdmin", "NodeDown", "launch failed requeued held")


# --------------------------------------------------------------------------- jobs.json


def jobs_path(study_dir: Path) -> Path:
    return Path(study_dir) / "slurm" / "jobs.json"


def read_jobs(study_dir: Path) -> dict[str, JsonObject]:
    """run id -> its last job (job_id, array_job_id, task_id, submitted_at, stdout, stderr)."""
    p = jobs_path(study_dir)
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): dict(v) for k, v in raw.items() if isinstance(v, Mapping)} if isinstance(raw, Mapping) else {}


def record_jobs(study_dir: Path, new: Mapping[str, Mapping[str, JsonValue]]) -> None:
    """Add ``new`` to jobs.json (read, merge, atomic replace)."""
    from idlab.runs import atomic_write_json

    jobs = read_jobs(study_dir)
    jobs.update({k: dict(v) for k, v in new.items()})
    jobs_path(study_dir).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(jobs_path(study_dir), dict(jobs))


def squeue_states() -> dict[str, tuple[str, str, str]] | None:
    """job id (``123`` or ``123_4``) -> (state, reason, node) of this user's jobs; None without squeue."""
    if shutil.which("squeue") is None:
        return None
    cmd = ["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r|%N"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            states[parts[0]] = (parts[1], parts[2], parts[3])
    return states


def _stuck(reason: str) -> bool:
    return any(reason.startswith(r) for r in STUCK_REASONS)


# --------------------------------------------------------------------------- submit, attach, wait


def _executor(study: StudyConfig, params: Mapping[str, object] | None) -> Any:
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
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(**(params or {}))
    return ex


def _prebuild_kernel(study: StudyConfig) -> None:
    """CPU studies: compile the C++ kernel here once, into the cache the tasks read (module doc)."""
    if study.device != "cpu":
        return
    try:
        from idlab.subspace import _kernels

        _kernels.build()
        print(f"slurm: C++ kernel ready in {_kernels.build_dir()} (built before submission)", file=sys.stderr)
    except Exception as e:  # the tasks fall back to building it (MIN_MEM_GB counts that) or to torch
        print(f"slurm: C++ kernel not prebuilt ({type(e).__name__}: {e})", file=sys.stderr)


def run_slurm(study: StudyConfig, pending: Sequence[Run], detach: bool = False) -> None:
    """Submit the runs of ``pending`` that have no live job, attach to those that have one, and wait
    (unless ``detach``) with per-state counts; a job stuck for a reason that never clears is cancelled."""


    sd = Path(study.study_dir()).resolve()
    n = len(pending)
    if study.slurm.backend != "slurm":  # submitit's Local/Debug executors (offline tests): submit and wait
        ex = _executor(study, None)
        jobs = ex.map_array(_task, [str(sd)] * n, [study.name] * n, [r for r, _ in pending], [c for _, c in pending],
                            [study.device] * n, [study.retry_failed] * n)
        for job, (rid, _) in zip(jobs, pending):
            try:
                job.result()
            except Exception as e:
                print(f"run {rid}: task {job.job_id} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return
    req = check_request(study, pending)
    assert req is not None
    print(f"slurm: per run {req.text()}", file=sys.stderr)
    print(f"slurm: device={study.device!r} and train.precision={study.train.precision!r} are resolved on each "
          "compute node", file=sys.stderr)
    known, states = read_jobs(sd), squeue_states() or {}
    attach = {rid: known[rid] for rid, _ in pending
              if rid in known and states.get(str(known[rid].get("job_id")), ("",))[0] in ACTIVE}
    submit = [(rid, cfg) for rid, cfg in pending if rid not in attach]
    if attach:
        print(f"slurm: attaching to {len(attach)} live job(s) of an earlier sweep (not resubmitted)", file=sys.stderr)
    if submit:
        _prebuild_kernel(study)
        ex = _executor(study, req.params)
        m = len(submit)
        jobs = ex.map_array(_task, [str(sd)] * m, [study.name] * m, [r for r, _ in submit], [c for _, c in submit],
                            [study.device] * m, [study.retry_failed] * m)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        new: dict[str, JsonObject] = {rid: {"job_id": str(j.job_id), "array_job_id": str(j.job_id).split("_")[0],
                     "task_id": str(j.job_id).partition("_")[2] or None, "submitted_at": now,
                     "stdout": str(j.paths.stdout), "stderr": str(j.paths.stderr)} for j, (rid, _) in zip(jobs, submit)}
        record_jobs(sd, new)
        attach.update(new)
        print(f"slurm: submitted {m} array task(s) as job {jobs[0].job_id.split('_')[0]} ({job_name(study)}); "
              f"job ids in {jobs_path(sd)}", file=sys.stderr)
    if detach:
        print(f"slurm: detached; `idlab status {sd}` shows the states, the same `idlab sweep` command collects",
              file=sys.stderr)
        return
    wait(study, attach, RunStore(sd))


def wait(study: StudyConfig, jobs: Mapping[str, Mapping[str, JsonValue]], store: RunStore) -> None:
    """Poll squeue until every job of ``jobs`` (run id -> record) has left; print per-state counts."""
    left = {rid: str(j["job_id"]) for rid, j in jobs.items()}
    last_state: dict[str, str] = {}
    stuck_since: dict[str, float] = {}
    limit_s = study.slurm.stuck_timeout_min * 60
    counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
    last_print, last_line, cancelled = 0.0, "", []
    while True:
        states = squeue_states()
        if states is None:
            raise ConfigError("squeue failed while waiting for the jobs; `idlab status` and `idlab sweep` again attach")
        counts["pending"] = counts["running"] = 0
        reasons: dict[str, int] = {}
        for rid, jid in list(left.items()):
            state, reason, _ = states.get(jid, ("GONE", "", ""))
            if state in ACTIVE:
                last_state[rid] = state
                if state == "PENDING":
                    counts["pending"] += 1
                    reasons[reason] = reasons.get(reason, 0) + 1
                    if _stuck(reason):
                        stuck_since.setdefault(rid, time.monotonic())
                        if time.monotonic() - stuck_since[rid] > limit_s:
                            subprocess.run(["scancel", jid], capture_output=True, timeout=60)
                            cancelled.append(f"{rid} (job {jid}: {reason})")
                    else:
                        stuck_since.pop(rid, None)
                else:
                    counts["running"] += 1
                continue
            del left[rid]
            res, problem = store.check(rid)
            if res is not None and problem is None and res.status == "ok":
                counts["done"] += 1
            else:
                counts["failed"] += 1
                why = (f"status {res.status}: {res.error}" if res is not None and problem is None
                       else f"no result ({state if state != 'GONE' else last_state.get(rid, 'gone')})")
                print(f"slurm: run {rid} job {jid}: {why}; log {jobs[rid].get('stderr')}", file=sys.stderr)
        why = ", ".join(f"{k or 'None'} x{v}" for k, v in sorted(reasons.items()))
        line = (f"slurm {study.name}: {counts['pending']} pending{f' ({why})' if why else ''}, {counts['running']} "
                f"running, {counts['done']} done, {counts['failed']} failed")
        now = time.monotonic()
        if not left or (line != last_line and now - last_print >= REPORT_S) or now - last_print >= 10 * REPORT_S:
            print(line, file=sys.stderr, flush=True)
            last_print, last_line = now, line
            for rid in stuck_since:
                if rid in left:
                    print(f"slurm: job {left[rid]} (run {rid}) is pending for a reason that does not clear by "
                          f"waiting; cancelled after slurm.stuck_timeout_min={study.slurm.stuck_timeout_min}",
                          file=sys.stderr)
        if not left:
            break
        time.sleep(POLL_S)
    if cancelled:
        raise ConfigError(f"cancelled {len(cancelled)} job(s) pending for a reason that never clears: "
                          f"{'; '.join(cancelled[:5])} (fix the slurm.* options; `idlab sweep` again submits them)")


class SlurmTask(_Checkpointable):
    """What one array task runs: tag the job with the run id (best effort), then `run_one`.

    On a time-out or a preemption submitit signals the task (``slurm_signal_delay_s`` before the
    limit) and calls `checkpoint`, which requeues the same call (submitit's `Checkpointable`): the
    requeued task finds the run's last mid-run checkpoint (``train.checkpoint_every``) and resumes
    there; without checkpoints it starts the run again. Until it ends, the run has no result.json
    and `idlab status` shows its job as requeued / pending, never failed.
    """

    def __call__(self, study_dir: str, study_name: str, rid: str, run: RunConfig, device: str,
                 retry_failed: bool) -> str:
        from idlab.sweep.execute import run_one

        jid = os.environ.get("SLURM_JOB_ID")
        if jid and shutil.which("scontrol"):
            try:
                subprocess.run(["scontrol", "update", f"JobId={jid}", f"Comment=idlab:{study_name}:{rid}"],
                               capture_output=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if _slurm_tasks() > 1:
            return run_ranks(study_dir, study_name, rid, run, device, retry_failed)
        return run_one(study_dir, study_name, rid, run, device, retry_failed)


def _slurm_tasks() -> int:
    """Tasks of this Slurm job (``nproc_per_node`` of the study; 1 outside Slurm or submitit)."""
    try:
        from submitit import JobEnvironment

        return int(JobEnvironment().num_tasks)
    except Exception:  # not inside a submitit job (local / debug backends)
        return 1


def run_ranks(study_dir: str, study_name: str, rid: str, run: RunConfig, device: str, retry_failed: bool) -> str:
    """One rank of a run that Slurm started on N tasks (``nproc_per_node`` > 1, ``--ntasks-per-node``).

    submitit's ``TorchDistributedEnvironment`` exports MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE /
    LOCAL_RANK (the first node's host, a port drawn from the job id), exactly what torchrun would set;
    the process group joins with ``cpu:gloo,cuda:nccl``, so the loop (`idlab.training.distributed`) finds
    it initialised and each rank takes its own GPU (LOCAL_RANK) on CUDA. Rank 0 alone claims the run
    (`claim_run`), tells the others whether to train it (a broadcast), and writes its folder; the others
    train and write nothing. Returns the run's status (every rank returns rank 0's decision).
    """
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    from idlab.runs.claims import Claim
    from idlab.sweep.execute import claim_run, execute_run, finish_run, write_run

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    store = RunStore(study_dir)
    claim: Claim | str = ""
    go = torch.zeros(1)
    try:
        if env.rank == 0:
            claim = claim_run(store, rid, retry_failed)
            go[0] = 1.0 if isinstance(claim, Claim) else 0.0
        dist.broadcast(go, src=0)
        if go[0] == 0:
            return claim if isinstance(claim, str) and claim else "skipped"
        result, writer = execute_run(run, rid, study_name, device=device, study_dir=store.study_dir)
        if env.rank != 0:
            return result.status
        status = write_run(store, rid, result, writer)
        finish_run(store, rid, run, status)
        return status
    finally:
        if isinstance(claim, Claim):
            claim.release()
        if dist.is_initialized():
            dist.destroy_process_group()


_task = SlurmTask()


# --------------------------------------------------------------------------- idlab status


def status_rows(study_dir: Path) -> list[JsonObject]:
    """One row per run of the study folder: run id, job id, state, log path."""


    sd = Path(study_dir)
    study = json.loads((sd / "study.json").read_text()) if (sd / "study.json").is_file() else {}
    jobs = read_jobs(sd)
    rids = list(dict.fromkeys([*study.get("run_ids", []), *jobs]))
    states = squeue_states() or {}
    store = RunStore(sd)
    rows = []
    for rid in rids:
        job = jobs.get(rid, {})
        jid = str(job.get("job_id", "")) or None
        res, problem = store.check(rid)
        if res is not None and problem is None:
            state: str = res.status
        elif jid and jid in states:
            st, reason, node = states[jid]
            state = f"{st} ({reason})" if st == "PENDING" else f"{st} {node}".strip()
        elif jid:
            state = "gone, no result"
        else:
            state = "not submitted"
        rows.append({"run_id": rid, "job_id": jid, "state": state, "log": job.get("stderr")})
    return rows


def status_text(study_dir: Path) -> str:
    rows = status_rows(study_dir)
    lines = [f"{'run':<16} {'job':<12} {'state':<28} log"]
    for r in rows:
        lines.append(f"{str(r['run_id'])[:16]:<16} {r['job_id'] or '-'!s:<12} {r['state']!s:<28} {r['log'] or '-'}")
    counts: dict[str, int] = {}
    for r in rows:
        k = str(r["state"]).split(" ")[0]
        counts[k] = counts.get(k, 0) + 1
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


__all__ = ["ACTIVE", "STUCK_REASONS", "jobs_path", "read_jobs", "record_jobs", "run_slurm",
           "squeue_states", "status_rows", "status_text", "wait"]
