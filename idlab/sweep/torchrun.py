"""Executor ``torchrun``: one run on ``nproc_per_node`` processes.

`launch_torchrun` (called by `idlab.sweep.execute.run_one`, which holds the run's claim) pickles
the run config into a temp file and starts ``torchrun --nproc_per_node=N -m idlab.sweep.torchrun
<study_dir> <study_name> <run_id> <config.pkl> <device> <progress>``. Every rank runs
`idlab.sweep.execute.execute_run` (the loop joins torchrun's process group,
`idlab.training.distributed`); rank 0 alone writes the run folder. A rank that fails exits
non-zero, and torchrun then ends the others; when no rank wrote a result the launcher writes
``status: failed`` (nothing half-written: the folder is written atomically or not at all).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from idlab.config.run import RunConfig
from idlab.runs import RunResult, RunStore


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
    from idlab.sweep.execute import environment

    failed = RunResult.from_dict({
        "run_id": rid, "study": study_name, "config": run.to_dict(), "status": "failed",
        "error": f"torchrun exited with status {proc.returncode} before rank 0 wrote the run (a rank died)",
        "metrics": {}, "best": {}, "curve": [], **environment()})
    store.write(rid, failed, None)
    return "failed"


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun run (see the module docstring)."""
    from idlab.sweep.execute import execute_run, write_run
    from idlab.training.distributed import env_rank

    study_dir, study_name, rid, cfg_path, device, progress = (argv or sys.argv[1:])[:6]
    with open(cfg_path, "rb") as f:
        run: RunConfig = pickle.load(f)
    store = RunStore(study_dir)
    result, writer = execute_run(run, rid, study_name, device=device, progress=progress == "1",
                                 checkpoint_dir=store.checkpoint_dir(rid))
    if env_rank() == 0:
        write_run(store, rid, result, writer)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if result.status == "failed":
        print(f"rank {env_rank()}: run {rid} failed: {result.error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
