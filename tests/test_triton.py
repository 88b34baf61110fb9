"""The Triton kernels (idlab/subspace/triton_kernels.py) against the plain-torch reference: the
Walsh-Hadamard transform and the Fastfood block passes, explicit matrices and the adjoint at small
size. On a machine without CUDA they run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1), so `make test` checks them everywhere; skipped when triton is not installed."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from idlab.subspace import hadamard
from idlab.subspace.fastfood import BlockFastfoodProjection
from idlab.subspace.hadamard import sylvester, wht
from idlab.subspace.projections import make_projection
from tests.test_fastfood import _reference
from tests.test_projections import F64

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def tk() -> Iterator[ModuleType]:
    """triton_kernels with kernel "triton" (interpreted on CPU tensors when there is no CUDA)."""
    pytest.importorskip("triton", reason="triton is not installed (the `test` extra: pip install -e '.[test]')")
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: (re)import below
    name = "idlab.subspace.triton_kernels"
    mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    hadamard.set_backend("triton")
    assert hadamard.backend(DEV) == "triton"
    yield mod
    hadamard.set_backend("auto")
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("R,n", [(1, 1), (1, 2), (3, 8), (2, 256), (1, 512), (3, 1 << 12), (1, 1 << 15)])
def test_wht_matches_torch_float32(tk: ModuleType, R: int, n: int) -> None:
    x = torch.randn(R, n, device=DEV)
    ref = wht(x.cpu().double())
    y = x.clone()
    assert hadamard.wht_(y) is y  # dispatched to the Triton kernel, in place
    assert _rel(y.cpu(), ref) < 1e-6
    y2 = tk.wht_(x.clone())
    assert torch.equal(y, y2)  # deterministic


@pytest.mark.parametrize("n", [2, 16, 64])
def test_wht_explicit_matrix(tk: ModuleType, n: int) -> None:
    eye = torch.eye(n, device=DEV)
    torch.testing.assert_close(tk.wht_(eye).cpu(), sylvester(n), rtol=0, atol=0)


@pytest.mark.parametrize("n", [8, 1 << 10, 1 << 13])
def test_wht_bf16_accumulates_in_float32(tk: ModuleType, n: int) -> None:
    x = torch.randn(3, n, device=DEV).bfloat16()
    ref = wht(x.cpu().double())  # exact transform of the bf16 input
    y = tk.wht_(x.clone())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.cpu().double(), ref.bfloat16().double(), rtol=2 ** -7, atol=1e-5 * ref.abs().max().item())


SMALL = [  # (D, d, segments, block): small d, so the explicit matrix is d forward calls
    (300, 7, None, 1 << 20),
    (300, 7, (100, 3, 197), 64),  # pieces shorter than d: theta_d in chunks
    (40, 5, (30, 3, 7), 4),
    (1, 1, None, 1),
]


@pytest.mark.parametrize("D,d,segments,block", SMALL)
def test_fastfood_equals_dense_formula_and_adjoint(tk: ModuleType, D: int, d: int,
                                                   segments: tuple[int, ...] | None, block: int) -> None:
    p = make_projection("fastfood", D, d, seed=3, device=DEV, segments=segments, block_size=block)
    assert isinstance(p, BlockFastfoodProjection)
    m = p.explicit().cpu().double()
    hadamard.set_backend("torch")
    ref = _reference(p)  # float64 dense Sylvester matrices, the same hashed B, Pi, G
    hadamard.set_backend("triton")
    assert _rel(m, ref) < 1e-6
    x = torch.randn(d, device=DEV, requires_grad=True)
    y = torch.randn(D, device=DEV)
    (pty,) = torch.autograd.grad(p(x), x, grad_outputs=y)
    assert _rel(pty.cpu().double(), ref.T @ y.cpu().double()) < 1e-6  # adjoint: <P x, y> = <x, P^T y>
    for s in range(len(p.segments)):
        sl = p.segment_slice(s)
        assert _rel(p.segment_adjoint(y[sl], s).cpu().double(), ref[sl].T @ y[sl].cpu().double()) < 1e-6


@pytest.mark.parametrize("D,d,segments,block", [
    (5000, 50, (4000, 1000), 1024),
    (1000, 1000, None, 256),  # d = D: four chunks per piece
    ((1 << 14) + 999, 300, (1 << 13, (1 << 14) + 999 - (1 << 13)), 1 << 13),
    (20_000, 64, (12_000, 5_000, 2_000, 999, 1), 1 << 12),
])
def test_fastfood_matches_torch_reference(tk: ModuleType, D: int, d: int, segments: tuple[int, ...] | None,
                                          block: int) -> None:
    x = torch.randn(d)
    g = torch.randn(D)
    outs = []
    for name, dev in (("torch", "cpu"), ("triton", DEV)):
        hadamard.set_backend(name)
        p = make_projection("fastfood", D, d, seed=9, device=dev, segments=segments, block_size=block)
        xx = x.clone().to(dev).requires_grad_(True)
        y = p(xx)
        y.backward(g.to(dev))
        assert xx.grad is not None
        outs.append((y.detach().cpu(), xx.grad.cpu()))
    assert hadamard.backend(DEV) == "triton"
    for a, b in zip(outs[1], outs[0]):
        assert _rel(a, b) < 1e-6


def test_fastfood_bf16_gradient_and_determinism(tk: ModuleType) -> None:
    D, d = 6000, 40
    p = make_projection("fastfood", D, d, seed=5, device=DEV, segments=(5000, 1000), block_size=1 << 12)
    g = torch.randn(D, device=DEV)
    a = p.segment_adjoint(g[:5000].bfloat16(), 0)
    assert a.dtype == torch.float32  # bf16 gradients accumulate in float32
    ref = p.segment_adjoint(g[:5000].bfloat16().float(), 0)
    assert _rel(a, ref) < 1e-6
    assert torch.equal(a, p.segment_adjoint(g[:5000].bfloat16(), 0))  # no atomics: bitwise repeatable


def test_cuda_choice_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" on CUDA without Triton: torch, one warning; "triton" asked for: an error naming the fix."""
    import idlab.subspace.hadamard as h

    for attr, v in (("_requested", None), ("_resolved_gpu", None), ("_warned_gpu", False)):
        monkeypatch.setattr(h, attr, v)

    def broken() -> ModuleType:
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(h, "_import_triton", broken)
    monkeypatch.setenv("IDLAB_KERNEL", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert h.backend("cuda") == "torch"
        assert h.backend("cuda") == "torch"
        h.set_backend("auto")
        assert h.backend("cuda") == "torch"
    msgs = [str(w.message) for w in caught if "Triton is not available" in str(w.message)]
    assert len(msgs) == 1 and "IDLAB_KERNEL=torch" in msgs[0]
    h.set_backend("triton")
    with pytest.raises(RuntimeError, match=r"kernel 'triton'\) are not available.*pip install triton"):
        h.backend("cuda")
    h.set_backend("cpp")  # the C++ kernel is CPU-only: CUDA tensors use torch
    assert h.backend("cuda") == "torch"
    h.set_backend("auto")


def test_unused_f64_stays_on_torch(tk: ModuleType) -> None:
    """float64 is not a Triton dtype here: it takes the torch path (same P)."""
    x = torch.randn(2, 64, dtype=F64, device=DEV)
    assert hadamard.triton_module(x) is None
    torch.testing.assert_close(hadamard.wht_(x.clone()).cpu(), wht(x.cpu()))
