"""Random projections P (D x d) for subspace training: theta_D = theta_0 + P theta_d.

Li et al. (ICLR 2018), SCIENCE.md section 1. Every implicit column of P has unit length over
all D coordinates. Three kinds, made by `make_projection`:

- "dense": N(0,1) entries, each column divided by its norm. Above `DENSE_CACHE_LIMIT` entries
  the matrix is never held: fixed row blocks of P are regenerated from (seed, block) in the
  forward and again in the backward; only the d column norms are kept.
- "sparse": very sparse random projection (Li, Hastie & Church 2006), density 1/sqrt(D),
  entries +-1, columns normalised; held as compact int32 row indices with the sign folded in.
- "fastfood" (`idlab.fastfood`): layout "blocks" (default) stacks hashed Fastfood blocks
  over segments of the parameter vector, streamed, with near-zero state; layout "global" is
  Li et al.'s single block y = H G Pi H B pad_L(theta_d), first D entries, divided by
  ||G||_2 sqrt(D).

Dense, sparse and global Fastfood draws come from CPU `torch.Generator`s seeded from `seed`,
then move to `device`; blocks Fastfood hashes integers (exact on every device). So a
projection is the same on every device for the same (kind, layout, D, d, seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

KINDS = ("dense", "sparse", "fastfood")

# Dense: cache the matrix when D * d is at most this many entries (64 MiB in float32).
DENSE_CACHE_LIMIT = 1 << 24
# Dense: rows per regenerated block are chosen so a block holds about this many entries.
DENSE_BLOCK_ENTRIES = 1 << 20
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for mixing (seed, block) into one seed


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


# ----------------------------------------------------------------------------- sparse


class SparseProjection(Projection):
    """Very sparse random projection (Li, Hastie & Church 2006), columns normalised.

    Each entry is nonzero with probability 1/s, s = sqrt(D), with sign +-1 equally likely.
    Column j has k_j ~ Binomial(D, 1/s) distinct rows drawn uniformly; a column drawn empty
    gets one row (k_j >= 1), so every column has unit length. Nonzeros of column j are
    +-1/sqrt(k_j) (the LHC scale sqrt(s) cancels in the normalisation).

    Stored (CSC): `signed_rows` int32 (nnz,) = (row + 1) * sign, column-major, and
    `col_ptr` int64 (d + 1,). Forward y = index_add over rows of v * theta[col]; backward is
    the gather/sum adjoint, both from autograd.
    """

    kind = "sparse"
    signed_rows: Tensor  # (nnz,) int32
    col_ptr: Tensor  # (d + 1,) int64

    def __init__(
        self, D: int, d: int, seed: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> None:
        super().__init__(D, d, seed, dtype)
        gen = _generator(seed)
        p = 1.0 / math.sqrt(D)
        counts = torch.binomial(
            torch.full((d,), float(D), dtype=torch.float64),
            torch.full((d,), p, dtype=torch.float64),
            generator=gen,
        )
        counts = counts.long().clamp_(1, D)  # (d,)
        cols = torch.repeat_interleave(torch.arange(d), counts)  # (nnz,)
        rows = torch.randint(D, (int(counts.sum()),), generator=gen)
        # distinct rows per column: drop duplicates, redraw the shortfall until none is left
        while True:
            key = torch.unique(cols * D + rows)  # sorted by (col, row)
            cols, rows = key // D, key % D
            have = torch.bincount(cols, minlength=d)
            short = counts - have
            if not bool((short > 0).any()):
                break
            extra_cols = torch.repeat_interleave(torch.arange(d), short)
            cols = torch.cat([cols, extra_cols])
            rows = torch.cat([rows, torch.randint(D, (extra_cols.numel(),), generator=gen)])
        signs = torch.randint(0, 2, (rows.numel(),), generator=gen) * 2 - 1
        col_ptr = torch.zeros(d + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(counts, 0)
        self.register_buffer(
            "signed_rows", ((rows + 1) * signs).to(torch.int32).to(device), persistent=False
        )
        self.register_buffer("col_ptr", col_ptr.to(device), persistent=False)

    @property
    def nnz(self) -> int:
        return int(self.signed_rows.numel())

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows int64 (nnz,), cols int64 (nnz,), values (nnz,)) of P, values +-1/sqrt(k_j)."""
        counts = self.col_ptr.diff()  # (d,)
        cols = torch.repeat_interleave(torch.arange(self.d, device=counts.device), counts)
        sr = self.signed_rows.long()
        rows = sr.abs() - 1
        vals = sr.sign().to(self.dtype) * counts.to(self.dtype).rsqrt()[cols]
        return rows, cols, vals

    def sparse_matrix(self) -> Tensor:
        """P as a torch sparse COO tensor (D, d)."""
        rows, cols, vals = self.coo()
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (self.D, self.d), check_invariants=True
        ).coalesce()

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        rows, cols, vals = self.coo()
        contrib = vals.to(theta_d.dtype) * theta_d[cols]  # (nnz,)
        return torch.zeros(self.D, dtype=theta_d.dtype, device=theta_d.device).index_add(
            0, rows, contrib
        )


# ----------------------------------------------------------------------------- factory


def make_projection(
    kind: str,
    D: int,
    d: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = "blocks",
    fastfood_state: str = "auto",
    keep_workspace: bool = True,
    dense_cache_limit: int = DENSE_CACHE_LIMIT,
    segments: Sequence[int] | None = None,
    block_size: int | None = None,
) -> Projection:
    """Build a frozen random projection P (D x d) with unit-length columns (the one factory).

    Args:
        kind: "dense", "sparse" or "fastfood".
        D: number of model parameters (rows of P), > 0.
        d: subspace dimension (columns of P), > 0; fastfood needs d <= D.
        seed: every random draw derives from it (identical on every device).
        device, dtype: where and in which float dtype the forward computes.
        layout: fastfood only, "blocks" (default: stacked hashed Fastfood blocks, streamed one
            segment at a time, near-zero state) or "global" (Li et al.'s single block over
            next_pow2(D), bit-identical to idlab's earlier fastfood). See `idlab.fastfood`.
            Dense and sparse P are defined over all D at once and accept either value.
        fastfood_state: fastfood only, what is kept between calls (never changes P): "auto"
            ("none" for blocks, "all" for global); global: "all" idx and G (4 bytes per padded
            coordinate, fastest), "index" idx only (2 bytes; G redrawn each call), "none"
            nothing of length L (much slower); blocks: "none" (B, Pi, G hashed per call).
        keep_workspace: fastfood global only: reuse two (L,) scratch buffers across calls.
        dense_cache_limit: dense only: hold P as a matrix when D * d is at most this many
            entries (4 bytes each), else regenerate its blocks in every call. Both modes give
            the same P; caching trades memory for speed (e.g. 2**28 = 1 GiB for LeNet-size D).
        segments: fastfood blocks only: lengths summing to D that are computed on their own
            (`SubspaceModel` passes its tensors' sizes); part of P's definition. Default (D,).
        block_size: fastfood blocks only: largest block, a power of two <= 2^24 (default 2^20).

    Returns:
        A `Projection`; ``proj(theta_d)`` maps (d,) -> (D,).
    """
    from idlab.fastfood import (
        BLOCK_STATES,
        FASTFOOD_BLOCK,
        GLOBAL_STATES,
        LAYOUTS,
        BlockFastfoodProjection,
        FastfoodProjection,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(
            f"unknown projection layout {layout!r}; allowed: {', '.join(LAYOUTS)} ('blocks' is the "
            "default, 'global' is Li et al.'s single Fastfood block)"
        )
    if int(D) <= 0:
        raise ValueError(f"projection needs D > 0 (number of parameters), got D={D}")
    if int(d) <= 0:
        raise ValueError(f"projection needs d > 0 (subspace dimension), got d={d}")
    if not dtype.is_floating_point:
        raise ValueError(f"projection dtype must be a float dtype, got {dtype}")
    if kind == "dense":
        if int(dense_cache_limit) < 0:
            raise ValueError(f"dense_cache_limit must be >= 0 entries, got {dense_cache_limit}")
        return DenseProjection(D, d, seed, device, dtype, cache_limit=int(dense_cache_limit))
    if kind == "sparse":
        return SparseProjection(D, d, seed, device, dtype)
    allowed = BLOCK_STATES if layout == "blocks" else GLOBAL_STATES
    if not isinstance(fastfood_state, str) or fastfood_state not in ("auto", *allowed):
        raise ValueError(
            f"fastfood_state={fastfood_state!r} is not allowed with layout {layout!r}; allowed: "
            f"auto, {', '.join(allowed)}"
            + (" (the blocks layout hashes B, Pi, G: it has no state to keep; use layout='global' for "
               "'all' / 'index')" if layout == "blocks" else "")
        )
    if layout == "global":
        state = "all" if fastfood_state == "auto" else fastfood_state
        return FastfoodProjection(
            D, d, seed, device, dtype, fastfood_state=state, keep_workspace=keep_workspace
        )
    return BlockFastfoodProjection(
        D, d, seed, device, dtype, segments=segments,
        block_size=FASTFOOD_BLOCK if block_size is None else block_size,
    )


def __getattr__(name: str) -> Any:
    """``FastfoodProjection`` and ``BlockFastfoodProjection`` now live in `idlab.fastfood`."""
    if name in ("FastfoodProjection", "BlockFastfoodProjection"):
        from idlab import fastfood

        return getattr(fastfood, name)
    raise AttributeError(f"module 'idlab.projections' has no attribute {name!r}")
