"""``executor=slurm``: what a run asks Slurm for, the check before anything is written, one job per run
(``<study>/slurm/jobs.json``), the wait with per-state counts, ``--detach`` and ``idlab status``.

The request (`slurm_request`), per array task (one run each):

- GPUs: ``slurm.gres`` (e.g. ``gpu:a100:1``) when set, else ``slurm.gpus_per_node`` GPUs; left null, the
  study's device decides: ``cpu`` asks for none, ``cuda``/``cuda:N`` for one, and ``auto`` for one exactly
  when the target partition's nodes have a ``gpu`` gres (``sinfo %G``; no sinfo answer: set device or
  slurm.gpus_per_node, a ConfigError says so). A CPU study asking for GPUs is refused.
- CPUs: ``slurm.cpus_per_task``; null: `DEFAULT_CPUS`, or the partition's largest node when smaller.
- Memory: ``slurm.mem_gb``; null: `idlab.sweep.plan`'s figure for the largest pending run (which holds
  `idlab.sweep.plan.SLURM_HEADROOM`), at least `MIN_MEM_GB` (a task that compiles the C++ kernel of
  `idlab.subspace._kernels` peaked at ~2 GB on a 1 GB plan). CPU studies build that kernel once on
  the submitting host first, into its cache (``$IDLAB_KERNEL_CACHE``, else ``~/.cache/idlab/kernels``:
  shared with the tasks where home or that variable is on a shared file system).
- Time: ``slurm.time_min`` (the plan projects no time).
- Processes: ``nproc_per_node`` > 1 (with ``train.distributed``) asks for that many tasks on one node
  (``--ntasks-per-node``), one GPU each on CUDA; Slurm starts them, submitit's
  ``TorchDistributedEnvironment`` gives each its rank, and they train the run together
  (`idlab.sweep.slurm_jobs.run_ranks`). Memory is per node: the plan's figure times the processes.
- Passed through: partition, account, qos, constraint, ``slurm.setup`` (shell lines before the task)
  and ``slurm.additional_parameters`` (any sbatch option).

Before anything is written, `check_request` runs ``sbatch --test-only`` with the ``#SBATCH`` lines submitit
would write: an impossible request is a ConfigError naming the option. Time-outs are not requeued: a run
that hits ``slurm.time_min`` stays missing and is submitted again by the next sweep from the start (mid-run
checkpoints are another issue's).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from idlab.config import ConfigError, RunConfig, StudyConfig
from idlab.sweep.slurm_env import DEFAULT_CPUS, cpus_request, gpu_request

Run = tuple[str, RunConfig]

#: the least host memory a task asks for, GiB (a first build of the C++ kernel peaked at ~2 GB)
MIN_MEM_GB = 2
# --------------------------------------------------------------------------- the request


def slurm_mem_gb(study: StudyConfig, pending: Sequence[Run]) -> tuple[int, str]:
    """``slurm.mem_gb`` if set, else the largest host memory `idlab.sweep.plan` projects for ``pending``
    (at least `MIN_MEM_GB`). Returns (GB, where it came from). Raises ConfigError when the plan fails."""
    if study.slurm.mem_gb is not None:
        return int(study.slurm.mem_gb), "slurm.mem_gb"
    n = study.nproc_per_node
    if n > 1:  # --mem is per node and every process holds its own copy of the model (a bound for FSDP2)
        one, why = slurm_mem_gb(replace(study, nproc_per_node=1), pending)
        return one * n, f"{why} x nproc_per_node={n}"
    from idlab.sweep.plan import plan_runs

    try:
        plans = plan_runs(study, pending)
    except Exception as e:
        raise ConfigError(f"slurm.mem_gb is null (take it from `idlab plan`) but planning failed: "
                          f"{type(e).__name__}: {e}; set slurm.mem_gb=<GB>") from None
    worst = max(plans, key=lambda p: p.slurm_mem_gb)
    if worst.slurm_mem_gb < MIN_MEM_GB:
        return MIN_MEM_GB, f"idlab plan {worst.slurm_mem_gb} GiB (largest run: {worst.label}), floor {MIN_MEM_GB}"
    return worst.slurm_mem_gb, f"idlab plan (largest run: {worst.label})"


def job_name(study: StudyConfig) -> str:
    return f"idlab-{study.name}"


def slurm_parameters(study: StudyConfig, mem_gb: int, cpus: int | None = None) -> dict[str, object]:
    """submitit ``AutoExecutor.update_parameters`` keywords for one array task per run."""
    s = study.slurm
    gpus, gres, _ = gpu_request(study)
    params: dict[str, object] = {"timeout_min": s.time_min, "cpus_per_task": cpus or cpus_request(study)[0],
                              "mem_gb": mem_gb, "slurm_array_parallelism": s.array_parallelism,
                              "name": job_name(study)}
    if study.nproc_per_node > 1:  # Slurm starts the run's processes itself (one task each, one node)
        params["tasks_per_node"] = study.nproc_per_node
        params["nodes"] = 1
    if gpus:
        params["gpus_per_node"] = gpus
    if gres:
        params["slurm_gres"] = gres
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    extra = {k: v for k, v in (("account", s.account), ("qos", s.qos), ("constraint", s.constraint)) if v}
    extra.update(dict(s.additional_parameters))
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


@dataclass
class SlurmRequest:
    """What each array task asks for: submitit parameters and the equivalent sbatch options."""

    params: dict[str, object]
    sbatch: list[str]
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "sbatch " + " ".join(self.sbatch) + "".join(f"\n  {n}" for n in self.notes)


def sbatch_options(params: Mapping[str, object], folder: Path) -> list[str]:
    """The ``#SBATCH`` options submitit writes for ``params`` (output/error paths and the array left out)."""
    from submitit import AutoExecutor
    from submitit.slurm.slurm import _make_sbatch_string

    ex = AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**params)
    raw = dict(ex._executor.parameters)
    script = _make_sbatch_string(command="true", folder=str(folder), **raw)
    skip = ("--output", "--error", "--array", "--open-mode", "--signal", "--wckey")
    return [ln.split(" ", 1)[1].strip() for ln in script.splitlines()
            if ln.startswith("#SBATCH ") and not ln.split(" ", 1)[1].strip().startswith(skip)]


def slurm_request(study: StudyConfig, runs: Sequence[Run]) -> SlurmRequest:
    """The request for ``runs`` (module doc); no check against the cluster."""
    mem, mem_why = slurm_mem_gb(study, runs)
    cpus, cpus_why = cpus_request(study)
    gpus, gres, gpu_why = gpu_request(study)
    params = slurm_parameters(study, mem, cpus)
    notes = [f"GPUs: {gres or gpus} ({gpu_why}); CPUs: {cpus} ({cpus_why}); mem: {mem} GB ({mem_why}); "
             f"time: {study.slurm.time_min} min (slurm.time_min)"]
    return SlurmRequest(params, sbatch_options(params, Path("/tmp")), notes)


#: which option an sbatch error names, by a piece of its message
_ERROR_OPTIONS = (("partition", "slurm.partition"), ("gres", "slurm.gres / slurm.gpus_per_node / device"),
                  ("feature", "slurm.constraint"), ("time limit", "slurm.time_min"), ("account", "slurm.account"),
                  ("qos", "slurm.qos"), ("memory", "slurm.mem_gb"))
#: option -> the study key that sets it, for the by-elimination diagnosis
_OPTION_KEYS = (("--mem", "slurm.mem_gb"), ("--cpus-per-task", "slurm.cpus_per_task"),
                ("--gpus-per-node", "slurm.gpus_per_node"), ("--gres", "slurm.gres"),
                ("--constraint", "slurm.constraint"), ("--time", "slurm.time_min"))


def _test_only(options: Sequence[str]) -> tuple[bool, str]:
    cmd = ["sbatch", "--test-only", *options, "--wrap", "true"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return True, "sbatch --test-only timed out (not checked)"
    msg = " ".join((out.stderr + out.stdout).split())
    return out.returncode == 0, msg


def check_request(study: StudyConfig, runs: Sequence[Run]) -> SlurmRequest | None:
    """`slurm_request` for ``runs``, validated with ``sbatch --test-only`` (backend slurm with sbatch on PATH).

    Raises ConfigError naming the option when Slurm refuses the request; writes nothing.
    """
    if study.executor != "slurm" or study.slurm.backend != "slurm":
        return None
    req = slurm_request(study, runs)
    if shutil.which("sbatch") is None:
        return req
    ok, msg = _test_only(req.sbatch)
    if ok:
        return req
    low = msg.lower()
    named = [key for piece, key in _ERROR_OPTIONS if piece in low]
    if not named:  # "Requested node configuration is not available": find the option by leaving each out
        for opt, key in _OPTION_KEYS:
            rest = [o for o in req.sbatch if not o.startswith(opt)]
            if len(rest) < len(req.sbatch) and _test_only(rest)[0]:
                named.append(key)
    where = " or ".join(named) if named else "the slurm.* options"
    raise ConfigError(f"Slurm refuses the request per run ({where}): {msg}\n  the request: {req.text()}\n"
                      f"  (sbatch --test-only; nothing was written)")


__all__ = ["DEFAULT_CPUS", "MIN_MEM_GB", "SlurmRequest", "check_request", "cpus_request", "gpu_request",
           "job_name", "sbatch_options", "slurm_mem_gb", "slurm_parameters", "slurm_request"]
