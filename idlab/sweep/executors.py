"""Executors of `idlab sweep`: run one run (`run_one`, what every executor calls; status `CLAIMED`
when another live process trains it, which is pending, not failed) and run a list
of pending runs ``local`` (in-process), ``multigpu`` (one spawned worker per visible device) or on
``slurm`` (a submitit job array); `preflight` checks device and precision where they resolve.

`idlab.sweep` chooses the executor (``EXECUTORS[study.executor]``) after expanding the grid.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idlab.config import RunConfig, StudyConfig
from idlab.sweep.execute import CLAIMED, run_one

Run = tuple[str, RunConfig]  # (run id, resolved run config)


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
        if status not in ("ok", CLAIMED):  # CLAIMED: run_one named the process training it
            bar.write(f"run {rid} ({_short(cfg)}): {status}")
    bar.close()


def _short(cfg: RunConfig) -> str:
    return cfg.label()


def _gpu_worker(visible: str, study_dir: str, study_name: str, retry_failed: bool, queue: Any, done: Any,
                device: str = "cuda:0") -> None:
    """One worker process per GPU: pulls (run id, config) from ``queue`` until a None arrives.

    ``visible`` is the parent's own ``CUDA_VISIBLE_DEVICES`` entry for this worker's device (an
    index, a GPU-/MIG- UUID), set before torch initialises CUDA here: the worker sees that one
    device, as ``cuda:0``.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
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


def multigpu_workers(study: StudyConfig) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each multigpu worker (`idlab.training.devices.worker_devices`).

    ``device: cpu`` keeps the worker plumbing usable without GPUs (one CPU worker per ``gpus``
    entry, default one). Raises `idlab.training.devices.DeviceError` when no GPU is visible.
    """
    if study.device == "cpu":
        return [str(g) for g in (study.gpus if study.gpus is not None else (0,))]
    from idlab.training.devices import worker_devices

    return worker_devices(study.gpus)


def _run_multigpu(study: StudyConfig, pending: Sequence[Run]) -> None:
    import multiprocessing as mp

    workers = multigpu_workers(study)
    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    for item in pending:
        queue.put(item)
    for _ in workers:
        queue.put(None)
    device = "cpu" if study.device == "cpu" else "cuda:0"  # each worker sees its one GPU as cuda:0
    procs = [ctx.Process(target=_gpu_worker, args=(w, str(study.study_dir()), study.name, study.retry_failed,
                                                    queue, done, device), daemon=False) for w in workers]
    for p in procs:
        p.start()
    label = f"{len(workers)} CPU workers" if device == "cpu" else f"{len(workers)} GPUs: {','.join(workers)}"
    bar = _progress(len(pending), f"{study.name} ({label})")
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
            if status not in ("ok", CLAIMED):
                bar.write(f"run {rid}: {status}")
    finally:
        bar.close()
        for p in procs:
            p.join(timeout=10)


def slurm_parameters(study: StudyConfig, mem_gb: int) -> dict[str, Any]:
    """submitit ``AutoExecutor.update_parameters`` keywords for one array task per run."""
    s = study.slurm
    params: dict[str, Any] = {"timeout_min": s.time_min, "gpus_per_node": s.gpus_per_node,
                              "cpus_per_task": s.cpus_per_task, "mem_gb": mem_gb,
                              "slurm_array_parallelism": s.array_parallelism, "name": f"idlab-{study.name}"}
    if s.partition:
        params["slurm_partition"] = s.partition
    extra = {k: v for k, v in (("account", s.account), ("qos", s.qos), ("constraint", s.constraint)) if v}
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def slurm_mem_gb(study: StudyConfig, pending: Sequence[Run]) -> tuple[int, str]:
    """``slurm.mem_gb`` if set, else the largest host memory `idlab.sweep.plan` projects for ``pending``.

    Returns (GB, where it came from). Raises ConfigError when the plan cannot be made.
    """
    if study.slurm.mem_gb is not None:
        return int(study.slurm.mem_gb), "slurm.mem_gb"
    from idlab.config import ConfigError
    from idlab.sweep.plan import plan_runs

    try:
        plans = plan_runs(study, pending)
    except Exception as e:
        raise ConfigError(f"slurm.mem_gb is null (take it from `idlab plan`) but planning failed: "
                          f"{type(e).__name__}: {e}; set slurm.mem_gb=<GB>") from None
    worst = max(plans, key=lambda p: p.slurm_mem_gb)
    return worst.slurm_mem_gb, f"idlab plan (largest run: {worst.label})"


def _slurm_executor(study: StudyConfig, mem_gb: int | None = None) -> Any:
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
        ex.update_parameters(**slurm_parameters(study, int(mem_gb if mem_gb is not None else s.mem_gb or 0)))
    return ex


def _run_slurm(study: StudyConfig, pending: Sequence[Run]) -> None:
    mem_gb: int | None = None
    if study.slurm.backend == "slurm":
        mem_gb, source = slurm_mem_gb(study, pending)
        print(f"slurm: mem_gb={mem_gb} per array task (from {source}), {study.slurm.gpus_per_node} GPU(s) per task",
              file=sys.stderr)
    print(f"slurm: device={study.device!r} and train.precision={study.train.precision!r} are resolved on each "
          f"compute node ({_here()})", file=sys.stderr)
    ex = _slurm_executor(study, mem_gb)
    n = len(pending)
    sd = str(Path(study.study_dir()).resolve())
    jobs = ex.map_array(run_one, [sd] * n, [study.name] * n, [rid for rid, _ in pending],
                        [cfg for _, cfg in pending], [study.device] * n, [study.retry_failed] * n)
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


def _here() -> str:
    """What this (submitting) host would resolve, for the record."""
    import torch

    if torch.cuda.is_available():
        return f"this host has {torch.cuda.device_count()} CUDA device(s)"
    return "this host has no CUDA device: on a GPU node auto gives cuda and bf16-mixed where supported"


def preflight(study: StudyConfig) -> str:
    """Check what this host must honour before anything is written; returns a one-line summary.

    ``local``: device and precision resolved here (`idlab.training.devices`). ``multigpu``: the workers'
    devices (and precision on the first). ``slurm``: nothing to resolve here (the compute node
    does). Raises `idlab.training.devices.DeviceError` (a ConfigError) naming the value and the fix.
    """
    import torch

    from idlab.training.devices import resolve_device, resolve_precision

    dtypes = [getattr(torch, study.model.dtype)]
    if study.executor == "slurm":
        return f"executor slurm: device={study.device} / precision={study.train.precision} resolved on the nodes"
    if study.executor == "multigpu":
        workers = multigpu_workers(study)
        dev = torch.device("cpu" if study.device == "cpu" else "cuda:0")
        prec = resolve_precision(study.train.precision, dev, dtypes)
        where = "on the CPU (device: cpu)" if dev.type == "cpu" else f"on CUDA_VISIBLE_DEVICES {workers}"
        return f"executor multigpu: {len(workers)} worker(s) {where}, precision {prec}"
    dev = resolve_device(study.device)
    return f"device {dev}, precision {resolve_precision(study.train.precision, dev, dtypes)}"


EXECUTORS = {"local": _run_local, "multigpu": _run_multigpu, "slurm": _run_slurm}


__all__ = ["EXECUTORS", "multigpu_workers", "preflight", "run_one", "slurm_mem_gb", "slurm_parameters"]
