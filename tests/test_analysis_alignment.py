"""Known answers for the amplification factor (Hu et al. 7.3) and intruder dimensions."""

from __future__ import annotations

import math

import pytest
import torch

from idlab.analysis import intruder_dimensions, weight_alignment
from idlab.deltas.lowrank import LowRankDelta


def _orth(k: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, p, generator=g, dtype=torch.float64)).Q


def _weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    U, V = _orth(60, 40, 0), _orth(40, 40, 1)
    s = torch.linspace(10.0, 0.5, 40, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T, U, s, V


def test_amplification_rank1_known() -> None:
    W, U, s, V = _weight()
    c = 7.0
    # Delta W = c u_3 v_3^T as a LowRankDelta with scale 0.5 (B carries 2c)
    delta = LowRankDelta(2 * c * U[:, 2:3], V[:, 2:3].T.contiguous(), 0.5)
    res = weight_alignment(delta, W)
    assert res.r == 1
    assert res.proj_delta == pytest.approx(float(s[2]), rel=1e-10)
    assert res.proj_weight == pytest.approx(float(s[0]), rel=1e-10)
    assert res.delta_fro == pytest.approx(c, rel=1e-12)
    assert res.amplification == pytest.approx(c / float(s[2]), rel=1e-10)
    assert res.weight_fro == pytest.approx(float(s.norm()), rel=1e-10)
    # random directions: E||R1^T W R2||_F^2 = ||W||_F^2 r^2 / (d_out d_in)
    assert 0.0 < res.proj_random < 5 * float(s.norm()) / math.sqrt(60 * 40)
    unscaled = weight_alignment(delta, W, include_scale=False)
    assert unscaled.delta_fro == pytest.approx(2 * c) and unscaled.proj_delta == pytest.approx(
        float(s[2])
    )


def test_amplification_rank2_dense_and_orthogonal() -> None:
    W, U, s, V = _weight()
    dW = 3.0 * U[:, 4:5] @ V[:, 4:5].T + 2.0 * U[:, 9:10] @ V[:, 9:10].T
    res = weight_alignment(dW, W, r=2)
    assert res.proj_delta == pytest.approx(math.sqrt(float(s[4] ** 2 + s[9] ** 2)), rel=1e-10)
    assert res.proj_weight == pytest.approx(math.sqrt(float(s[0] ** 2 + s[1] ** 2)), rel=1e-8)
    assert res.amplification == pytest.approx(math.sqrt(13.0) / res.proj_delta, rel=1e-10)
    # mismatched left/right directions: W maps v_2 to u_2, never to u_1 -> projection 0
    cross = 5.0 * U[:, 0:1] @ V[:, 1:2].T
    r = weight_alignment(cross, W, r=1)
    assert r.proj_delta == pytest.approx(0.0, abs=1e-10) and r.amplification > 1e9


def test_alignment_bad_inputs() -> None:
    W, U, _, V = _weight()
    delta = LowRankDelta(U[:, :2], V[:, :2].T.contiguous())
    with pytest.raises(ValueError, match=r"r=3 must be an int in \[1, 2\]"):
        weight_alignment(delta, W, r=3)
    with pytest.raises(ValueError, match="W has shape"):
        weight_alignment(delta, W[:, :30])
    bad = W.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        weight_alignment(delta, bad)


def test_planted_intruder_found() -> None:
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(100, 80, generator=g, dtype=torch.float64)
    # a unit vector orthogonal to every left singular vector of W0 (column space is 80-dim)
    Q = torch.linalg.qr(W0, mode="complete").Q
    u = Q[:, 90:91]
    v = torch.randn(80, 1, generator=g, dtype=torch.float64)
    v = v / v.norm()
    W_ft = W0 + 100.0 * u @ v.T
    res = intruder_dimensions(W0, W_ft, k=10, eps=0.5)
    assert res.count == 1 and res.indices == (0,)
    assert float(res.max_cos[0]) < 0.1  # W0 v leaks in: ~||W0 v|| / 100
    assert float(res.singular_values[0]) == pytest.approx(
        float(torch.linalg.svdvals(W_ft)[0]), rel=1e-8
    )
    # same update as a LowRankDelta with base_weight
    lr = LowRankDelta(100.0 * u, v.T.contiguous(), 1.0, base_weight=W0)
    res2 = intruder_dimensions(None, lr)
    assert res2.indices == (0,)
    none = intruder_dimensions(W0, W0.clone())
    assert none.count == 0 and torch.allclose(
        none.max_cos, torch.ones(10, dtype=torch.float64), atol=1e-8
    )
    right = intruder_dimensions(W0, W0.clone(), side="right", k=5)
    assert right.count == 0 and right.k == 5


def test_intruder_bad_inputs() -> None:
    W0 = torch.randn(20, 10)
    with pytest.raises(ValueError, match=r"k=11 must be an int in \[1, 10\]"):
        intruder_dimensions(W0, W0, k=11)
    with pytest.raises(ValueError, match="W0 has shape"):
        intruder_dimensions(W0, torch.randn(20, 11))
    with pytest.raises(ValueError, match="without base_weight"):
        intruder_dimensions(None, LowRankDelta(torch.randn(20, 2), torch.randn(2, 10)))
    with pytest.raises(ValueError, match="eps="):
        intruder_dimensions(W0, W0, eps=0.0)
    bad = W0.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        intruder_dimensions(W0, bad)


def test_left_singular_basis_topk_matches_full() -> None:
    from idlab.analysis import left_singular_basis

    g = torch.Generator().manual_seed(7)
    for shape in ((100, 84), (84, 100)):
        W = torch.randn(*shape, generator=g, dtype=torch.float64)
        U, s = left_singular_basis(W)
        Uk, sk = left_singular_basis(W, k=10)  # float32 solve + float64 refinement
        Ud, sd, _ = torch.linalg.svd(W, full_matrices=False)
        assert torch.allclose(s, sd, rtol=1e-9) and torch.allclose(sk, sd[:10], rtol=1e-9)
        assert torch.allclose(
            (Uk.T @ Ud[:, :10]).abs(), torch.eye(10, dtype=torch.float64), atol=1e-7
        )
        assert torch.allclose(
            (U.T @ Ud).abs().diagonal(), torch.ones(min(shape), dtype=torch.float64), atol=1e-6
        )
