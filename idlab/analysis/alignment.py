"""How Delta W relates to W: the amplification factor (Hu et al. 2021, Section 7.3).

With Delta W = U S Vh (thin SVD, U (d_out, n), Vh (n, d_in)) and its top-r directions
U_r = U[:, :r] (d_out, r), Vh_r = Vh[:r] (r, d_in), project W (d_out, d_in) onto them::

    proj_delta  = || U_r^T W Vh_r^T ||_F            (W seen through Delta W's directions)
    proj_weight = || U_W,r^T W V_W,r ||_F = sqrt(sum_{i<=r} s_i(W)^2)   (W's own top r)
    proj_random = || R_1^T W R_2 ||_F                (Haar-random orthonormal R_1, R_2)
    amplification = ||Delta W||_F / proj_delta

Hu et al.'s numbers for orientation (GPT-3 layer 48, W_q, r=4 / r=64): proj_delta 0.32 / 1.90,
proj_weight 21.67 / 37.71, proj_random 0.02 / 0.33, ||W||_F 61.95, ||Delta W||_F 6.91 / 3.57,
amplification about 21.5 / 2.

Scale convention: by default the LoRA scale (alpha / r) is folded into Delta W
(``include_scale=True``), i.e. Delta W is the update the model actually applies. With
``include_scale=False`` a `LowRankDelta` is taken as B @ A; this changes ||Delta W||_F and the
amplification by the factor scale but not the directions. Dense updates carry no scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from idlab.analysis.similarity import random_orthonormal
from idlab.analysis.spectra import Svd, Update, check_update, energy_rank, num_singular_values, svd
from idlab.deltas.lowrank import LowRankDelta


@dataclass(frozen=True)
class AlignmentResult:
    """Projections of W onto the top-r directions of Delta W, of W itself, and of random ones."""

    r: int
    """number of directions projected onto"""
    proj_delta: float
    """||U_r^T W Vh_r^T||_F with U_r, Vh_r from Delta W"""
    proj_weight: float
    """same with W's own top-r singular vectors = sqrt(sum_{i<=r} s_i(W)^2)"""
    proj_random: float
    """same with a Haar-random orthonormal pair (seeded)"""
    weight_fro: float
    """||W||_F"""
    delta_fro: float
    """||Delta W||_F (scale folded in if include_scale)"""
    amplification: float
    """delta_fro / proj_delta (inf when proj_delta == 0)"""
    include_scale: bool
    seed: int

    def as_dict(self) -> dict[str, float | int | bool]:
        """The fields as a plain dict."""
        return asdict(self)


def weight_singular_values(W: Tensor) -> Tensor:
    """Singular values of W (d_out, d_in), descending, float64, via the smaller Gram matrix.

    s_i = sqrt(lambda_i(G)), G = W W^T or W^T W (whichever is smaller); each s_i^2 is exact
    to about 1e-16 * s_1^2, ample for sums of squares such as ``proj_weight``.
    """
    Wd = W.detach().to(torch.float64)
    G = Wd @ Wd.T if Wd.shape[0] <= Wd.shape[1] else Wd.T @ Wd
    lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0.0)
    return lam.sqrt()


def weight_alignment(
    delta: Update,
    W: Tensor,
    r: int | None = None,
    include_scale: bool = True,
    seed: int = 0,
    weight_svals: Tensor | None = None,
    delta_svd: Svd | None = None,
) -> AlignmentResult:
    """Hu et al.'s Section 7.3 analysis of one module.

    Args:
        delta: `LowRankDelta` or dense Delta W, shape (d_out, d_in).
        W: the weight to project, (d_out, d_in) -- Hu et al. use the pretrained W_0.
        r: number of directions; default the LoRA rank for a `LowRankDelta` (capped at
            min(d_out, d_in)), the 90% energy rank of Delta W for a dense update.
        include_scale: fold the LoRA scale into Delta W (default) or use B @ A.
        seed: seed of the random control directions.
        weight_svals: W's singular values (descending) if already known, else computed.
        delta_svd: the full thin `svd` of Delta W (as analysed, scale included or not) if
            already known, else computed.

    Returns:
        `AlignmentResult`.
    """
    shape = check_update(delta)
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"W must be a 2-D Tensor (d_out, d_in), got {getattr(W, 'shape', W)!r}")
    if tuple(W.shape) != shape:
        raise ValueError(
            f"W has shape {tuple(W.shape)} but Delta W has shape {shape}; pass the base weight of "
            "the same module (nn.Linear.weight layout (d_out, d_in))"
        )
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN/inf; pass the module's finite base weight")
    if isinstance(delta, LowRankDelta) and not include_scale:
        delta = LowRankDelta(delta.B, delta.A, 1.0, name=delta.name)
    n = num_singular_values(delta)
    full = svd(delta) if delta_svd is None else delta_svd
    if r is None:
        r = min(delta.r, n) if isinstance(delta, LowRankDelta) else max(1, energy_rank(full.S))
    if not isinstance(r, int) or not 1 <= r <= n:
        raise ValueError(
            f"r={r!r} must be an int in [1, {n}]: Delta W has only {n} singular directions "
            "(its rank r for a LowRankDelta, min(d_out, d_in) when dense); pass a smaller r"
        )
    Wd = W.detach().to(torch.float64)
    U_r, Vh_r = full.U[:, :r], full.Vh[:r]
    proj_delta = float(torch.linalg.matrix_norm(U_r.T @ Wd @ Vh_r.T))
    s_W = weight_singular_values(Wd) if weight_svals is None else weight_svals.to(torch.float64)
    proj_weight = float(torch.sqrt((s_W[:r] ** 2).sum()))
    g = torch.Generator().manual_seed(seed)
    R1 = random_orthonormal(shape[0], r, g)
    R2 = random_orthonormal(shape[1], r, g)
    proj_random = float(torch.linalg.matrix_norm(R1.T @ Wd @ R2))
    delta_fro = float(torch.sqrt((full.S**2).sum()))
    return AlignmentResult(
        r=r,
        proj_delta=proj_delta,
        proj_weight=proj_weight,
        proj_random=proj_random,
        weight_fro=float(torch.linalg.matrix_norm(Wd)),
        delta_fro=delta_fro,
        amplification=delta_fro / proj_delta if proj_delta > 0 else math.inf,
        include_scale=include_scale,
        seed=seed,
    )
