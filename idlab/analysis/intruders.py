"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion
of equivalence").

Take the top-k left singular vectors u_1..u_k of the fine-tuned weight W_ft (d_out, d_in)
and every left singular vector w_1..w_n of the pretrained W_0 (n = min(d_out, d_in)). The
i-th vector is an intruder when

    max_j |cos(u_i, w_j)| = max_j |u_i^T w_j| < eps          (k = 10, eps = 0.5 in the paper)

``side="right"`` does the same with right singular vectors (apply to W^T).

Singular vectors are taken from the eigen-decomposition of the smaller Gram matrix in
float64 (W W^T or W^T W; the other side as W V / s), which is several times faster than a
full SVD on the CPU and accurate to ~1e-16 * cond(W)^2 -- far below any eps of interest.
The top-k vectors of W_ft come from a float32 eigensolve refined in float64 (one power
step + Rayleigh-Ritz on k + 10 vectors).
Directions of W_0 with s_j <= 1e-10 * s_1 (numerically null) are dropped from the basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from idlab.analysis.spectra import check_update
from idlab.deltas.lowrank import LowRankDelta

_NULL_TOL = 1e-10


def _top_eigh(G: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the symmetric PSD G (n, n) in descending order: all, or the top k.

    For the top k << n: eigenvectors of G in float32 (several times cheaper than float64),
    then one float64 power step on the top k + 10 of them and a float64 Rayleigh-Ritz
    projection, which restores float64-level accuracy of the top k pairs.
    """
    n = G.shape[0]
    if k is None or 4 * (k + 10) > n:
        lam, X = torch.linalg.eigh(G)
        lam, X = lam.flip(0), X.flip(1)
        return (lam, X) if k is None else (lam[:k], X[:, :k])
    m = k + 10
    X0 = torch.linalg.eigh(G.to(torch.float32)).eigenvectors[:, -m:].to(torch.float64)
    Q = torch.linalg.qr(G @ X0).Q  # one power step, (n, m)
    lam, Y = torch.linalg.eigh(Q.T @ G @ Q)  # Rayleigh-Ritz, ascending
    return lam.flip(0)[:k], (Q @ Y.flip(1))[:, :k]


def left_singular_basis(W: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Left singular vectors and values of W (d_out, d_in), descending, float64.

    Returns (U (d_out, n), s (n,)) with n = min(d_out, d_in) (or the top ``k``), numerically
    null directions (s <= 1e-10 s_1) removed.
    """
    Wd = W.detach().to(torch.float64)
    d_out, d_in = Wd.shape
    if d_out <= d_in:
        lam, U = _top_eigh(Wd @ Wd.T, k)
        s = lam.clamp_min(0.0).sqrt()
    else:
        lam, V = _top_eigh(Wd.T @ Wd, k)
        s = lam.clamp_min(0.0).sqrt()
    keep = s > _NULL_TOL * (float(s[0]) if s.numel() else 0.0)
    s = s[keep]
    if d_out <= d_in:
        U = U[:, keep]
    else:
        U = (Wd @ V[:, keep]) / s[None, :]
    return U, s


@dataclass(frozen=True)
class IntruderResult:
    """Intruder dimensions among the top-k singular vectors of W_ft."""

    count: int
    """number of intruders among the top k"""
    indices: tuple[int, ...]
    """0-based ranks (0 = top singular vector) of the intruders"""
    singular_values: Tensor
    """(count,) singular values of W_ft at those ranks"""
    max_cos: Tensor
    """(k,) max_j |cos| of each top-k vector of W_ft with W_0's singular vectors"""
    k: int
    eps: float
    side: str


def _resolve_ft(W0: Tensor | None, W_ft: Tensor | LowRankDelta) -> tuple[Tensor, Tensor]:
    if isinstance(W_ft, LowRankDelta):
        base = W0 if W0 is not None else W_ft.base_weight
        if base is None:
            raise ValueError(
                f"W_ft is a LowRankDelta {W_ft.name!r} without base_weight and W0 is None; "
                "pass W0 or set LowRankDelta.base_weight"
            )
        check_update(W_ft, "W_ft")
        if tuple(base.shape) != W_ft.shape:
            raise ValueError(
                f"W0 has shape {tuple(base.shape)} but the LowRankDelta has shape {W_ft.shape}; "
                "pass the base weight of the same module"
            )
        base64 = base.detach().to(torch.float64)
        return base64, base64 + W_ft.dense(torch.float64)
    if W0 is None:
        raise ValueError("W0 is None; pass the pretrained weight (d_out, d_in)")
    check_update(W_ft, "W_ft")
    check_update(W0, "W0")
    if W0.shape != W_ft.shape:
        raise ValueError(
            f"W0 has shape {tuple(W0.shape)} but W_ft has shape {tuple(W_ft.shape)}; pass both "
            "weights of the same module"
        )
    return W0.detach().to(torch.float64), W_ft.detach().to(torch.float64)


def intruder_dimensions(
    W0: Tensor | None,
    W_ft: Tensor | LowRankDelta,
    k: int = 10,
    eps: float = 0.5,
    side: Literal["left", "right"] = "left",
    base_basis: Tensor | None = None,
) -> IntruderResult:
    """Find intruder dimensions of a fine-tuned weight.

    Args:
        W0: pretrained weight (d_out, d_in); may be None when ``W_ft`` is a `LowRankDelta`
            with ``base_weight``.
        W_ft: fine-tuned weight (d_out, d_in), or a `LowRankDelta` meaning W0 + Delta W.
        k: number of top singular vectors of W_ft examined (<= min(d_out, d_in)).
        eps: cosine threshold, in (0, 1].
        side: "left" (paper) or "right" singular vectors.
        base_basis: W0's singular vectors on ``side`` as columns, if already computed
            (`left_singular_basis` of W0, or of W0^T for side="right").

    Returns:
        `IntruderResult`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is unknown; use 'left' (paper) or 'right'")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps={eps} must lie in (0, 1]; the paper uses 0.5")
    base, ft = _resolve_ft(W0, W_ft)
    n = min(ft.shape)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(
            f"k={k!r} must be an int in [1, {n}] = [1, min(d_out, d_in)] for weights of shape "
            f"{tuple(ft.shape)}; pass a smaller k"
        )
    if side == "right":
        base, ft = base.T, ft.T
    if base_basis is None:
        base_basis = left_singular_basis(base)[0]
    elif base_basis.shape[0] != base.shape[0]:
        raise ValueError(
            f"base_basis has {base_basis.shape[0]} rows but the {side} singular vectors of W0 "
            f"have {base.shape[0]} entries; pass left_singular_basis of W0 (W0^T for side='right')"
        )
    U_ft, s_ft = left_singular_basis(ft, k=k)
    max_cos = (U_ft.T @ base_basis.to(torch.float64)).abs().amax(dim=1)  # (k,)
    mask = max_cos < eps
    idx = tuple(int(i) for i in torch.nonzero(mask).flatten())
    return IntruderResult(
        count=len(idx),
        indices=idx,
        singular_values=s_ft[mask],
        max_cos=max_cos,
        k=int(U_ft.shape[1]),
        eps=float(eps),
        side=side,
    )
