"""What Slurm says about its nodes (sinfo) and, inside an array task, about the task (SLURM_* variables):
the GPU and CPU rules of the request (`idlab.sweep.slurm`) and result.json's ``slurm`` record. Imports no
other sweep module (the plan and `idlab.sweep.execute` read it)."""

from __future__ import annotations

import os
import shutil
import subprocess

from idlab.config import ConfigError, StudyConfig
from idlab.jsontypes import JsonObject

#: CPUs per task when slurm.cpus_per_task is null (capped at the partition's largest node)
DEFAULT_CPUS = 4

def _sinfo(partition: str | None) -> list[tuple[int, str]] | None:
    """(CPUs, gres) of each node line of ``partition`` (default partition: all), None without an answer."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%c|%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.splitlines():
        cpus, _, gres = line.partition("|")
        try:
            rows.append((int(cpus.strip().rstrip("+")), gres.strip()))
        except ValueError:
            continue
    return rows or None


def gpu_request(study: StudyConfig) -> tuple[int, str | None, str]:
    """(GPUs per node, gres string or None, why) for one run of ``study`` (the rule: module doc); a run on
    ``nproc_per_node`` processes asks for one GPU per process on the device's default."""
    s, dev = study.slurm, str(study.device)
    if s.gres and s.gpus_per_node is not None:
        raise ConfigError("slurm.gres and slurm.gpus_per_node are both set: give one of them")
    gpu_asked = bool(s.gres and "gpu" in s.gres) or bool(s.gpus_per_node)
    if dev == "cpu" and gpu_asked:
        raise ConfigError(f"device=cpu but slurm.{'gres' if s.gres else 'gpus_per_node'} asks for GPUs the runs "
                          "would not use: drop it or set device=cuda")
    if s.gres:
        return 0, s.gres, "slurm.gres"
    if s.gpus_per_node is not None:
        return s.gpus_per_node, None, "slurm.gpus_per_node"
    if dev == "cpu":
        return 0, None, "device=cpu: no GPU"
    n = study.nproc_per_node
    if dev.startswith("cuda"):
        return (1, None, f"device={dev}: one GPU per task") if n == 1 else \
            (n, None, f"device={dev}: one GPU per process, nproc_per_node={n}")
    nodes = _sinfo(s.partition)
    if nodes is None:
        raise ConfigError("device=auto with executor=slurm and no sinfo answer: cannot tell whether the nodes have "
                          "GPUs; set device=cuda (one GPU per task), device=cpu (none) or slurm.gpus_per_node=N")
    if any("gpu" in g for _, g in nodes):
        return n, None, (f"device=auto: partition {s.partition or '(default)'} has GPU nodes (sinfo): one GPU per "
                         f"{'task' if n == 1 else f'process, nproc_per_node={n}'}")
    return 0, None, f"device=auto: partition {s.partition or '(default)'} has no GPU gres (sinfo): no GPU"


def cpus_request(study: StudyConfig) -> tuple[int, str]:
    """(CPUs per task, why)."""
    if study.slurm.cpus_per_task is not None:
        return study.slurm.cpus_per_task, "slurm.cpus_per_task"
    n = study.nproc_per_node  # a distributed run: n tasks on one node share its CPUs
    nodes = _sinfo(study.slurm.partition) if study.slurm.backend == "slurm" else None
    if nodes:
        most = max(c for c, _ in nodes) // n
        if most < DEFAULT_CPUS:
            per = f" / nproc_per_node={n}" if n > 1 else ""
            return max(most, 1), f"the partition's largest node has {most * n} CPUs{per} (default {DEFAULT_CPUS})"
    return DEFAULT_CPUS, f"default {DEFAULT_CPUS}"


def slurm_record() -> JsonObject | None:
    """The ``slurm`` entry of result.json inside a Slurm task (job and array ids, node, log paths), else None."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None
    array = env.get("SLURM_ARRAY_JOB_ID")
    task = env.get("SLURM_ARRAY_TASK_ID")
    rec: JsonObject = {"job_id": f"{array}_{task}" if array and task else env["SLURM_JOB_ID"],
                           "slurm_job_id": env["SLURM_JOB_ID"], "array_job_id": array, "array_task_id": task,
                           "node": env.get("SLURMD_NODENAME"), "partition": env.get("SLURM_JOB_PARTITION"),
                           "stdout": None, "stderr": None}
    try:
        from submitit import JobEnvironment

        paths = JobEnvironment().paths
        rec["stdout"], rec["stderr"] = str(paths.stdout), str(paths.stderr)
    except Exception:
        pass
    return rec


__all__ = ["DEFAULT_CPUS", "cpus_request", "gpu_request", "slurm_record"]
