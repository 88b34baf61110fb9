"""Executor ``torchrun``: one rank of a run on ``nproc_per_node`` processes (`main`).

`idlab.sweep.execute.launch_torchrun` (called by `run_one`, which holds the run's claim) pickles
the run config into a temp file and starts ``torchrun --nproc_per_node=N -m idlab.sweep.torchrun
<study_dir> <study_name> <run_id> <config.pkl> <device> <progress>``. Every rank runs
`idlab.sweep.execute.execute_run` (the loop joins torchrun's process group,
`idlab.training.distributed`); rank 0 alone writes the run folder. A rank that fails exits
non-zero, and torchrun then ends the others; when no rank wrote a result the launcher writes
``status: failed`` (nothing half-written: the folder is written atomically or not at all).
"""

from __future__ import annotations

import pickle
import sys

from idlab.config.run import RunConfig
from idlab.runs import RunStore


def main(argv: list[str] | None = None) -> int:
    """One rank of a torchrun run (see the module docstring)."""
    from idlab.sweep.execute import execute_run, write_run
    from idlab.training.distributed import env_rank

    study_dir, study_name, rid, cfg_path, device, progress = (argv or sys.argv[1:])[:6]
    with open(cfg_path, "rb") as f:
        run: RunConfig = pickle.load(f)
    store = RunStore(study_dir)
    result, writer = execute_run(run, rid, study_name, device=device, progress=progress == "1",
                                 study_dir=store.study_dir)
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
