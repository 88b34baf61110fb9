"""Random projections: each kind equals its defining matrix, adjoint, gradcheck, unit columns,
determinism, state size and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from idlab.subspace.fastfood import LAYOUTS, BlockFastfoodProjection, FastfoodProjection
from idlab.subspace.hadamard import wht
from idlab.subspace.projections import (
    KINDS,
    DenseProjection,
    Projection,
    SparseProjection,
    make_projection,
)

F64 = torch.float64


def _sylvester(L: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < L:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _fastfood_reference(p: FastfoodProjection) -> torch.Tensor:
    """Li et al.'s formula with dense matrices: (H G Pi H B pad_L)[:D] / (||G|| sqrt(D)), (D, d)."""
    b_full, perm, _ = p.factors()
    g = p.diag_g().double()
    L, D, d = p.L, p.D, p.d
    h = _sylvester(L)
    pad = torch.eye(L, d, dtype=F64)  # (L, d)
    pi = torch.eye(L, dtype=F64)[perm]  # (Pi v)_i = v[perm_i]
    full = h @ torch.diag(g) @ pi @ h @ torch.diag(b_full.double()) @ pad  # (L, d)
    return full[:D] / (g.norm() * math.sqrt(D))


def _all_projections(D: int = 300, d: int = 7, seed: int = 0) -> list[Projection]:
    return [
        make_projection("dense", D, d, seed, dtype=F64),
        DenseProjection(D, d, seed, None, F64, cache_limit=0),  # regenerated blocks
        make_projection("sparse", D, d, seed, dtype=F64),
        make_projection("fastfood", D, d, seed, dtype=F64, layout="global"),
        make_projection("fastfood", D, d, seed, dtype=F64, layout="global", fastfood_state="none"),
        make_projection("fastfood", D, d, seed, dtype=F64, layout="global", fastfood_state="index"),
        make_projection("fastfood", D, d, seed, dtype=F64, layout="global", keep_workspace=False),
        make_projection("fastfood", D, d, seed, dtype=F64),  # blocks, one segment
        make_projection("fastfood", D, d, seed, dtype=F64, segments=(D - 3 - D // 3, 3, D // 3), block_size=8),
    ]


def _ids() -> list[str]:
    return [
        "dense", "dense-regen", "sparse", "fastfood", "fastfood-nocache", "fastfood-index",
        "fastfood-nows", "blocks", "blocks-small-pieces",
    ]


@pytest.mark.parametrize("D,d", [(300, 7), (512, 7), (1000, 1000), (1, 1)])
def test_fastfood_equals_li_formula(D: int, d: int) -> None:
    for cache in ("all", "index", "none"):
        p = make_projection("fastfood", D, d, seed=3, dtype=F64, layout="global", fastfood_state=cache)
        assert isinstance(p, FastfoodProjection)
        ref = _fastfood_reference(p)
        torch.testing.assert_close(p.explicit(), ref, rtol=1e-10, atol=1e-12)


def test_fastfood_unpacked_wide_b_equals_formula() -> None:
    # d = 9000 -> b = 2^14 > 2^13: idx and G stored separately (no packing)
    p = make_projection("fastfood", 9000, 9000, seed=1, dtype=F64, layout="global")
    assert isinstance(p, FastfoodProjection) and not p.packed
    x = torch.randn(9000, dtype=F64)
    b_full, perm, g = p.factors()
    assert torch.equal(p.diag_g(), g)
    z = torch.zeros(p.L, dtype=F64)
    z[:9000] = x * b_full[:9000].double()
    ref = wht(g.double() * wht(z)[perm])[:9000] / (g.double().norm() * math.sqrt(9000))
    torch.testing.assert_close(p(x), ref, rtol=1e-10, atol=1e-12)


def test_dense_equals_normalised_gaussian_blocks() -> None:
    p = make_projection("dense", 300, 7, seed=5, dtype=F64)
    assert isinstance(p, DenseProjection)
    z = torch.cat([p.block(k) for k in range(p.num_blocks)]).double()  # (D, d)
    torch.testing.assert_close(p.explicit(), z / z.norm(dim=0), rtol=1e-6, atol=1e-7)
    regen = DenseProjection(300, 7, 5, None, F64, cache_limit=0)
    assert not regen.cached
    torch.testing.assert_close(regen.explicit(), z / z.norm(dim=0), rtol=1e-12, atol=1e-12)


def test_dense_regenerated_blocks_many_blocks() -> None:
    # block_rows < D: several blocks, regenerated mode equals the cached matrix
    import idlab.subspace.dense as pr

    old = pr.DENSE_BLOCK_ENTRIES
    pr.DENSE_BLOCK_ENTRIES = 64
    try:
        cached = DenseProjection(1000, 5, 2, None, torch.float32)
        regen = DenseProjection(1000, 5, 2, None, torch.float32, cache_limit=0)
    finally:
        pr.DENSE_BLOCK_ENTRIES = old
    assert cached.num_blocks > 10
    x = torch.randn(5)
    torch.testing.assert_close(regen(x), cached(x), rtol=1e-5, atol=1e-6)
    assert regen.state_bytes() == 5 * 4


def test_sparse_equals_its_sparse_matrix() -> None:
    p = make_projection("sparse", 300, 7, seed=2, dtype=F64)
    assert isinstance(p, SparseProjection)
    m = p.sparse_matrix().to_dense()  # (D, d)
    x = torch.randn(7, dtype=F64)
    torch.testing.assert_close(p(x), m @ x)
    nz = (m != 0).sum(0)
    assert bool((nz >= 1).all())
    # nonzeros of a column all have magnitude 1/sqrt(k_j)
    for j in range(7):
        col = m[:, j]
        torch.testing.assert_close(
            col[col != 0].abs(), torch.full((int(nz[j]),), nz[j].item() ** -0.5, dtype=F64)
        )


def test_sparse_density_and_distinct_rows() -> None:
    D, d = 1 << 16, 64
    p = make_projection("sparse", D, d, seed=0)
    assert isinstance(p, SparseProjection)
    density = p.nnz / (D * d)
    assert abs(density * math.sqrt(D) - 1) < 0.05
    rows, cols, _ = p.coo()
    assert torch.unique(cols * D + rows).numel() == p.nnz


@pytest.mark.parametrize("idx", range(len(_ids())), ids=_ids())
def test_adjoint_identity(idx: int) -> None:
    p = _all_projections()[idx]
    x = torch.randn(p.d, dtype=F64, requires_grad=True)
    y = torch.randn(p.D, dtype=F64)
    px = p(x)
    (pty,) = torch.autograd.grad(px, x, grad_outputs=y)
    torch.testing.assert_close(torch.dot(px.detach(), y), torch.dot(x.detach(), pty))
    # and P^T y equals the explicit matrix's transpose applied to y
    torch.testing.assert_close(pty, p.explicit().T @ y)


@pytest.mark.parametrize("idx", range(len(_ids())), ids=_ids())
def test_gradcheck(idx: int) -> None:
    p = _all_projections(D=40, d=5)[idx]
    x = torch.randn(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(p, (x,))


@pytest.mark.parametrize("kind,layout", [(k, "global") for k in KINDS] + [("fastfood", "blocks")])
def test_unit_columns_at_2_16(kind: str, layout: str) -> None:
    # D just below 2^16 so Fastfood truncates L = 2^16 to D (at D = L its columns are exactly unit)
    D, d = (1 << 16) - 1000, 24
    p = make_projection(kind, D, d, seed=0, layout=layout)
    norms = p.explicit(F64).norm(dim=0)  # (d,)
    assert abs(norms.mean().item() - 1) < 0.01
    assert (norms - 1).abs().max().item() < 0.05


@pytest.mark.parametrize("kind,layout", [(k, "global") for k in KINDS] + [("fastfood", "blocks")])
def test_determinism(kind: str, layout: str) -> None:
    x = torch.randn(7)
    a = make_projection(kind, 300, 7, seed=11, layout=layout)(x)
    b = make_projection(kind, 300, 7, seed=11, layout=layout)(x)
    c = make_projection(kind, 300, 7, seed=12, layout=layout)(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (300,)


def test_fastfood_state_bytes() -> None:
    D, d = 1 << 16, 100
    p = make_projection("fastfood", D, d, layout="global")
    assert p.state_bytes() == 4 * D + 4 * d  # packed word (L,) int32 + B[:d] float32
    q = make_projection("fastfood", D, d, layout="global", fastfood_state="none")
    assert q.state_bytes() == 4 * d
    x = torch.randn(d)
    torch.testing.assert_close(p(x), q(x))


def test_fastfood_workspace_reused_and_released() -> None:
    p = make_projection("fastfood", 4096, 10, layout="global")
    assert isinstance(p, FastfoodProjection)
    x = torch.randn(10, requires_grad=True)
    y1 = p(x)
    y2 = p(x)  # second call must not clobber the first output
    torch.testing.assert_close(y1, y2)
    y1.sum().backward()
    assert p.workspace_bytes() == 2 * 4096 * 4 + 4096 * 8  # two (L,) floats, one int64 chunk
    p.release_workspace()
    assert p.workspace_bytes() == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fastfood_d_greater_than_D_raises(layout: str) -> None:
    with pytest.raises(ValueError, match=rf"layout '{layout}'.*d=20 > D=10.*use d <= 10"):
        make_projection("fastfood", 10, 20, layout=layout)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="known kinds: dense, sparse, fastfood"):
        make_projection("gaussian", 10, 2)
    with pytest.raises(ValueError, match="D > 0"):
        make_projection("dense", 0, 2)
    with pytest.raises(ValueError, match="d > 0"):
        make_projection("sparse", 10, -1)
    p = make_projection("dense", 10, 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        p(torch.randn(3))


def test_float32_outputs_and_attributes() -> None:
    assert isinstance(make_projection("fastfood", 100, 4), BlockFastfoodProjection)  # the default layout
    for kind in KINDS:
        p = make_projection(kind, 100, 4, seed=9)
        assert (p.kind, p.D, p.d, p.seed) == (kind, 100, 4, 9)
        assert p(torch.randn(4)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,layout", [(k, "global") for k in KINDS] + [("fastfood", "blocks")])
def test_cuda_matches_cpu(kind: str, layout: str) -> None:
    x = torch.randn(50, dtype=F64)
    cpu = make_projection(kind, 5000, 50, seed=4, dtype=F64, layout=layout)
    gpu = make_projection(kind, 5000, 50, seed=4, dtype=F64, device="cuda", layout=layout)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x))


def test_dense_cache_limit_option() -> None:
    big = make_projection("dense", 5000, 40, seed=1, dense_cache_limit=1 << 20)
    small = make_projection("dense", 5000, 40, seed=1, dense_cache_limit=0)
    assert big.cached and not small.cached  # type: ignore[attr-defined]
    t = torch.randn(40)
    torch.testing.assert_close(big(t), small(t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dense_cache_limit must be >= 0"):
        make_projection("dense", 10, 2, dense_cache_limit=-1)


@pytest.mark.parametrize("packed", [True, False])
def test_fastfood_chunked_index_passes_match_explicit(
    monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """Many index chunks of several rows give the same P and P^T as the explicit matrix."""
    import idlab.subspace.fastfood_global as projections

    monkeypatch.setattr(projections, "FASTFOOD_CHUNK", 32)
    monkeypatch.setattr(projections, "FASTFOOD_ROWS", 4)
    if not packed:
        monkeypatch.setattr(projections, "FASTFOOD_PACK_MAX_BITS", 2)
    D, d = 300, 12  # L = 512: 16 chunks of 4 x 8
    p = make_projection("fastfood", D, d, seed=3, dtype=F64, layout="global")
    assert isinstance(p, FastfoodProjection) and p.packed is packed
    m = _fastfood_reference(p)  # (D, d) from dense H, G, Pi, B
    torch.testing.assert_close(p.explicit(), m, rtol=1e-10, atol=1e-12)
    x = torch.randn(d, dtype=F64, requires_grad=True)
    y = p(x)
    torch.testing.assert_close(y, m @ x.detach())
    g = torch.randn(D, dtype=F64)
    y.backward(g)
    torch.testing.assert_close(x.grad, m.T @ g)


@pytest.mark.parametrize("d", [100, 9000])  # packed word / separate idx and G
def test_fastfood_state_modes_same_p_bit_for_bit(d: int) -> None:
    """'all', 'index' and 'none' give identical float32 outputs and gradients."""
    D = 3 * 2**12 + 5  # L = 2^14, far from a power of two
    x = torch.randn(d)
    g = torch.randn(D)
    outs = []
    for mode in ("all", "index", "none"):
        p = make_projection("fastfood", D, d, seed=5, layout="global", fastfood_state=mode)
        xx = x.clone().requires_grad_(True)
        y = p(xx)
        y.backward(g)
        y2 = p(x)  # a second call reuses the workspace (and redraws G in 'index' mode)
        outs.append((y.detach(), xx.grad, y2))
    for y, gx, y2 in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(gx, outs[0][1]) and torch.equal(y2, y)


@pytest.mark.parametrize("D", [2**16 + 1, 3 * 2**15, 2**16])
def test_fastfood_index_state_under_4_bytes_per_parameter(D: int) -> None:
    p = make_projection("fastfood", D, 1000, layout="global", fastfood_state="index")
    assert isinstance(p, FastfoodProjection)
    assert p.idx.dtype == torch.int16
    gen_state = torch.Generator().get_state().numel()  # CPU generator state (bytes)
    assert p.state_bytes() == 2 * p.L + gen_state + 4 * 1000
    assert (p.state_bytes() - gen_state) / D < 4.07  # 2 L / D < 4, plus B's first d signs
    full = make_projection("fastfood", D, 1000, layout="global")
    assert full.state_bytes() > p.state_bytes()


def test_fastfood_bad_state_and_layout() -> None:
    with pytest.raises(ValueError, match=r"fastfood_state='idx' is not allowed with layout 'global'.*all, index, none"):
        make_projection("fastfood", 100, 10, layout="global", fastfood_state="idx")
    with pytest.raises(ValueError, match=r"fastfood_state=True"):  # no bool aliases any more
        make_projection("fastfood", 100, 10, layout="global", fastfood_state=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'all' is not allowed with layout 'blocks'.*layout='global'"):
        make_projection("fastfood", 100, 10, fastfood_state="all")
    with pytest.raises(ValueError, match=r"unknown projection layout 'tiles'; allowed: blocks, pow2, global"):
        make_projection("fastfood", 100, 10, layout="tiles")
    with pytest.raises(TypeError, match="cache_state"):  # the old name is gone
        make_projection("fastfood", 100, 10, cache_state="all")  # type: ignore[call-arg]
