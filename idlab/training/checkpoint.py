"""Mid-run checkpoints of the training loop (``train.checkpoint_every``) and the data order they resume.

A checkpoint holds everything the loop needs to go on as if it had never stopped: the trainable
state of the prepared model (trainable parameters and buffers) and the optimizer, the scheduler,
the data order (`BatchOrder`: its generator and position), the RNG states (torch CPU, CUDA,
python, numpy) and the loop's bookkeeping (curve, best, running loss). ``<folder>/checkpoint.pt``
holds it, written to a temp name and renamed (`idlab.atomic.atomic_file`), with ``meta.json`` (run
id and step) beside it. One process, DDP: the model and optimizer state are full tensors inside
checkpoint.pt (`torch.distributed.checkpoint.state_dict`; rank 0 writes). FSDP2: they are saved
*sharded* by `torch.distributed.checkpoint` (each rank writes its own shards, nothing is gathered)
into ``<folder>/shards-<step>/`` (written under a temp name, renamed once every rank is done, the
previous step's folder removed after checkpoint.pt names the new one), and each rank loads back its own
shards. A checkpoint of another run id is refused
(`check_checkpoint`, `CheckpointMismatch`: a ConfigError). On the CPU a resumed run ends
bit-identical to an uninterrupted one.

This module knows nothing of run folders: the caller (`idlab.sweep.execute`) names the folder.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idlab.atomic import atomic_file, atomic_write_text
from idlab.errors import ConfigError
from idlab.training.distributed import DistContext, all_max

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"


class CheckpointMismatch(ConfigError):
    """A checkpoint folder holds the checkpoint of another run (its run id differs)."""


def _clock() -> float:
    """Seconds of a monotonic clock (the time rule of `CheckpointSpec.due`; tests replace it)."""
    return time.monotonic()


@dataclass(frozen=True)
class CheckpointSpec:
    """Where and how often the loop checkpoints one run.

    Attributes:
        folder: the run's checkpoint folder (created on the first save).
        run_id: stored in the checkpoint; a checkpoint of another run id is refused.
        every: steps between checkpoints (None: by time only).
        every_min: minutes of training between checkpoints (None: by steps only); with both, a
            checkpoint is saved when either is due, and the clock restarts at every save.
    """

    folder: Path
    run_id: str
    every: int | None
    every_min: float | None = None
    _last: list[float] = field(default_factory=list, repr=False, compare=False)  # time of the last save

    def due(self, step: int, ctx: DistContext | None = None, device: torch.device | None = None) -> bool:
        """Whether step ``step`` saves. The time rule is decided on rank 0 and shared (`all_max`), so that
        every rank of a distributed run takes part in the same collective save."""
        if self.every is not None and step % self.every == 0:
            self._last[:] = [_clock()]
            return True
        if self.every_min is None:
            return False
        now = _clock()
        if not self._last:
            self._last.append(now)  # the clock starts at the first step
        late = now - self._last[0] >= 60.0 * self.every_min
        if ctx is not None and ctx.world > 1:
            late = bool(all_max(torch.tensor(float(late and ctx.rank == 0), device=device), ctx))
        if late:
            self._last[:] = [now]
        return late


class BatchOrder:
    """Endless stream of index batches, a fresh permutation per epoch, whose position can be saved."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


def rng_state() -> dict[str, Any]:
    """The RNG states a step may draw from (torch CPU, every CUDA device, python, numpy)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        out["numpy"] = np.random.get_state()  # noqa: NPY002 - the global state a task may draw from
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])  # noqa: NPY002


def _options(full: bool = True, offload: bool = False, frozen: bool = True, strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=offload, ignore_frozen_params=not frozen, strict=strict)


def model_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable model state, optimizer state) as full CPU tensors keyed by parameter name.

    Plain modules, DDP and FSDP2 alike (`torch.distributed.checkpoint.state_dict`); frozen
    parameters are left out (they are rebuilt from the run's config). A collective under DDP /
    FSDP2: every rank calls it, rank 0 gets the tensors.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = _options(offload=True, frozen=False)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)


def load_model_state(model: nn.Module, opt: torch.optim.Optimizer, msd: dict[str, Any], osd: dict[str, Any]) -> None:
    """Load what `model_state` gave into ``model`` / ``opt`` (every rank reads the same file)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = _options(strict=False)
    set_model_state_dict(model, msd, options=opts)
    set_optimizer_state_dict(model, opt, osd, options=opts)


def save_shards(spec: CheckpointSpec, model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> str:
    """FSDP2: every rank writes its shards of the model and optimizer state (`torch.distributed.checkpoint`,
    no gathering) into ``shards-<step>`` of the checkpoint folder; returns that folder's name. A collective:
    every rank calls it; the folder appears (renamed from a temp name) only once all ranks wrote."""
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    name = f"shards-{step}"
    tmp = spec.folder / f".tmp-{name}"
    if rank == 0:
        spec.folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    opts = _options(full=False, frozen=False)
    dcp.save({"model": get_model_state_dict(model, options=opts),
              "optimizer": get_optimizer_state_dict(model, opt, options=opts)}, checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(spec.folder / name, ignore_errors=True)
        tmp.rename(spec.folder / name)
    return name


def load_shards(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """FSDP2: every rank reads its own shards of ``folder`` (`save_shards`) into ``model`` and ``opt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = _options(full=False, frozen=False)
    msd, osd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
    dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(folder))  # in place, each rank its shards
    set_model_state_dict(model, msd, options=_options(full=False, strict=False))
    set_optimizer_state_dict(model, opt, osd, options=_options(full=False, strict=False))


def restore(spec: CheckpointSpec, state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a checkpoint's model and optimizer state: its shards folder (FSDP2) or the full tensors."""
    if state.get("shards"):
        load_shards(spec.folder / str(state["shards"]), model, opt)
    else:
        load_model_state(model, opt, state["model"], state["optimizer"])


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's ``meta.json`` (run id, step), or None when the folder holds none."""
    try:
        meta: dict[str, Any] = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta


def check_checkpoint(folder: Path, run_id: str) -> int | None:
    """The step of the checkpoint in ``folder`` for ``run_id`` (None: there is none).

    Raises `CheckpointMismatch` when it belongs to another run id (another config).
    """
    meta = read_meta(folder)
    if meta is None or not (folder / CHECKPOINT_FILE).exists():
        return None
    if meta.get("run_id") != run_id:
        raise CheckpointMismatch(
            f"checkpoint folder {str(folder)!r} holds a checkpoint of run {meta.get('run_id')!r}, not of run "
            f"{run_id!r} (another config); remove that folder to start the run from step 0")
    return int(meta["step"])


def save(spec: CheckpointSpec, state: dict[str, Any], write: bool) -> None:
    """Write ``state`` (with run id and step) atomically; ``write`` False on ranks other than 0. A state
    naming a shards folder (FSDP2, `save_shards`) makes the other shards folders stale: removed after."""
    if not write:
        return
    import shutil

    spec.folder.mkdir(parents=True, exist_ok=True)
    atomic_file(spec.folder / CHECKPOINT_FILE, lambda tmp: torch.save({**state, "run_id": spec.run_id}, tmp))
    atomic_write_text(spec.folder / META_FILE, json.dumps({"run_id": spec.run_id, "step": state["step"]}))
    keep = state.get("shards")
    for old in spec.folder.glob("shards-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load(spec: CheckpointSpec) -> dict[str, Any] | None:
    """The last checkpoint of ``spec.run_id``, or None; `CheckpointMismatch` for another run id."""
    if check_checkpoint(spec.folder, spec.run_id) is None:
        return None
    state: dict[str, Any] = torch.load(spec.folder / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    if state.get("run_id") != spec.run_id:
        raise CheckpointMismatch(f"checkpoint {str(spec.folder / CHECKPOINT_FILE)!r} belongs to run "
                                 f"{state.get('run_id')!r}, not {spec.run_id!r}; remove the folder to start over")
    return state


__all__ = ["CHECKPOINT_FILE", "BatchOrder", "CheckpointMismatch", "CheckpointSpec", "check_checkpoint", "load",
           "load_model_state", "load_shards", "model_state", "read_meta", "restore", "rng_state", "save", "save_shards",
           "set_rng_state"]
