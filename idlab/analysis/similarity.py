"""Subspace similarity phi between two updates (Hu et al. 2021, Section 7.2).

For U1 (k, p1) and U2 (k, p2) with orthonormal columns (singular vectors, best first)::

    phi(i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j),   1 <= i <= p1, 1 <= j <= p2

phi lies in [0, 1]: 1 when one span contains the other, 0 when they are orthogonal.
Computed for every (i, j) at once from M = U1^T U2 (p1, p2): the squared norm of the
top-left i x j block is the 2-D cumulative sum of M**2, so the whole map costs one
matrix product and two cumsums.

Conventions (docs/SCIENCE.md section 3):

- Hu et al. compare the *right* singular vectors (in R^{d_in}, the row space of A);
  ``subspace_of(..., side="right")`` is the default. ``side="left"`` takes the left
  singular vectors (in R^{d_out}, the column space of B). The paper's text and figure
  labels are not consistent about which side is meant; record the side with every result.
- ``source="factor"`` is phi by the paper's own definition (Hu et al. eq. 4): the
  right-singular vectors of the LoRA factor A alone (left side: of B alone). It is the
  default of `idlab.analysis.export.analyze_runs`, ``idlab analyze`` and the Section 7
  reproduction. ``source="update"`` (this function's default, because it also serves dense
  updates) takes the singular vectors of Delta W = s B A itself. The two span the same
  r-dimensional space, so phi(p1, p2) agrees, but they order it differently: A's directions
  by A's singular values, Delta W's by the update's, so top-i / top-j cells can differ a lot.
  The update version is invariant to the B/A gauge (B G, G^{-1} A give the same Delta W and
  the same phi), which makes it the one to compare a LoRA run with a dense update (full
  fine-tuning, a merged PEFT update); the factor version says what A learned, as the paper
  measures it. Record the source with every result (column ``source`` of the analysis tables).
- Two independent uniformly random subspaces of R^k give E[phi(i, j)] = max(i, j) / k
  exactly (E||U1_i^T U2_j||_F^2 = i j / k). Report it beside every phi map.
- Appendix G writes phi as "(1/p)(1 - d^2)"; that is a typo for 1 - d^2 / p with
  d the projection-metric Grassmann distance. This module implements the Section 7.2 form.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from idlab.analysis.spectra import Update, check_update, num_singular_values, svd
from idlab.deltas.lowrank import LowRankDelta

Side = Literal["right", "left"]
#: whose singular vectors phi compares: the LoRA factor (Hu et al. eq. 4) or the update Delta W
Source = Literal["factor", "update"]


def _check_orthonormal(U: Tensor, name: str, atol: float) -> None:
    G = U.T @ U
    err = float((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max()) if G.numel() else 0.0
    if err > atol:
        raise ValueError(
            f"{name} (shape {tuple(U.shape)}) does not have orthonormal columns "
            f"(max |U^T U - I| = {err:.2e} > atol={atol:g}); pass singular vectors "
            "(e.g. from subspace_of) or call subspace_similarity(..., orthonormalize=True)"
        )


def subspace_similarity(
    U1: Tensor,
    U2: Tensor,
    orthonormalize: bool = False,
    atol: float = 1e-4,
) -> Tensor:
    """The full phi map, phi[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j).

    Args:
        U1: (k, p1) orthonormal columns, most important first.
        U2: (k, p2) orthonormal columns, most important first.
        orthonormalize: replace each input by the Q of its reduced QR first (keeps the
            nested spans span(U[:, :i])); otherwise columns must be orthonormal to ``atol``.
        atol: tolerance of the orthonormality check, max |U^T U - I|.

    Returns:
        phi, shape (p1, p2), float64, entries in [0, 1].
    """
    for name, U in (("U1", U1), ("U2", U2)):
        if not isinstance(U, Tensor) or U.ndim != 2:
            raise ValueError(f"{name} must be a 2-D Tensor (k, p), got {getattr(U, 'shape', U)!r}")
        if U.shape[1] > U.shape[0]:
            raise ValueError(
                f"{name} has shape {tuple(U.shape)}: more columns than rows cannot be "
                "orthonormal; pass (k, p) with p <= k (columns are the basis vectors)"
            )
        if not torch.isfinite(U).all():
            raise ValueError(f"{name} contains NaN/inf; check the update it came from")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(
            f"U1 {tuple(U1.shape)} and U2 {tuple(U2.shape)} live in different spaces "
            f"(k={U1.shape[0]} vs {U2.shape[0]}); compare the same side of updates of one module"
        )
    A = U1.detach().to(torch.float64)
    B = U2.detach().to(torch.float64)
    if orthonormalize:
        A = torch.linalg.qr(A, mode="reduced").Q
        B = torch.linalg.qr(B, mode="reduced").Q
    else:
        _check_orthonormal(A, "U1", atol)
        _check_orthonormal(B, "U2", atol)
    M2 = (A.T @ B) ** 2  # (p1, p2)
    C = M2.cumsum(0).cumsum(1)  # C[i-1, j-1] = ||U1[:, :i]^T U2[:, :j]||_F^2
    i = torch.arange(1, C.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, C.shape[1] + 1, dtype=torch.float64)[None, :]
    return (C / torch.minimum(i, j)).clamp_(0.0, 1.0)


def subspace_of(
    delta: Update,
    side: Side = "right",
    r: int | None = None,
    source: Source = "update",
) -> Tensor:
    """Orthonormal basis of an update's top-r singular subspace, shape (k, r), float64.

    Args:
        delta: `LowRankDelta` or dense (d_out, d_in).
        side: "right" (default, Hu et al. 7.2): right singular vectors V[:, :r], k = d_in;
            "left": left singular vectors U[:, :r], k = d_out.
        r: number of directions (None: all ``num_singular_values(delta)``).
        source: "update" -- singular vectors of Delta W; "factor" -- of A (right) or B (left)
            alone, as the paper describes (LowRankDelta only).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} is unknown; use 'right' (from A) or 'left' (from B)")
    check_update(delta)
    n = num_singular_values(delta)
    r = n if r is None else r
    if not isinstance(r, int) or not 1 <= r <= n:
        raise ValueError(
            f"r={r!r} must be an int in [1, {n}] -- the number of singular directions available "
            "for this update (its rank r for a LowRankDelta, min(d_out, d_in) when dense)"
        )
    if source == "factor":
        if not isinstance(delta, LowRankDelta):
            raise ValueError("source='factor' needs a LowRankDelta; use source='update' for dense")
        if side == "right":
            Vh = torch.linalg.svd(delta.A.detach().to(torch.float64), full_matrices=False).Vh
            return Vh[:r].T.contiguous()
        U = torch.linalg.svd(delta.B.detach().to(torch.float64), full_matrices=False).U
        return U[:, :r].contiguous()
    if source != "update":
        raise ValueError(f"source={source!r} is unknown; use 'update' or 'factor'")
    out = svd(delta, k=r)
    return out.Vh.T.contiguous() if side == "right" else out.U.contiguous()


def random_baseline(i: int, j: int, k: int) -> float:
    """E[phi(i, j)] for two independent uniformly random subspaces of R^k: max(i, j) / k."""
    if not (1 <= i <= k and 1 <= j <= k):
        raise ValueError(f"need 1 <= i, j <= k, got i={i}, j={j}, k={k}")
    return max(i, j) / k


def random_baseline_map(p1: int, p2: int, k: int) -> Tensor:
    """The (p1, p2) map of `random_baseline`: entry [i-1, j-1] = max(i, j) / k, float64."""
    if not (1 <= p1 <= k and 1 <= p2 <= k):
        raise ValueError(f"need 1 <= p1, p2 <= k, got p1={p1}, p2={p2}, k={k}")
    i = torch.arange(1, p1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, p2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / k


def random_orthonormal(
    k: int, p: int, generator: torch.Generator, batch: int | None = None
) -> Tensor:
    """Haar-random (k, p) matrices with orthonormal columns (QR of a Gaussian, signs fixed).

    Shape (k, p), or (batch, k, p) when ``batch`` is given. float64.
    """
    shape = (k, p) if batch is None else (batch, k, p)
    G = torch.randn(*shape, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G, mode="reduced")
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def sampled_random_baseline(p1: int, p2: int, k: int, samples: int = 100, seed: int = 0) -> Tensor:
    """Monte-Carlo mean of the phi map over ``samples`` pairs of random subspaces of R^k.

    Returns (p1, p2) float64; converges to `random_baseline_map` (p1, p2, k). All samples
    are drawn and reduced in one batched computation.
    """
    if samples < 1:
        raise ValueError(f"samples={samples} must be >= 1")
    random_baseline_map(p1, p2, k)  # validates the sizes
    g = torch.Generator().manual_seed(seed)
    U1 = random_orthonormal(k, p1, g, batch=samples)
    U2 = random_orthonormal(k, p2, g, batch=samples)
    C = ((U1.transpose(1, 2) @ U2) ** 2).cumsum(1).cumsum(2).mean(0)  # (p1, p2)
    i = torch.arange(1, p1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, p2 + 1, dtype=torch.float64)[None, :]
    return C / torch.minimum(i, j)
