"""Dense Gaussian projection P (D x d), held as a matrix or regenerated block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from idlab.subspace.base import Projection, _generator

# Dense: cache the matrix when D * d is at most this many entries (64 MiB in float32).
DENSE_CACHE_LIMIT = 1 << 24
# Dense: rows per regenerated block are chosen so a block holds about this many entries.
DENSE_BLOCK_ENTRIES = 1 << 20


# ----------------------------------------------------------------------------- dense


class DenseProjection(Projection):
    """P = Z diag(1/||Z_j||), Z (D, d) with N(0,1) entries.

    Z is defined block by block: rows [k*rb, (k+1)*rb) are `torch.randn(rb, d)` from a generator
    seeded by (seed, k), with rb = max(1, DENSE_BLOCK_ENTRIES // d). The same blocks make the
    cached matrix (D * d <= cache_limit) and the regenerated one, so both modes give the same P.
    Regenerated: forward y = Z (theta / n) and backward g -> (Z^T g) / n, one pass over the
    blocks each, memory O(rb * d); the column norms n (d,) are computed once at construction.
    """

    kind = "dense"
    matrix: Tensor  # (D, d) normalised P, only when cached
    inv_norm: Tensor  # (d,) 1 / column norms, only when regenerated

    def __init__(
        self,
        D: int,
        d: int,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        cache_limit: int = DENSE_CACHE_LIMIT,
    ) -> None:
        super().__init__(D, d, seed, dtype)
        self.block_rows = max(1, DENSE_BLOCK_ENTRIES // d)
        self.cached = D * d <= cache_limit
        if self.cached:
            z = torch.cat([self.block(k) for k in range(self.num_blocks)])  # (D, d)
            p = z / z.double().norm(dim=0).to(z.dtype)
            self.register_buffer("matrix", p.to(device=device, dtype=dtype), persistent=False)
        else:
            sq = torch.zeros(d, dtype=torch.float64)
            for k in range(self.num_blocks):
                sq += self.block(k).double().square().sum(0)
            self.register_buffer(
                "inv_norm", sq.rsqrt().to(device=device, dtype=dtype), persistent=False
            )

    @property
    def num_blocks(self) -> int:
        return -(-self.D // self.block_rows)

    def block(self, k: int) -> Tensor:
        """Rows [k*rb, min((k+1)*rb, D)) of the unnormalised Gaussian Z, float32 on CPU."""
        rows = min(self.block_rows, self.D - k * self.block_rows)
        return torch.randn(rows, self.d, generator=_generator(self.seed, k + 1))  # (rows, d)

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        if self.cached:
            return self.matrix.to(theta_d.dtype) @ theta_d  # (D, d) @ (d,) -> (D,)
        out: Tensor = _DenseRegen.apply(theta_d, self)
        return out


class _DenseRegen(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, theta: Tensor, proj: DenseProjection
    ) -> Tensor:
        ctx.proj = proj  # type: ignore[attr-defined]
        v = theta * proj.inv_norm.to(theta.dtype)  # (d,)
        out = torch.empty(proj.D, dtype=theta.dtype, device=theta.device)  # (D,)
        rb = proj.block_rows
        for k in range(proj.num_blocks):
            z = proj.block(k).to(device=theta.device, dtype=theta.dtype)  # (rows, d)
            torch.mv(z, v, out=out[k * rb : k * rb + z.shape[0]])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None]:
        proj: DenseProjection = ctx.proj  # type: ignore[attr-defined]
        acc = torch.zeros(proj.d, dtype=g.dtype, device=g.device)  # (d,)
        rb = proj.block_rows
        for k in range(proj.num_blocks):
            z = proj.block(k).to(device=g.device, dtype=g.dtype)  # (rows, d)
            acc.addmv_(z.T, g[k * rb : k * rb + z.shape[0]])
        return acc * proj.inv_norm.to(g.dtype), None
