"""Known answers for idlab.analysis.spectra (factored SVD, rank summaries, bad input)."""

from __future__ import annotations

import math

import pytest
import torch

from idlab.analysis import (
    effective_rank,
    energy_rank,
    nuclear_frobenius_ratio,
    singular_values,
    spectrum_summary,
    stable_rank,
    svd,
)
from idlab.deltas.lowrank import LowRankDelta


def _lr(d_out: int, d_in: int, r: int, seed: int = 0, scale: float = 0.37) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return LowRankDelta(B, A, scale)


def _proj(X: torch.Tensor) -> torch.Tensor:
    return X @ X.T


@pytest.mark.parametrize("shape", [(200, 90), (64, 300)])
@pytest.mark.parametrize("r", [1, 2, 7, 32, 64])
def test_factored_svd_equals_dense(shape: tuple[int, int], r: int) -> None:
    delta = _lr(*shape, r, seed=r)
    M = delta.dense(torch.float64)
    s_dense = torch.linalg.svdvals(M)
    U, S, Vh = svd(delta)
    n = min(r, *shape)
    assert S.shape == (n,)
    assert float((S - s_dense[:n]).abs().max() / s_dense[0]) < 1e-6
    if n < len(s_dense):
        assert float(s_dense[n:].abs().max()) < 1e-8 * float(s_dense[0])
    # reconstruction and orthonormality
    assert float((U @ torch.diag(S) @ Vh - M).norm() / M.norm()) < 1e-10
    assert torch.allclose(U.T @ U, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    # same subspaces as the dense SVD (projectors onto the well-separated top directions)
    Ud, _, Vhd = torch.linalg.svd(M, full_matrices=False)
    m = min(n, 4)
    gaps_ok = m == n or float(s_dense[m - 1] - s_dense[m]) > 1e-6 * float(s_dense[0])
    if gaps_ok:
        assert torch.allclose(_proj(U[:, :m]), _proj(Ud[:, :m]), atol=1e-7)
        assert torch.allclose(_proj(Vh[:m].T), _proj(Vhd[:m].T), atol=1e-7)
    assert torch.allclose(singular_values(delta), S)


def test_factored_svd_never_forms_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    delta = _lr(50, 40, 3)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("dense() was called")

    monkeypatch.setattr(LowRankDelta, "dense", boom)
    assert singular_values(delta).shape == (3,)


def test_dense_and_randomized() -> None:
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    s = torch.tensor([10.0, 8.0, 6.0, 4.0] + [1e-3] * 56, dtype=torch.float64)
    M = U[:, :60] @ torch.diag(s) @ V.T
    assert torch.allclose(singular_values(M), s, atol=1e-10)
    assert torch.allclose(singular_values(M, k=3), s[:3], atol=1e-10)
    approx = singular_values(M, k=4, method="randomized")
    assert torch.allclose(approx, s[:4], rtol=1e-6)
    out = svd(M.float(), k=2)
    assert out.U.dtype == torch.float64 and out.U.shape == (80, 2) and out.Vh.shape == (2, 60)


def test_energy_rank_known() -> None:
    s = torch.tensor([3.0, 4.0, 0.0, 0.0])  # energies 16, 9 (sorted) of 25
    assert energy_rank(s, 0.64) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 2
    assert energy_rank(torch.ones(10), 0.9) == 9
    assert energy_rank(torch.ones(10), 0.91) == 10
    assert energy_rank(torch.zeros(5)) == 0


def test_effective_stable_nuclear_known() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    s = torch.tensor([3.0, 1.0])  # q = 3/4, 1/4
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(s) == pytest.approx(math.exp(h))
    assert stable_rank(torch.tensor([3.0, 4.0])) == pytest.approx(25 / 16)
    assert stable_rank(torch.ones(5)) == pytest.approx(5.0)
    assert nuclear_frobenius_ratio(torch.tensor([3.0, 4.0])) == pytest.approx(7 / 5)
    assert nuclear_frobenius_ratio(torch.ones(9)) == pytest.approx(3.0)
    summ = spectrum_summary(torch.tensor([4.0, 3.0]))
    assert summ.fro_norm == pytest.approx(5.0) and summ.spectral_norm == 4.0
    assert summ.energy_rank == 2 and summ.n == 2


def test_summary_of_update_matches_direct() -> None:
    delta = _lr(30, 20, 5)
    summ = spectrum_summary(delta)
    assert summ.fro_norm == pytest.approx(float(delta.dense(torch.float64).norm()), rel=1e-10)
    assert summ.stable_rank == pytest.approx(stable_rank(singular_values(delta)))


def test_bad_inputs() -> None:
    delta = _lr(30, 20, 5)
    with pytest.raises(ValueError, match="k=6 exceeds the 5"):
        singular_values(delta, k=6)
    with pytest.raises(ValueError, match="k=21 exceeds the 20"):
        singular_values(torch.randn(30, 20), k=21)
    bad = torch.randn(4, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        singular_values(bad)
    with pytest.raises(ValueError, match="NaN"):
        singular_values(LowRankDelta(torch.full((4, 1), float("nan")), torch.ones(1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="LowRankDelta or a 2-D"):
        singular_values([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs k"):
        svd(torch.randn(5, 5), method="randomized")
    with pytest.raises(ValueError, match=r"p=1\.5"):
        energy_rank(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        stable_rank(torch.tensor([1.0, -1.0]))
