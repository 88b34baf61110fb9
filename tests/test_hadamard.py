"""The Walsh-Hadamard transform: values, adjoint (unscaled), gradcheck, errors."""

from __future__ import annotations

import pytest
import torch

from idlab.subspace.hadamard import hadamard, radix_plan, sylvester, wht, wht_pingpong


def _sylvester_recursive(L: int) -> torch.Tensor:
    """H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]] (float64), independent of `sylvester`."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < L:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("L", [1, 2, 4, 64, 256, 512, 2048])
def test_matches_explicit_sylvester(L: int) -> None:
    x = torch.randn(3, L, dtype=torch.float64, generator=torch.Generator().manual_seed(L))
    h = _sylvester_recursive(L)
    torch.testing.assert_close(hadamard(x), x @ h.T, rtol=1e-12, atol=1e-9)
    assert torch.equal(sylvester(L, dtype=torch.float64), h)


def test_radix_plan_products() -> None:
    for n in range(0, 25):
        plan = radix_plan(1 << n)
        assert int(torch.tensor(plan, dtype=torch.float64).prod()) == 1 << n
        assert all(m <= 256 for m in plan)


def test_involution_and_batch_shapes() -> None:
    x = torch.randn(2, 3, 1024, dtype=torch.float64)
    y = hadamard(x)
    assert y.shape == x.shape
    torch.testing.assert_close(hadamard(y), 1024 * x)
    torch.testing.assert_close(y[1, 2], hadamard(x[1, 2]))


def test_non_contiguous_input() -> None:
    x = torch.randn(64, 5, dtype=torch.float64).T  # (5, 64), transposed strides
    torch.testing.assert_close(hadamard(x), hadamard(x.contiguous()))


def test_pingpong_with_src_leaves_input() -> None:
    src = torch.randn(1, 4096, dtype=torch.float64)
    keep = src.clone()
    a, b = torch.empty_like(src), torch.empty_like(src)
    out = wht_pingpong(a, b, src=src)
    assert torch.equal(src, keep)
    torch.testing.assert_close(out, wht(src))


def test_backward_is_unscaled_transform() -> None:
    # H^T = H, unnormalised: d<g, Hx>/dx = H g, not H g / sqrt(L)
    L = 512
    x = torch.randn(L, dtype=torch.float64, requires_grad=True)
    g = torch.randn(L, dtype=torch.float64)
    (hadamard(x) * g).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, _sylvester_recursive(L) @ g)


@pytest.mark.parametrize("L", [1, 8, 512])
def test_gradcheck(L: int) -> None:
    # 512 = radix plan [32, 16]: two passes; fast_mode keeps gradcheck cheap at this size
    x = torch.randn(2, L, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hadamard, (x,), fast_mode=L > 64)
    x8 = torch.randn(L if L <= 8 else 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(hadamard, (x8,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_dtypes(dtype: torch.dtype) -> None:
    x = torch.randint(-3, 4, (4, 64)).to(dtype)  # small integers: exact in every dtype
    ref = x.double() @ _sylvester_recursive(64)
    y = hadamard(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("L", [3, 6, 1000])
def test_non_power_of_two_raises(L: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard(torch.randn(L))


def test_integer_dtype_raises() -> None:
    with pytest.raises(TypeError, match="floating"):
        wht(torch.ones(8, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(3, 1 << 14, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x.cuda()).cpu(), hadamard(x))


# ----------------------------------------------------------------------------- fast path


@pytest.fixture
def fresh_backend(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    import idlab.subspace.hadamard as h

    monkeypatch.setattr(h, "_requested", None)
    monkeypatch.setattr(h, "_resolved", None)
    monkeypatch.setattr(h, "_warned", False)
    monkeypatch.setattr(h, "_resolved_gpu", None)
    monkeypatch.setattr(h, "_warned_gpu", False)
    yield h
    h.set_backend("auto")


@pytest.mark.parametrize("L,dtype", [(1, torch.float32), (8, torch.float64), (1 << 12, torch.float32),
                                     (1 << 15, torch.float64), (1 << 18, torch.float32), (1 << 19, torch.float32)])
def test_cpp_kernel_matches_torch_reference(L: int, dtype: torch.dtype) -> None:
    from idlab.subspace.hadamard import backend, set_backend, wht_

    set_backend("cpp")
    assert backend() == "cpp"
    x = torch.randn(2, L, dtype=dtype)
    ref = wht(x)
    y = wht_(x.clone())
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-6
    set_backend("auto")


def test_unknown_kernel_is_a_clear_error(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"unknown Walsh-Hadamard kernel 'avx9'.*allowed: auto, triton, cpp, torch"):
        fresh_backend.set_backend("avx9")
    monkeypatch.setenv("IDLAB_KERNEL", "gpu")
    with pytest.raises(ValueError, match=r"'gpu' \(from set_backend or \$IDLAB_KERNEL\)"):
        fresh_backend.backend()


def test_failed_build_falls_back_with_one_warning(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import warnings

    def broken() -> object:
        raise OSError("gcc: command not found")

    monkeypatch.setattr(fresh_backend, "_build_module", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh_backend.backend() == "torch"
        assert fresh_backend.backend() == "torch"
        fresh_backend.set_backend("auto")  # a second resolution does not warn again
        assert fresh_backend.backend() == "torch"
        x = torch.randn(64, dtype=torch.float64)
        torch.testing.assert_close(fresh_backend.wht_(x.clone()), wht(x))
    msgs = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    assert len(msgs) == 1 and "gcc: command not found" in msgs[0] and "IDLAB_KERNEL=torch" in msgs[0]
    fresh_backend.set_backend("cpp")  # asked for explicitly: an error naming the fix
    with pytest.raises(RuntimeError, match=r"kernel 'cpp'\) failed to build.*install gcc and ninja"):
        fresh_backend.backend()


def test_torch_backend_skips_the_build(fresh_backend, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(fresh_backend, "_build_module", lambda: (_ for _ in ()).throw(AssertionError("built")))
    monkeypatch.setenv("IDLAB_KERNEL", "torch")
    assert fresh_backend.backend() == "torch"
