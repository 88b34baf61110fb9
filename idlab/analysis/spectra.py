"""Singular spectra of weight updates and their one-number summaries.

An update is either a `LowRankDelta` (Delta W = scale * B @ A, B (d_out, r), A (r, d_in))
or a dense Tensor (d_out, d_in) such as W_ft - W_0 of full fine-tuning or a subspace run.

For a `LowRankDelta` the SVD is exact and never forms the d_out x d_in matrix
(docs/SCIENCE.md section 4)::

    QR(B) = Q_B R_B,  QR(A^T) = Q_A R_A,  scale * R_B R_A^T = U' S V'^T
    Delta W = (Q_B U') S (Q_A V')^T,   U = Q_B U',  V = Q_A V'

which costs O((d_out + d_in) r^2) instead of O(d_out d_in min(d_out, d_in)).
Everything is computed in float64 unless a caller asks otherwise.

Summaries of a spectrum s_1 >= s_2 >= ... >= 0:

- ``energy_rank(s, p)``: smallest k with sum_{i<=k} s_i^2 >= p * sum_i s_i^2 (Biderman et al. 2024, p = 0.9);
- ``effective_rank(s)``: exp(H(s / sum s)), H the Shannon entropy (Roy & Vetterli 2007);
- ``stable_rank(s)``: sum s_i^2 / s_1^2 = ||M||_F^2 / ||M||_2^2;
- ``nuclear_frobenius_ratio(s)``: sum s_i / sqrt(sum s_i^2) = ||M||_* / ||M||_F, in [1, sqrt(rank)].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from idlab.deltas.lowrank import LowRankDelta, Update, check_update

SvdMethod = Literal["auto", "exact", "randomized"]


class Svd(NamedTuple):
    """A thin SVD M = U @ diag(S) @ Vh.

    Shapes: U (d_out, n), S (n,) descending, Vh (n, d_in), n the number of singular
    values kept (min(r, d_out, d_in) for a `LowRankDelta`, min(d_out, d_in) for a dense
    update, or k when asked for the top k).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


def num_singular_values(delta: Update) -> int:
    """How many singular values `svd` returns without ``k``: min(r, d_out, d_in) for a
    `LowRankDelta` (the rest are exactly zero), min(d_out, d_in) for a dense update."""
    d_out, d_in = check_update(delta)
    if isinstance(delta, LowRankDelta):
        return min(delta.r, d_out, d_in)
    return min(d_out, d_in)


def _check_k(delta: Update, k: int | None) -> None:
    if k is None:
        return
    n = num_singular_values(delta)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (or None for every singular value)")
    if k > n:
        kind = (
            f"a LowRankDelta of rank r={delta.r} and shape {delta.shape}"
            if isinstance(delta, LowRankDelta)
            else f"a dense update of shape {tuple(delta.shape)}"
        )
        raise ValueError(
            f"k={k} exceeds the {n} singular values available for {kind}; pass k <= {n} "
            "(the remaining singular values are exactly zero)"
        )


def factored_svd(delta: LowRankDelta, dtype: torch.dtype = torch.float64) -> Svd:
    """Exact thin SVD of Delta W = scale * B @ A without forming it.

    QR(B) = Q_B R_B (Q_B (d_out, r1)), QR(A^T) = Q_A R_A (Q_A (d_in, r2)),
    SVD of the (r1, r2) core scale * R_B R_A^T = U' S V'^T; U = Q_B U' (d_out, n),
    Vh = V'^T Q_A^T (n, d_in), n = min(r, d_out, d_in). Cost O((d_out + d_in) r^2).
    """
    check_update(delta)
    B = delta.B.detach().to(dtype)
    A = delta.A.detach().to(dtype)
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")  # (d_out, r1), (r1, r)
    Q_A, R_A = torch.linalg.qr(A.T, mode="reduced")  # (d_in, r2), (r2, r)
    core = float(delta.scale) * (R_B @ R_A.T)  # (r1, r2)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return Svd(Q_B @ Uc, S, Vhc @ Q_A.T)


def _dense(delta: Tensor, dtype: torch.dtype) -> Tensor:
    return delta.detach().to(dtype)


def svd(
    delta: Update,
    k: int | None = None,
    method: SvdMethod = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Svd:
    """Thin SVD Delta W = U diag(S) Vh of an update, optionally only the top k triplets.

    Args:
        delta: `LowRankDelta` (factored, exact, never dense) or Tensor (d_out, d_in).
        k: keep the top k triplets (None: all ``num_singular_values(delta)``).
        method: "auto"/"exact" -- exact (factored for low-rank, LAPACK for dense);
            "randomized" -- for a dense update with k given, a randomized range finder
            (``torch.svd_lowrank``, k + 10 samples, 4 power iterations); approximate.
        dtype: compute dtype (float64 by default).
        seed: seed of the randomized range finder.

    Returns:
        `Svd` (U (d_out, n), S (n,), Vh (n, d_in)), S descending.
    """
    check_update(delta)
    _check_k(delta, k)
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method={method!r} is unknown; use 'auto', 'exact' or 'randomized'")
    if isinstance(delta, LowRankDelta):
        out = factored_svd(delta, dtype)
    elif method == "randomized":
        if k is None:
            raise ValueError("method='randomized' needs k (the number of top triplets); pass k")
        M = _dense(delta, dtype)
        q = min(k + 10, min(M.shape))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(M, q=q, niter=4)
        out = Svd(U, S, V.T)
    else:
        U, S, Vh = torch.linalg.svd(_dense(delta, dtype), full_matrices=False)
        out = Svd(U, S, Vh)
    if k is not None:
        out = Svd(out.U[:, :k], out.S[:k], out.Vh[:k])
    return out


def singular_values(
    delta: Update,
    k: int | None = None,
    method: SvdMethod = "auto",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Tensor:
    """Singular values of an update, descending, shape (n,) in ``dtype``.

    n = min(r, d_out, d_in) for a `LowRankDelta` (factored SVD, exact; the others are 0),
    min(d_out, d_in) for a dense update (``torch.linalg.svdvals``), or k if given.
    ``method="randomized"`` with k uses a randomized top-k SVD for dense updates.
    """
    check_update(delta)
    _check_k(delta, k)
    if isinstance(delta, LowRankDelta) or method == "randomized":
        return svd(delta, k=k, method=method, dtype=dtype, seed=seed).S
    if method not in ("auto", "exact"):
        raise ValueError(f"method={method!r} is unknown; use 'auto', 'exact' or 'randomized'")
    S = torch.linalg.svdvals(_dense(delta, dtype))
    return S[:k] if k is not None else S


def _spectrum(s: Tensor) -> Tensor:
    """Validate a spectrum and return it as float64, sorted descending."""
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s)
    if s.ndim != 1:
        raise ValueError(f"a spectrum must be 1-D (n,), got shape {tuple(s.shape)}")
    s = s.detach().to(torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError("the spectrum contains NaN/inf; check the update it came from")
    if (s < 0).any():
        raise ValueError(
            f"singular values must be >= 0, got min {float(s.min())}; pass singular values, "
            "not eigenvalues"
        )
    return torch.sort(s, descending=True).values


def energy_rank(s: Tensor, p: float = 0.9) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= p * sum_i s_i^2 (0 for an all-zero spectrum).

    ``s`` (n,) is sorted descending first. A relative tolerance of 1e-12 absorbs rounding
    when the threshold is hit exactly (s = [4, 3], p = 0.64 -> 1).
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p={p} must lie in (0, 1]; the usual choice is 0.9")
    e = _spectrum(s) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    hit = cum >= p * total * (1.0 - 1e-12)
    return int(torch.nonzero(hit)[0, 0]) + 1


def energy_cumulative(s: Tensor) -> Tensor:
    """Cumulative energy fraction c_k = sum_{i<=k} s_i^2 / sum_i s_i^2, shape (n,), float64."""
    e = _spectrum(s) ** 2
    total = e.sum()
    if float(total) == 0.0:
        return torch.zeros_like(e)
    return torch.cumsum(e, 0) / total


def effective_rank(s: Tensor) -> float:
    """Entropy effective rank exp(-sum_i q_i log q_i), q = s / sum s (Roy & Vetterli 2007).

    0 log 0 = 0; 0.0 for an all-zero spectrum. Equals m for m equal nonzero values.
    """
    s = _spectrum(s)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    q = s[s > 0] / total
    return float(torch.exp(-(q * torch.log(q)).sum()))


def stable_rank(s: Tensor) -> float:
    """Stable rank sum_i s_i^2 / s_1^2 = ||M||_F^2 / ||M||_2^2 (0.0 for an all-zero spectrum)."""
    s = _spectrum(s)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    return float((s**2).sum() / s[0] ** 2)


def nuclear_frobenius_ratio(s: Tensor) -> float:
    """||M||_* / ||M||_F = sum s_i / sqrt(sum s_i^2), in [1, sqrt(rank)] (0.0 if all zero)."""
    s = _spectrum(s)
    fro = float(torch.sqrt((s**2).sum()))
    if fro == 0.0:
        return 0.0
    return float(s.sum()) / fro


@dataclass(frozen=True)
class SpectrumSummary:
    """One-number summaries of an update's spectrum (see the module docstring)."""

    n: int
    """number of singular values summarised"""
    energy_rank: int
    """k_p at ``p``"""
    p: float
    effective_rank: float
    stable_rank: float
    fro_norm: float
    """||Delta W||_F = sqrt(sum s^2)"""
    spectral_norm: float
    """s_1"""
    nuclear_fro_ratio: float

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict."""
        return asdict(self)


def spectrum_summary(delta_or_s: Update, p: float = 0.9) -> SpectrumSummary:
    """`SpectrumSummary` of an update (`LowRankDelta` or dense (d_out, d_in)) or of a 1-D spectrum.

    A 1-D Tensor is read as singular values; a 2-D Tensor as a dense update.
    """
    if isinstance(delta_or_s, Tensor) and delta_or_s.ndim == 1:
        s = _spectrum(delta_or_s)
    else:
        s = singular_values(delta_or_s)
    return SpectrumSummary(
        n=int(s.numel()),
        energy_rank=energy_rank(s, p),
        p=float(p),
        effective_rank=effective_rank(s),
        stable_rank=stable_rank(s),
        fro_norm=float(torch.sqrt((s**2).sum())),
        spectral_norm=float(s[0]) if s.numel() else 0.0,
        nuclear_fro_ratio=nuclear_frobenius_ratio(s),
    )
