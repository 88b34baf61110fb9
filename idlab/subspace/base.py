"""The projection interface every kind implements (`Projection`) and the helpers the kinds share
(seeded generators, `next_pow2`, the dense block size). The kinds import this module; the
factory (`idlab.subspace.projections.make_projection`) sits above them.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for mixing (seed, block) into one seed



#: THE closed lists of the subspace engine (the config schema and every check read these).
ProjectionKind = Literal["dense", "sparse", "fastfood"]
KINDS: tuple[str, ...] = get_args(ProjectionKind)
#: Fastfood layouts: "blocks" (hashed blocks, streamed per tensor), "pow2" (the same, each tensor cut into
#: power-of-two pieces where that saves work: no padding) or "global" (Li et al.'s single block)
Layout = Literal["blocks", "pow2", "global"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: the layouts whose P is a stack of hashed blocks, streamed one tensor at a time
STREAMED_LAYOUTS: tuple[str, ...] = ("blocks", "pow2")
#: THE default layout (study config, `make_projection`, `SubspaceModel`)
DEFAULT_LAYOUT: Layout = "blocks"
#: the layout of a stored Fastfood run config without a "layout" key (made before layouts existed)
LEGACY_LAYOUT: Layout = "global"
#: what a Fastfood projection keeps between calls ("auto": "none" for blocks, "all" for global)
FastfoodState = Literal["auto", "all", "index", "none"]
FASTFOOD_STATES: tuple[str, ...] = get_args(FastfoodState)


def _generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded deterministically from (seed, stream)."""
    return torch.Generator().manual_seed(
        (seed * _MIX + stream * 0x632BE59BD9B4E019 + 1) % (1 << 63)
    )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class Projection(nn.Module):
    """A frozen random linear map R^d -> R^D with unit-length columns.

    Attributes:
        kind: "dense", "sparse" or "fastfood".
        D: output length (number of model parameters).
        d: input length (subspace dimension).
        seed: the seed every random draw derives from.
    """

    kind: str

    def __init__(self, D: int, d: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.D, self.d, self.seed, self.dtype = int(D), int(d), int(seed), dtype

    def forward(self, theta_d: Tensor) -> Tensor:
        """P theta_d: theta_d (d,) -> (D,), differentiable in theta_d."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of persistent state held by this projection (buffers and cached tensors)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def explicit(self, dtype: torch.dtype | None = None) -> Tensor:
        """The D x d matrix, built by applying the projection to the d basis vectors.

        Test utility for small D * d only: allocates D * d entries.
        """
        dev = self._device()
        eye = torch.eye(self.d, dtype=dtype or self.dtype, device=dev)  # (d, d)
        return torch.stack([self(eye[j]) for j in range(self.d)], dim=1)  # (D, d)

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _check_input(self, theta_d: Tensor) -> None:
        if theta_d.shape != (self.d,):
            raise ValueError(
                f"{self.kind} projection expects theta_d of shape ({self.d},), got {tuple(theta_d.shape)}"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, D={self.D}, d={self.d}, seed={self.seed}"
