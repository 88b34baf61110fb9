"""Random projections P (D x d) for subspace training: theta_D = theta_0 + P theta_d.

Li et al. (ICLR 2018), SCIENCE.md section 1. Every implicit column of P has unit length over
all D coordinates. Three kinds, made by `make_projection`:

- "dense": N(0,1) entries, each column divided by its norm. Above `DENSE_CACHE_LIMIT` entries
  the matrix is never held: fixed row blocks of P are regenerated from (seed, block) in the
  forward and again in the backward; only the d column norms are kept.
- "sparse": very sparse random projection (Li, Hastie & Church 2006), density 1/sqrt(D),
  entries +-1, columns normalised; held as compact int32 row indices with the sign folded in.
- "fastfood" (`idlab.subspace.fastfood`): layout "blocks" (default) stacks hashed Fastfood blocks
  over segments of the parameter vector, streamed, with near-zero state; layout "global" is
  Li et al.'s single block y = H G Pi H B pad_L(theta_d), first D entries, divided by
  ||G||_2 sqrt(D).

Dense, sparse and global Fastfood draws come from CPU `torch.Generator`s seeded from `seed`,
then move to `device`; blocks Fastfood hashes integers (exact on every device). So a
projection is the same on every device for the same (kind, layout, D, d, seed).

"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from idlab.subspace.base import DEFAULT_LAYOUT, KINDS, STREAMED_LAYOUTS, Projection
from idlab.subspace.dense import DENSE_CACHE_LIMIT, DenseProjection
from idlab.subspace.sparse import SparseProjection

# ----------------------------------------------------------------------------- factory


def make_projection(
    kind: str,
    D: int,
    d: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str = DEFAULT_LAYOUT,
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
            segment at a time, near-zero state), "pow2" (the same with each segment cut into
            power-of-two pieces where that costs less: `cut_segment`) or "global" (Li et al.'s single block over
            next_pow2(D), bit-identical to idlab's earlier fastfood). See `idlab.subspace.fastfood`.
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
    from idlab.subspace.fastfood import (
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
            "default, 'pow2' the same without padding, 'global' is Li et al.'s single Fastfood block)"
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
    streamed = layout in STREAMED_LAYOUTS
    allowed = BLOCK_STATES if streamed else GLOBAL_STATES
    if not isinstance(fastfood_state, str) or fastfood_state not in ("auto", *allowed):
        raise ValueError(
            f"fastfood_state={fastfood_state!r} is not allowed with layout {layout!r}; allowed: "
            f"auto, {', '.join(allowed)}"
            + (" (the blocks layout hashes B, Pi, G: it has no state to keep; use layout='global' for "
               "'all' / 'index')" if streamed else "")
        )
    if layout == "global":
        state = "all" if fastfood_state == "auto" else fastfood_state
        return FastfoodProjection(
            D, d, seed, device, dtype, fastfood_state=state, keep_workspace=keep_workspace
        )
    return BlockFastfoodProjection(
        D, d, seed, device, dtype, segments=segments,
        block_size=FASTFOOD_BLOCK if block_size is None else block_size, pow2=layout == "pow2",
    )
