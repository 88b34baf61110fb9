"""Executors of `idlab sweep`: run one run (`run_one`, what every executor calls; status `CLAIMED`
when another live process trains it, which is pending, not failed) and run a list
of pending runs ``local`` (in-process), ``multigpu`` (one spawned worker per visible device) or on
``slurm`` (a submitit job array, `idlab.sweep.slurm`); `preflight` checks device and precision where they resolve.

`idlab.sweep` chooses the executor (``EXECUTORS[study.executor]``) after expanding the grid.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from idlab.config import RunConfig, StudyConfig
from idlab.sweep.execute import CLAIMED, run_one
from idlab.sweep.slurm import slurm_mem_gb, slurm_parameters
from idlab.sweep.slurm_jobs import run_slurm

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


def _run_torchrun(study: StudyConfig, pending: Sequence[Run]) -> None:
    """Each run on ``nproc_per_node`` processes (`idlab.sweep.torchrun`), one run after the other."""
    bar = _progress(len(pending), f"{study.name} (torchrun x{study.nproc_per_node})")
    for rid, cfg in pending:
        bar.set_postfix_str(_short(cfg))
        status = run_one(str(study.study_dir()), study.name, rid, cfg, study.device, study.retry_failed,
                         study.progress, nproc_per_node=study.nproc_per_node, torchrun=True)
        bar.update(1)
        if status not in ("ok", CLAIMED):
            bar.write(f"run {rid} ({_short(cfg)}): {status}")
    bar.close()


def check_distributed(study: StudyConfig) -> str | None:
    """``train.distributed`` and ``nproc_per_node`` against the methods and this host (ConfigError before
    anything is written); a checkpoint folder holding another run's checkpoint is refused too.

    Returns a line on what a torchrun study runs on, or None for the other executors.
    """
    import torch

    from idlab import methods
    from idlab.config import ConfigError

    where = f"study {study.name!r}"
    strategy = study.train.distributed
    if strategy == "fsdp2":
        bad = [m for m in study.methods if not methods.get(m).shardable]
        if bad:
            raise ConfigError(f"{where}: key 'train.distributed': got 'fsdp2', but method(s) {bad} do not train the "
                              "model's own weights, so there is nothing for FSDP2 to shard; use ddp or auto "
                              "(auto: fsdp2 for shardable methods, ddp for the others)")
    n = study.nproc_per_node
    if study.executor not in ("torchrun", "slurm"):
        if strategy in ("ddp", "fsdp2"):
            raise ConfigError(f"{where}: key 'train.distributed': got {strategy!r} with executor={study.executor}; "
                              "a distributed run needs executor=torchrun or executor=slurm (and nproc_per_node)")
        if n != 1:
            raise ConfigError(f"{where}: key 'nproc_per_node': got {n} with executor={study.executor}; processes per "
                              "run need executor=torchrun (this host) or executor=slurm (Slurm starts them)")
        return None
    if n < 1:
        raise ConfigError(f"{where}: key 'nproc_per_node': got {n}; must be >= 1")
    if study.executor == "slurm":
        if n == 1:
            if strategy in ("ddp", "fsdp2"):
                raise ConfigError(f"{where}: key 'train.distributed': got {strategy!r} with executor=slurm and "
                                  "nproc_per_node=1; set nproc_per_node=N (Slurm starts N tasks per run)")
            return None
        return (f"executor slurm: {n} tasks per run on one node (submitit's TorchDistributedEnvironment; gloo on "
                f"the CPU, nccl on CUDA), train.distributed={strategy}")
    cpu = study.device == "cpu" or (study.device == "auto" and not torch.cuda.is_available())
    if not cpu:
        visible = torch.cuda.device_count()
        if n > visible:
            raise ConfigError(f"{where}: key 'nproc_per_node': got {n}, but this host sees {visible} CUDA device(s) "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}); use "
                              f"nproc_per_node<={visible}, or device=cpu for gloo processes on the CPU")
    if cpu:
        return (f"executor torchrun: {n} process(es) per run on the CPU (gloo; any number is allowed, they share "
                f"this host's cores), train.distributed={strategy}")
    return f"executor torchrun: {n} GPU process(es) per run (nccl), train.distributed={strategy}"


def check_checkpoints(study: StudyConfig) -> None:
    """A run's checkpoint folder holding the checkpoint of another run id (another config) is refused
    (`idlab.training.checkpoint.CheckpointMismatch`, a ConfigError) before anything is written."""
    from idlab.runs import RunStore
    from idlab.runs.store import CHECKPOINT_PREFIX
    from idlab.sweep.grid import expand
    from idlab.training.checkpoint import check_checkpoint

    store = RunStore(study.study_dir())
    if not store.runs_dir.is_dir() or not any(p.name.startswith(CHECKPOINT_PREFIX) for p in store.runs_dir.iterdir()):
        return
    for rid, _ in expand(study):
        check_checkpoint(store.checkpoint_dir(rid), rid)


def check_slurm(study: StudyConfig) -> None:
    """``executor=slurm`` with ``slurm.backend=slurm`` needs ``sbatch`` on PATH: without it submitit's
    AutoExecutor would quietly run every job here instead. Raises ConfigError naming the fix."""
    import shutil

    if study.slurm.backend != "slurm" or shutil.which("sbatch") is not None:
        return
    from idlab.config import ConfigError

    raise ConfigError(
        f"study {study.name!r}: key 'executor': got 'slurm' with slurm.backend='slurm', but `sbatch` is not on PATH "
        "on this host, so nothing could be submitted (submitit would run the jobs here instead); run on a Slurm "
        "login node with Slurm on PATH (e.g. `module load slurm`, or add the folder holding sbatch to PATH), use "
        "slurm.backend=local for a local test of the Slurm path, or executor=local")


def preflight(study: StudyConfig) -> str:
    """Check what this host must honour before anything is written; returns a one-line summary.

    ``local``: device and precision resolved here (`idlab.training.devices`). ``multigpu``: the workers'
    devices (and precision on the first). ``slurm``: ``sbatch`` on PATH (`check_slurm`; device and
    precision resolve on the compute node). Raises `idlab.training.devices.DeviceError` (a
    ConfigError) naming the value and the fix.
    """
    import torch

    from idlab.training.devices import resolve_device, resolve_precision

    dtypes = [getattr(torch, study.model.dtype)]
    check_checkpoints(study)
    line = check_distributed(study)
    if study.executor == "slurm":
        check_slurm(study)
        return (f"{line or 'executor slurm'}: device={study.device} / precision={study.train.precision} resolved on "
                "the nodes")
    if line is not None:
        dev = torch.device("cpu") if "CPU" in line else torch.device("cuda", 0)
        return f"{line}, precision {resolve_precision(study.train.precision, dev, dtypes)}"
    if study.executor == "multigpu":
        workers = multigpu_workers(study)
        dev = torch.device("cpu" if study.device == "cpu" else "cuda:0")
        prec = resolve_precision(study.train.precision, dev, dtypes)
        where = "on the CPU (device: cpu)" if dev.type == "cpu" else f"on CUDA_VISIBLE_DEVICES {workers}"
        return f"executor multigpu: {len(workers)} worker(s) {where}, precision {prec}"
    dev = resolve_device(study.device)
    return f"device {dev}, precision {resolve_precision(study.train.precision, dev, dtypes)}"


EXECUTORS = {"local": _run_local, "multigpu": _run_multigpu, "slurm": run_slurm, "torchrun": _run_torchrun}


__all__ = ["EXECUTORS", "check_checkpoints", "check_distributed", "check_slurm", "multigpu_workers", "preflight", "run_one", "slurm_mem_gb", "slurm_parameters"]
