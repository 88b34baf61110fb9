"""The unnormalised Walsh-Hadamard transform over the last dimension.

H_L is the Sylvester matrix of order L = 2^n: H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]],
so H_L[i, j] = (-1)^popcount(i & j). It is symmetric (H^T = H) and H H = L * I. We never form
the L x L matrix: with L = m_1 * m_2 * ... * m_k (each m_i a power of two),

    H_L = H_m1 ⊗ H_m2 ⊗ ... ⊗ H_mk,

so viewing x (..., L) as (..., m_1, ..., m_k) and multiplying by the small dense H_mi along
each axis in turn gives H_L x in k passes (mixed radix). Measured on a 2-core Xeon at
L = 2^24, radix 16..32 with ping-pong output buffers beats both the radix-2 butterfly loop
(24 passes with temporaries) and radix 256 (3 passes but 512 flops per element per pass).

The transform is its own adjoint (H symmetric, *unnormalised*), so the backward of
`hadamard` is `hadamard` again -- not scaled by 1/sqrt(L) (the public code of Aghajanyan
et al. 2021 scaled it and got gradients off by a factor of L).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

# Largest log2 of one radix factor; 5 (radix 32) measured best at L = 2^20..2^24 on CPU.
_MAX_BITS = 5
# Up to this log2(L) a single dense pass with H_L is cheapest (L <= 256).
_SINGLE_PASS_BITS = 8

_SYLVESTER_CACHE: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def is_power_of_two(n: int) -> bool:
    """True when n = 2^k for some k >= 0."""
    return n >= 1 and (n & (n - 1)) == 0


def sylvester(
    m: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The dense Sylvester-Hadamard matrix H_m, shape (m, m), entries +-1 (cached).

    H_m[i, j] = (-1)^popcount(i & j); m must be a power of two. Meant for small m (the
    radix factors, tests); the cached tensor is shared, so do not modify it in place.
    """
    if not is_power_of_two(m):
        raise ValueError(f"sylvester: m={m} is not a power of two")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (m, dev, dtype)
    h = _SYLVESTER_CACHE.get(key)
    if h is None:
        i = torch.arange(m)
        bits = torch.bitwise_and(i[:, None], i[None, :])  # (m, m)
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits = bits >> 1
        h = (1 - 2 * parity).to(device=dev, dtype=dtype)  # (m, m)
        _SYLVESTER_CACHE[key] = h
    return h


def radix_plan(L: int) -> list[int]:
    """The radix factors (m_1, ..., m_k), product L, used for a length-L transform.

    L <= 256: one factor. Otherwise k = ceil(log2 L / 5) factors with their bits spread
    as evenly as possible (e.g. 2^24 -> [32, 32, 32, 32, 16]).
    """
    if not is_power_of_two(L):
        raise ValueError(f"Walsh-Hadamard transform needs a power-of-two length, got L={L}")
    n = L.bit_length() - 1
    if n <= _SINGLE_PASS_BITS:
        return [L] if n > 0 else []
    k = -(-n // _MAX_BITS)
    bits = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [1 << b for b in bits]


def wht_pingpong(x: Tensor, work: Tensor, src: Tensor | None = None) -> Tensor:
    """H_L applied to each row of x (R, L), using x and work (R, L) as ping-pong buffers.

    Both buffers must be contiguous, same shape/dtype/device; both are overwritten. With
    ``src`` (R, L) given, the input is read from src (left untouched) and x is pure scratch.
    Returns whichever of x and work holds the result. No autograd (use `hadamard` for that).
    One pass per radix factor; each pass is one (batched) matmul written with ``out=``.
    """
    R, L = x.shape
    inp = x if src is None else src
    a, b = x, work  # each pass reads inp and writes b
    if src is not None and len(radix_plan(L)) == 0:
        return x.copy_(src)
    pre = 1  # product of the factors already applied (axes to the left)
    for m in radix_plan(L):
        post = L // (pre * m)  # product of the axes to the right
        h = sylvester(m, x.device, x.dtype)  # (m, m), symmetric
        if post == 1:  # last axis: (R*pre, m) @ H
            torch.matmul(inp.view(R * pre, m), h, out=b.view(R * pre, m))
        elif R * pre == 1:  # first axis: H @ (m, post)
            torch.matmul(h, inp.view(m, post), out=b.view(m, post))
        else:  # middle axis: H @ (R*pre, m, post), H broadcast over the batch
            torch.matmul(h, inp.view(R * pre, m, post), out=b.view(R * pre, m, post))
        inp = b
        a, b = b, a
        pre *= m
    return inp


def wht(x: Tensor) -> Tensor:
    """H_L x over the last dimension, no autograd; x (..., L) -> (..., L), a new tensor."""
    L = x.shape[-1]
    if not is_power_of_two(L):
        raise ValueError(f"Walsh-Hadamard transform needs a power-of-two last dimension, got {L}")
    if not x.is_floating_point():
        raise TypeError(f"Walsh-Hadamard transform needs a floating dtype, got {x.dtype}")
    shape = x.shape
    a = x.reshape(-1, L).clone(memory_format=torch.contiguous_format)  # (R, L), contiguous, ours to overwrite
    if len(radix_plan(L)) == 0:
        return a.view(shape)
    b = torch.empty_like(a)
    return wht_pingpong(a, b).view(shape)


class _Hadamard(torch.autograd.Function):
    """y = H x; dL/dx = H^T dL/dy = H dL/dy (H symmetric, unnormalised)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        return wht(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return hadamard(grad)  # differentiable again: double backward works


def hadamard(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dimension, differentiable.

    y[..., i] = sum_j (-1)^popcount(i & j) x[..., j], x and y (..., L), L a power of two.
    H H = L I, so hadamard(hadamard(x)) = L * x. Any float dtype, CPU or CUDA. The backward is
    the same transform (H^T = H), unscaled.
    """
    if not is_power_of_two(x.shape[-1]):
        raise ValueError(
            f"hadamard: last dimension must be a power of two, got {x.shape[-1]} (pad with zeros "
            "to the next power of two)"
        )
    out: Tensor = _Hadamard.apply(x)
    return out


# ----------------------------------------------------------------------------- fast path

KERNELS = ("auto", "triton", "cpp", "torch")
_KERNEL_ENV = "IDLAB_KERNEL"
_requested: str | None = None  # None: read the environment on first use
_resolved: str | None = None  # the CPU kernel: "cpp" or "torch"
_resolved_gpu: str | None = None  # the CUDA kernel: "triton" or "torch"
_module: object | None = None
_triton: ModuleType | None = None
_warned = False
_warned_gpu = False


def _check_kernel(name: object) -> str:
    if not isinstance(name, str) or name not in KERNELS:
        raise ValueError(
            f"unknown Walsh-Hadamard kernel {name!r} (from set_backend or ${_KERNEL_ENV}); allowed: "
            f"{', '.join(KERNELS)} ('auto': Triton on CUDA, the C++ fast path on CPU, else 'torch')"
        )
    return name


def set_backend(name: str) -> None:
    """Choose the transform's kernel: "auto" (default: Triton for CUDA tensors when it imports, C++
    for CPU tensors if it builds, else torch with one warning), "triton" (raises if Triton does not
    import; CPU tensors use it only under TRITON_INTERPRET=1, else the "auto" CPU choice), "cpp" (the
    compiled CPU fast path; raises if it cannot build; CUDA tensors use torch) or "torch" (the plain
    reference everywhere).

    The environment variable IDLAB_KERNEL sets the same choice before first use.
    """
    global _requested, _resolved, _resolved_gpu
    _requested = _check_kernel(name)
    _resolved = _resolved_gpu = None


def _requested_kernel() -> str:
    global _requested
    if _requested is None:
        _requested = _check_kernel(os.environ.get(_KERNEL_ENV, "auto"))
    return _requested


def _build_module() -> object:
    from idlab.subspace import _kernels

    if not _kernels.is_cached():  # the first build takes ~30 s: say so once, on stderr
        print(f"building the idlab C++ kernel (once, ~30 s; cached in {_kernels.build_dir()})",
              file=sys.stderr, flush=True)
    return _kernels.build()


def _import_triton() -> ModuleType:
    from idlab.subspace import triton_kernels

    return triton_kernels


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _gpu_backend() -> str:
    """The kernel for CUDA tensors (and CPU tensors when "triton" runs interpreted)."""
    global _resolved_gpu, _triton, _warned_gpu
    if _resolved_gpu is not None:
        return _resolved_gpu
    req = _requested_kernel()
    if req in ("torch", "cpp"):
        _resolved_gpu = "torch"
        return _resolved_gpu
    try:
        _triton = _import_triton()
        _resolved_gpu = "triton"
    except Exception as e:
        if req == "triton":
            raise RuntimeError(
                f"the Triton kernels (kernel 'triton') are not available: {type(e).__name__}: {e}; "
                f"pip install triton (Linux, CUDA), or use kernel 'auto' / 'torch' (${_KERNEL_ENV}=torch)"
            ) from e
        if not _warned_gpu:
            warnings.warn(
                f"idlab: Triton is not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"CUDA tensors use the plain-torch Walsh-Hadamard transform and Fastfood passes (slower, same "
                f"numbers). Set {_KERNEL_ENV}=torch to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned_gpu = True
        _triton = None
        _resolved_gpu = "torch"
    return _resolved_gpu


def backend(device: torch.device | str | None = None) -> str:
    """The kernel in use for tensors on ``device``: "triton", "cpp" or "torch".

    ``device`` None means CUDA when CUDA is available (where runs train), else CPU. CPU: "cpp"
    (built on the first call) or "torch"; CUDA: "triton" (when it imports) or "torch". With
    ``IDLAB_KERNEL=triton`` and ``TRITON_INTERPRET=1`` CPU tensors use the Triton kernels too
    (the interpreter: how the tests check them without a GPU). Recorded in every subspace run's
    result.json (``method_info.kernel``). With "auto" a failed build / import warns once and falls
    back to "torch".
    """
    if device is None and torch.cuda.is_available():
        _cpu_backend()  # CUDA runs hash ||G|| on the CPU: build the C++ kernel now (out of the run's clock)
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" or (dev.type == "cpu" and _requested_kernel() == "triton" and _interpreted()):
        return _gpu_backend()
    if dev.type != "cpu":
        return "torch"
    return _cpu_backend()


def _cpu_backend() -> str:
    global _resolved, _module, _warned
    if _resolved is not None:
        return _resolved
    req = _requested_kernel()
    if req == "torch":
        _resolved = "torch"
        return _resolved
    try:
        _module = _build_module()
        _resolved = "cpp"
    except Exception as e:
        if req == "cpp":
            raise RuntimeError(
                f"the C++ Walsh-Hadamard kernel (kernel 'cpp') failed to build: {type(e).__name__}: {e}; "
                f"install gcc and ninja, or use kernel 'auto' / 'torch' (${_KERNEL_ENV}=torch)"
            ) from e
        if not _warned:
            warnings.warn(
                f"idlab: the C++ Walsh-Hadamard kernel could not be built ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); using the plain-torch transform "
                f"(slower, same numbers). Set {_KERNEL_ENV}=torch to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            _warned = True
        _module = None
        _resolved = "torch"
    return _resolved


def triton_module(x: Tensor) -> ModuleType | None:
    """`idlab.subspace.triton_kernels` when it applies to x (contiguous float32/bfloat16/float16 on
    CUDA, or on CPU under TRITON_INTERPRET=1 with kernel "triton"), else None."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not x.is_contiguous():
        return None
    if x.device.type == "cpu" and not (_requested_kernel() == "triton" and _interpreted()):
        return None
    if x.device.type not in ("cpu", "cuda"):
        return None
    return _triton if backend(x.device) == "triton" else None


def fast_module(x: Tensor) -> Any | None:
    """The compiled CPU module when it applies to x (CPU, float32/float64, contiguous), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous():
        return None
    if triton_module(x) is not None:
        return None
    return _module if backend(x.device) == "cpp" else None


def wht_(x: Tensor) -> Tensor:
    """H_n x in place over the last dimension (x contiguous (..., n), n a power of two); returns x.

    Uses the Triton kernel (`triton_module`), else the compiled CPU kernel when it applies (CPU
    float32/float64, `backend()` "cpp"), else the plain-torch `wht` (same numbers to rounding;
    tested within 1e-6 relative).
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"Walsh-Hadamard transform needs a power-of-two last dimension, got {n}")
    tri = triton_module(x)
    if tri is not None:
        tri.wht_(x)
        return x
    mod = fast_module(x)
    if mod is not None:
        mod.wht_(x)
        return x
    return x.copy_(wht(x))
