"""LowRankDelta: a weight update kept in factored form, Delta W = scale * B @ A.

Shared by the LoRA layer (`idlab.methods.lora_peft.lora_deltas`), the analysis package
(`idlab.analysis`, which never forms the dense matrix unless asked) and
`idlab.analysis.to_lora` (which turns any dense update into one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor


@dataclass
class LowRankDelta:
    """A rank-r update Delta W = scale * B @ A of one linear weight.

    Shapes: B (d_out, r), A (r, d_in), Delta W (d_out, d_in) -- the layout of
    ``nn.Linear.weight`` and of PEFT's ``lora_B.weight`` / ``lora_A.weight``.

    Attributes:
        B: left factor, shape (d_out, r).
        A: right factor, shape (r, d_in).
        scale: the LoRA scaling folded into Delta W (alpha / r, or alpha / sqrt(r)
            with rsLoRA).
        base_weight: the frozen W_0 of the adapted module, shape (d_out, d_in), if known.
        name: the module's qualified name, e.g. ``model.layers.3.self_attn.q_proj``.
    """

    B: Tensor
    A: Tensor
    scale: float = 1.0
    base_weight: Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2:
            raise ValueError(
                f"LowRankDelta {self.name!r}: B and A must be 2-D, got B {tuple(self.B.shape)} "
                f"and A {tuple(self.A.shape)}"
            )
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRankDelta {self.name!r}: inner dimensions differ, B is {tuple(self.B.shape)} "
                f"(d_out, r) but A is {tuple(self.A.shape)} (r, d_in); pass B (d_out, r), A (r, d_in)"
            )
        if self.base_weight is not None and tuple(self.base_weight.shape) != self.shape:
            raise ValueError(
                f"LowRankDelta {self.name!r}: base_weight has shape {tuple(self.base_weight.shape)} "
                f"but B @ A has shape {self.shape}"
            )

    @property
    def r(self) -> int:
        """The adapter rank (inner dimension of B @ A)."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the dense update."""
        return (int(self.B.shape[0]), int(self.A.shape[1]))

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense update scale * B @ A, shape (d_out, d_in), in ``dtype`` (default B's)."""
        dtype = dtype or self.B.dtype
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LowRankDelta:
        """A copy with every tensor moved to ``dtype`` / ``device``."""
        bw = self.base_weight.to(device=device, dtype=dtype) if self.base_weight is not None else None
        return LowRankDelta(
            self.B.to(device=device, dtype=dtype),
            self.A.to(device=device, dtype=dtype),
            self.scale,
            bw,
            self.name,
        )


Update: TypeAlias = LowRankDelta | Tensor
"""A weight update: a `LowRankDelta` or a dense Tensor of shape (d_out, d_in)."""


def check_update(delta: object, what: str = "delta") -> tuple[int, int]:
    """Validate an update and return its (d_out, d_in).

    Raises:
        TypeError: ``delta`` is neither a `LowRankDelta` nor a Tensor.
        ValueError: a dense update is not 2-D, or any entry is NaN/inf.
    """
    if isinstance(delta, LowRankDelta):
        if not (torch.isfinite(delta.B).all() and torch.isfinite(delta.A).all()):
            raise ValueError(
                f"{what} {delta.name!r}: LowRankDelta B or A contains NaN/inf; the run that "
                "produced it probably diverged -- drop it or re-run with a smaller learning rate"
            )
        if not math.isfinite(float(delta.scale)):
            raise ValueError(f"{what} {delta.name!r}: scale={delta.scale} is not finite")
        return delta.shape
    if isinstance(delta, Tensor):
        if delta.ndim != 2:
            raise ValueError(
                f"{what}: a dense update must be 2-D (d_out, d_in), got shape {tuple(delta.shape)}; "
                "pass the module's weight difference W_ft - W_0"
            )
        if not torch.isfinite(delta).all():
            n_bad = int((~torch.isfinite(delta)).sum())
            raise ValueError(
                f"{what}: update of shape {tuple(delta.shape)} has {n_bad} NaN/inf entries; the run "
                "that produced it probably diverged -- drop it or re-run with a smaller learning rate"
            )
        return (int(delta.shape[0]), int(delta.shape[1]))
    raise TypeError(
        f"{what} must be a LowRankDelta or a 2-D torch.Tensor, got {type(delta).__name__}"
    )
