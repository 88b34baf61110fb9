"""Fastfood layout "blocks": equals its defining formula built from dense matrices, never drops a
coordinate of theta_d, unit columns over all D, hashed factors (bijective Pi, zero state, no
other block needed), C++ fast path equal to the torch reference, gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from idlab.subspace import hadamard
from idlab.subspace.fastfood import BlockFastfoodProjection, block_keys, gauss_table, hashed_perm
from idlab.subspace.projections import make_projection
from tests.test_projections import (  # the dense Sylvester matrix, built by its recursion
    F64,
    _sylvester,
)


def _reference(p: BlockFastfoodProjection) -> torch.Tensor:
    """Each block's (H_n G Pi H_c B)[:D_p] * scale with dense Sylvester matrices, stacked: (D, d)."""
    P = torch.zeros(p.D, p.d, dtype=F64)
    for k, (seg, start, ln, n, q) in enumerate(p.pieces()):
        c = min(n, p.b)
        row0 = p.seg_starts[seg] + start
        for j in range(q):
            b, perm, g, scale = p.block_factors(k, j)
            cols = min(c, p.d - j * c)
            pad = torch.eye(c, cols, dtype=F64)  # (c, cols): the chunk, zero padded to c
            u = _sylvester(c) @ torch.diag(b) @ pad  # (c, cols), one period of H B pad
            z = torch.diag(g) @ u[perm % c]  # (n, cols): G Pi
            P[row0 : row0 + ln, j * c : j * c + cols] += (_sylvester(n) @ z)[:ln] * scale
    return P


CASES = [
    (300, 7, None, 1 << 20),  # one piece, d < c
    (300, 7, (100, 3, 197), 64),  # pieces shorter than d: theta_d in chunks
    (1000, 1000, None, 256),  # d = D, four chunks per piece
    (5000, 50, (4000, 1000), 1024),
    (1, 1, None, 1),
]


@pytest.fixture(params=["torch", "cpp"])
def kernel(request: pytest.FixtureRequest) -> str:
    hadamard.set_backend(request.param)
    if request.param == "cpp":
        try:
            hadamard.backend()
        except RuntimeError as e:  # no compiler here: say so (the torch case still runs)
            hadamard.set_backend("auto")
            pytest.skip(f"the C++ kernel needs gcc and ninja to build: {e}")
    yield request.param
    hadamard.set_backend("auto")


@pytest.mark.parametrize("layout", ["blocks", "pow2"])
@pytest.mark.parametrize("D,d,segments,block", CASES)
def test_blocks_equal_dense_formula(kernel: str, D: int, d: int, segments: tuple[int, ...] | None,
                                    block: int, layout: str) -> None:
    p = make_projection("fastfood", D, d, seed=3, dtype=F64, segments=segments, block_size=block, layout=layout)
    assert isinstance(p, BlockFastfoodProjection) and p.layout == layout
    torch.testing.assert_close(p.explicit(), _reference(p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["blocks", "pow2"])
@pytest.mark.parametrize("D,d,segments,block", CASES[:4])
def test_blocks_adjoint_and_gradcheck(kernel: str, layout: str, D: int, d: int, segments: tuple[int, ...] | None,
                                      block: int) -> None:
    p = make_projection("fastfood", D, d, seed=1, dtype=F64, segments=segments, block_size=block, layout=layout)
    m = p.explicit()
    x = torch.randn(d, dtype=F64, requires_grad=True)
    y = torch.randn(D, dtype=F64)
    (pty,) = torch.autograd.grad(p(x), x, grad_outputs=y)
    torch.testing.assert_close(pty, m.T @ y)
    for s in range(len(p.segments)):  # one segment on its own: P_s^T g_s
        sl = p.segment_slice(s)
        torch.testing.assert_close(p.segment_adjoint(y[sl], s), m[sl].T @ y[sl])
        torch.testing.assert_close(p.segment_forward(x.detach(), s), m[sl] @ x.detach())
    small = make_projection("fastfood", 40, 5, seed=2, dtype=F64, segments=(30, 3, 7), block_size=4, layout=layout)
    assert torch.autograd.gradcheck(small, (torch.randn(5, dtype=F64, requires_grad=True),))


def test_short_pieces_drop_no_coordinate() -> None:
    # a 3-long tensor and d = 50: every coordinate of theta_d reaches it (SCIENCE.md section 2)
    p = make_projection("fastfood", 403, 50, seed=0, dtype=F64, segments=(400, 3))
    m = p.explicit()  # (403, 50)
    assert bool((m[400:].abs().sum(0) > 0).all())
    assert bool((m[:400].abs().sum(0) > 0).all())


@pytest.mark.parametrize("segments,block", [(None, 1 << 20), (None, 1 << 12), ((50_000, 10_000, 536, 3, 1), 1 << 14)])
def test_blocks_unit_columns_over_all_D(segments: tuple[int, ...] | None, block: int) -> None:
    D, d = 60_540, 24
    p = make_projection("fastfood", D, d, seed=0, segments=segments, block_size=block)
    norms = p.explicit(F64).norm(dim=0)  # over all D rows
    assert abs(norms.mean().item() - 1) < 0.01
    assert (norms - 1).abs().max().item() < 0.05


def test_unit_columns_exact_when_pieces_are_powers_of_two() -> None:
    # D_p = n_p: ||column||^2 = sum_p n_p ||G_p||^2 / (||G_p||^2 D) = 1 exactly
    p = make_projection("fastfood", 4096, 16, seed=5, dtype=F64, segments=(2048, 1024, 1024), block_size=1024)
    torch.testing.assert_close(p.explicit().norm(dim=0), torch.ones(16, dtype=F64))


def test_pow2_layout_cuts_tensors_into_exact_power_of_two_pieces() -> None:
    """Known answers of `cut_segment`: MiniLM's shapes become exact pieces where that costs less; the
    transformed coordinates of the whole model drop to D (plus the small remainders' padding)."""
    from idlab.subspace.fastfood import cut_segment, piece_cost

    bs = 1 << 20
    assert cut_segment(147_456, bs, 10_000, pow2=False) == [(0, 147_456)]  # padded to 2^18
    assert cut_segment(147_456, bs, 10_000, pow2=True) == [(0, 1 << 17), (1 << 17, 1 << 14)]  # 2^17 + 2^14
    assert cut_segment(589_824, bs, 10_000, pow2=True) == [(0, 1 << 19), (1 << 19, 1 << 16)]
    assert cut_segment(3 * bs + 5, bs, 1, pow2=True)[:3] == [(0, bs), (bs, bs), (2 * bs, bs)]
    assert cut_segment(384, bs, 10_000, pow2=True) == [(0, 384)]  # a LayerNorm: its blocks cost ~d either way
    assert piece_cost(384, 10_000) == piece_cost(512, 10_000) == 20 * 512
    # the whole MiniLM-L6 shape list: pow2 transforms fewer coordinates than blocks, and close to D
    shapes = [30522 * 384, 512 * 384, 2 * 384, 2 * 384] + 6 * (4 * [384 * 384, 384] + [2 * 384, 1536 * 384, 1536,
                                                                                   384 * 1536, 384, 2 * 384])
    shapes += [384 * 384, 384]
    D = sum(shapes)

    def coords(pow2: bool) -> int:
        return sum(piece_cost(ln, 10_000) for s in shapes for _, ln in cut_segment(s, bs, 10_000, pow2))

    assert coords(True) < 1.05 * D < 1.3 * D < coords(False)  # the rest: small tensors read all of theta_d


def test_pow2_layout_is_another_p_with_exact_unit_columns() -> None:
    """Every piece a power of two: the columns have unit norm exactly; the seed gives another P than 'blocks'."""
    a = make_projection("fastfood", 3 * 1024 + 512, 16, seed=5, dtype=F64, segments=(3 * 1024 + 512,),
                        block_size=4096, layout="pow2")
    assert isinstance(a, BlockFastfoodProjection) and [ln for _, _, ln, _, _ in a.pieces()] == [2048, 1024, 512]
    torch.testing.assert_close(a.explicit().norm(dim=0), torch.ones(16, dtype=F64))
    b = make_projection("fastfood", 3 * 1024 + 512, 16, seed=5, dtype=F64, segments=(3 * 1024 + 512,),
                        block_size=4096, layout="blocks")
    assert [ln for _, _, ln, _, _ in b.pieces()] == [3 * 1024 + 512]
    assert not torch.allclose(a.explicit(), b.explicit())


@pytest.mark.parametrize("k", [0, 1, 2, 5, 10, 16])
def test_hashed_perm_is_a_bijection(k: int) -> None:
    keys = block_keys(7, 3, 1)
    i = torch.arange(1 << k)
    perm = hashed_perm(i, k, keys.xk, keys.a0, keys.a1, keys.ak, keys.a2)
    assert torch.equal(perm.sort().values, i)
    if k >= 10:  # and not the identity or a shift
        assert (perm != i).float().mean() > 0.9


def test_hashed_gaussian_moments() -> None:
    t = gauss_table(dtype=F64)
    assert abs(t.mean().item()) < 1e-12 and abs(t.square().mean().item() - 1) < 2e-3
    _, _, g, _ = make_projection("fastfood", 1 << 16, 8, seed=1).block_factors(0, 0)  # type: ignore[operator]
    assert abs(g.mean().item()) < 0.02 and abs(g.std().item() - 1) < 0.02


def test_blocks_are_independent_and_seeded() -> None:
    # block k's factors depend on (seed, k, chunk) only: a longer vector keeps the first blocks
    a = make_projection("fastfood", 3000, 10, seed=4, dtype=F64, block_size=1024)
    b = make_projection("fastfood", 5000, 10, seed=4, dtype=F64, block_size=1024)
    x = torch.randn(10, dtype=F64)
    ya, yb = a(x) * math.sqrt(3000), b(x) * math.sqrt(5000)  # undo the sqrt(D) scale
    torch.testing.assert_close(ya[:2048], yb[:2048])
    c = make_projection("fastfood", 3000, 10, seed=5, dtype=F64, block_size=1024)
    assert not torch.allclose(a(x), c(x))


def test_blocks_state_is_near_zero() -> None:
    D = (1 << 22) + 12_345
    p = make_projection("fastfood", D, 1000)
    assert isinstance(p, BlockFastfoodProjection)
    assert p.state_bytes() == 8 * p.num_blocks
    assert p.state_bytes() / D < 0.1
    assert [b.numel() for b in p.buffers()] == [p.num_blocks]


def test_cpp_equals_torch_reference_float32() -> None:
    D, d = (1 << 17) + 999, 300
    x = torch.randn(d)
    g = torch.randn(D)
    outs = []
    for name in ("torch", "cpp"):
        hadamard.set_backend(name)
        p = make_projection("fastfood", D, d, seed=9, segments=(1 << 16, D - (1 << 16)), block_size=1 << 16)
        xx = x.clone().requires_grad_(True)
        y = p(xx)
        y.backward(g)
        outs.append((y.detach(), xx.grad))
    hadamard.set_backend("auto")
    for a, b in zip(outs[0], outs[1]):
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-6


def test_blocks_bad_arguments() -> None:
    with pytest.raises(ValueError, match="segments must be positive lengths summing to D=10"):
        make_projection("fastfood", 10, 2, segments=(5, 4))
    with pytest.raises(ValueError, match=r"block_size must be a power of two in \[1, 2\^24\], got 1000"):
        make_projection("fastfood", 10, 2, block_size=1000)
    with pytest.raises(ValueError, match=r"d=11 > D=10"):
        make_projection("fastfood", 10, 11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_same_p_on_cuda() -> None:
    x = torch.randn(300, dtype=F64)
    cpu = make_projection("fastfood", 70_000, 300, seed=4, dtype=F64, segments=(60_000, 10_000), block_size=1 << 14)
    gpu = make_projection("fastfood", 70_000, 300, seed=4, dtype=F64, device="cuda", segments=(60_000, 10_000),
                          block_size=1 << 14)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x))


def test_kernel_calls_per_piece_and_stacked_forward_keep_p() -> None:
    """The C++ kernel's one-call-per-piece passes and forward()'s single output buffer give the bits of
    the per-block calls and the per-segment concatenation they replaced (P and results unchanged)."""
    hadamard.set_backend("cpp")
    try:
        hadamard.backend("cpu")
    except RuntimeError as e:
        hadamard.set_backend("auto")
        pytest.skip(f"the C++ kernel needs gcc and ninja to build: {e}")
    D, d, segs = 20_000, 600, (12_000, 5_000, 2_000, 999, 1)
    p = make_projection("fastfood", D, d, seed=2, segments=segs, block_size=1 << 12)
    assert isinstance(p, BlockFastfoodProjection)
    x, g = torch.randn(d), torch.randn(D)
    mod = hadamard.fast_module(x)
    assert mod is not None
    tab = gauss_table()
    for k, (_, _, _, n, q) in enumerate(p.pieces()):
        pc = [pp for mine in p._pieces for pp in mine][k]
        u = torch.randn(q, pc.c)
        z1, z2 = torch.empty(n), torch.empty(n)
        for j in range(q):
            mod.ff_expand(u[j], z1, pc.kbits, *block_keys(p.seed, pc.index, j).perm_args(), tab, j > 0)
        mod.ff_expand_multi(u, z2, pc.kbits, p._kernel_keys(pc), tab)
        assert torch.equal(z1, z2)
        b1 = torch.stack([mod.ff_bin(z1, pc.c, pc.kbits, *block_keys(p.seed, pc.index, j).perm_args(), tab)
                          for j in range(q)])
        assert torch.equal(b1, mod.ff_bin_multi(z1, pc.c, pc.kbits, p._kernel_keys(pc), tab))
    xx = x.clone().requires_grad_(True)
    y = p(xx)
    y.backward(g)
    parts = [p.segment_forward(x, s) for s in range(len(segs))]
    assert torch.equal(y.detach(), torch.cat(parts))
    total = p.segment_adjoint(g[p.segment_slice(len(segs) - 1)], len(segs) - 1)
    for s in range(len(segs) - 2, -1, -1):
        total = total + p.segment_adjoint(g[p.segment_slice(s)], s)
    assert xx.grad is not None and torch.equal(xx.grad, total)
    hadamard.set_backend("auto")
