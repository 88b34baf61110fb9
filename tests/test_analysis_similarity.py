"""Known answers for the subspace similarity phi (Hu et al. 2021, Section 7.2)."""

from __future__ import annotations

import pytest
import torch

from idlab.analysis import (
    random_baseline,
    random_baseline_map,
    sampled_random_baseline,
    subspace_of,
    subspace_similarity,
)
from idlab.deltas.lowrank import LowRankDelta


def _basis(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64)).Q


def test_identical_and_orthogonal() -> None:
    Q = _basis(40)
    phi = subspace_similarity(Q[:, :8], Q[:, :8])
    # nested prefixes of the same basis: ||.||^2 = min(i, j)  ->  phi = 1 everywhere
    assert torch.allclose(phi, torch.ones(8, 8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        subspace_similarity(Q[:, :8], Q[:, 8:20]),
        torch.zeros(8, 12, dtype=torch.float64),
        atol=1e-12,
    )
    # containment: span(U1) inside span(U2) -> phi(8, 64) = 1
    Q64 = _basis(100, 1)
    assert float(subspace_similarity(Q64[:, :8], Q64[:, :64])[-1, -1]) == pytest.approx(1.0)


def test_planted_partial_overlap() -> None:
    Q = _basis(50, 2)
    shared = Q[:, :3]
    U1 = torch.cat([shared, Q[:, 3:8]], 1)  # 8 dims, first 3 shared
    U2 = torch.cat([shared, Q[:, 8:13]], 1)  # 8 dims, first 3 shared
    phi = subspace_similarity(U1, U2)
    assert phi.shape == (8, 8)
    assert float(phi[7, 7]) == pytest.approx(3 / 8)
    # top i of U1 vs top j of U2 share min(i, j, 3) directions
    for i in range(1, 9):
        for j in range(1, 9):
            assert float(phi[i - 1, j - 1]) == pytest.approx(min(i, j, 3) / min(i, j), abs=1e-12)
    # shared directions placed last in U2: phi(8, j) = max(0, j - 5) / j
    U2b = torch.cat([Q[:, 8:13], shared], 1)
    phib = subspace_similarity(U1, U2b)
    for j in range(1, 9):
        assert float(phib[7, j - 1]) == pytest.approx(max(0, j - 5) / j, abs=1e-12)
    # one direction at angle theta: phi(1, 1) = cos^2 theta
    th = 0.3
    u = Q[:, :1]
    v = (
        torch.cos(torch.tensor(th, dtype=torch.float64)) * Q[:, :1]
        + torch.sin(torch.tensor(th, dtype=torch.float64)) * Q[:, 1:2]
    )
    assert float(subspace_similarity(u, v)[0, 0]) == pytest.approx(
        float(torch.cos(torch.tensor(th)) ** 2), rel=1e-6
    )


def test_random_baseline() -> None:
    assert random_baseline(8, 64, 1024) == 64 / 1024
    m = random_baseline_map(4, 6, 50)
    assert m.shape == (4, 6) and float(m[3, 1]) == 4 / 50 and float(m[0, 5]) == 6 / 50
    sampled = sampled_random_baseline(4, 8, 40, samples=300, seed=0)
    expected = random_baseline_map(4, 8, 40)
    assert float((sampled - expected).abs().max()) < 0.03
    assert float((sampled.mean() - expected.mean()).abs()) < 0.01


def test_subspace_of_conventions() -> None:
    g = torch.Generator().manual_seed(3)
    B = torch.randn(30, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 20, generator=g, dtype=torch.float64)
    delta = LowRankDelta(B, A, 2.0)
    right = subspace_of(delta, "right")
    left = subspace_of(delta, "left", r=2)
    assert right.shape == (20, 4) and left.shape == (30, 2)
    # right singular vectors span the row space of A, left the column space of B
    P_A = A.T @ torch.linalg.pinv(A.T)
    assert torch.allclose(P_A @ right, right, atol=1e-10)
    P_B = B @ torch.linalg.pinv(B)
    assert torch.allclose(P_B @ left, left, atol=1e-10)
    fac = subspace_of(delta, "right", source="factor")
    assert float(subspace_similarity(right, fac)[-1, -1]) == pytest.approx(1.0)
    dense = subspace_of(delta.dense(torch.float64), "right", r=4)
    assert float(subspace_similarity(right, dense)[-1, -1]) == pytest.approx(1.0)


def test_similarity_bad_inputs() -> None:
    Q = _basis(10)
    with pytest.raises(ValueError, match="different spaces"):
        subspace_similarity(Q[:, :3], _basis(12)[:, :3])
    with pytest.raises(ValueError, match="orthonormal"):
        subspace_similarity(Q[:, :3] * 2, Q[:, :3])
    assert subspace_similarity(Q[:, :3] * 2, Q[:, :3], orthonormalize=True)[
        -1, -1
    ] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="more columns than rows"):
        subspace_similarity(torch.randn(3, 5), torch.randn(3, 2))
    delta = LowRankDelta(torch.randn(10, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"r=4 must be an int in \[1, 3\]"):
        subspace_of(delta, r=4)
    with pytest.raises(ValueError, match="side="):
        subspace_of(delta, side="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k="):
        random_baseline(5, 2, 4)
