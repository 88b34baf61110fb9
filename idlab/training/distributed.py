"""One run on N processes (``train.distributed``): process group, sharding, the per-rank batch slice.

Launched by ``torchrun`` (executor ``torchrun``), every rank runs the same loop: the process
group comes from torchrun's environment (gloo on the CPU, nccl on CUDA), the prepared model is
wrapped by its strategy -- ``fsdp2`` (`torch.distributed.fsdp.fully_shard` on every block of
every ``nn.ModuleList``, then the root; ``MixedPrecisionPolicy`` under bf16-mixed) or ``ddp``
(`torch.nn.parallel.DistributedDataParallel`) -- and each rank takes its slice of every global
batch (`local_slice`), weighting its loss by its share (`loss_weight`) so that the averaged
gradient is the full batch's. The world size changes how a step is computed, not which step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from idlab.errors import ConfigError

Strategy = Literal["none", "ddp", "fsdp2", "auto"]
STRATEGIES: tuple[str, ...] = ("none", "ddp", "fsdp2", "auto")


def env_world_size() -> int:
    """WORLD_SIZE of torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """RANK of torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def resolve_strategy(requested: str, world: int, shardable: bool) -> str:
    """``auto``: none for one process; fsdp2 for a shardable method (full fine-tuning), else ddp.

    Raises ConfigError for fsdp2 on a method that is not shardable.
    """
    if requested not in STRATEGIES:
        raise ConfigError(f"train.distributed: got {requested!r}; allowed: {', '.join(STRATEGIES)}")
    if requested == "fsdp2" and not shardable:
        raise ConfigError("train.distributed: got 'fsdp2' for a method that is not shardable (its trainable "
                          "tensors are not the model's weights); use ddp or auto")
    if requested == "auto":
        return "none" if world == 1 else ("fsdp2" if shardable else "ddp")
    return requested


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, strategy and backend (None: one process)."""

    rank: int = 0
    world: int = 1
    strategy: str = "none"
    backend: str | None = None

    def record(self) -> dict[str, object]:
        """What result.json records (strategy, world size, backend)."""
        return {"strategy": self.strategy, "world_size": self.world, "backend": self.backend}


def setup(requested: str, shardable: bool, device: torch.device) -> DistContext:
    """Resolve the strategy and join torchrun's process group when it needs one."""
    import torch.distributed as dist

    world = env_world_size()
    strategy = resolve_strategy(requested, world, shardable)
    if strategy == "none":
        return DistContext(world=1)
    if world > 1 or "MASTER_ADDR" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return DistContext(dist.get_rank(), dist.get_world_size(), strategy, backend)
    raise ConfigError(f"train.distributed: {strategy!r} needs a launcher (executor torchrun); this process is "
                      "not part of a torchrun group (no WORLD_SIZE / MASTER_ADDR)")


def local_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each rank's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def wrap(model: nn.Module, ctx: DistContext, device: torch.device, precision: str) -> nn.Module:
    """The module the loop trains: DDP over ``model``, or ``model`` itself sharded by FSDP2 (in place)."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if ctx.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ctx.world,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16-mixed" else MixedPrecisionPolicy())
        for mod in model.modules():
            if isinstance(mod, nn.ModuleList):
                for block in mod:
                    fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def inner(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (evaluation runs it on every rank without DDP's hooks)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def local_slice(idx: Tensor, ctx: DistContext) -> Tensor:
    """This rank's examples of a global batch (every world-th, from its rank)."""
    return idx[ctx.rank :: ctx.world] if ctx.world > 1 else idx


def loss_weight(local: int, total: int, ctx: DistContext) -> float:
    """Factor on a rank's mean loss so that the ranks' averaged gradient is the global batch's mean."""
    return local * ctx.world / total if ctx.world > 1 else 1.0


def unit_weight(units: int, ctx: DistContext, device: torch.device) -> float:
    """`loss_weight` for a rank whose mean loss averages ``units`` terms (examples, or response tokens), the
    global count summed over the ranks (a collective; 1.0 on one process)."""
    if ctx.world == 1:
        return 1.0
    total = float(all_sum(torch.tensor(float(units), device=device), ctx))
    return loss_weight(units, int(total), ctx) if total > 0 else 0.0


def all_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum of ``t`` over the ranks (``t`` itself on one process)."""
    if ctx.world > 1:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
    return t


def all_max(t: Tensor, ctx: DistContext) -> Tensor:
    """Maximum of ``t`` over the ranks (``t`` itself on one process)."""
    if ctx.world > 1:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_full(model: nn.Module, ctx: DistContext) -> None:
    """After training under FSDP2: rank 0's parameters become full plain tensors (Delta W, adapters).

    Every rank calls it (a collective); the others keep their shards.
    """
    if ctx.strategy != "fsdp2":
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank != 0:
        return
    for name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            key = f"{name}.{pname}" if name else pname
            value = full.get(key)
            if p is not None and isinstance(value, Tensor):
                mod._parameters[pname] = nn.Parameter(value.to(p.dtype), requires_grad=p.requires_grad)


__all__ = [
    "STRATEGIES",
    "DistContext",
    "Strategy",
    "all_max",
    "all_sum",
    "env_rank",
    "env_world_size",
    "gather_full",
    "inner",
    "local_device",
    "local_slice",
    "loss_weight",
    "resolve_strategy",
    "setup",
    "unit_weight",
    "wrap",
]
