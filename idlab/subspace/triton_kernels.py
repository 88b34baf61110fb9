"""The CUDA fast path: Triton kernels for the Walsh-Hadamard transform and the Fastfood block passes
that `idlab.subspace._kernels` fuses on CPU (hash + gather forward, hash + binned sum backward).

Nothing here is called directly: `idlab.subspace.hadamard` decides when these kernels apply
(`hadamard.kernel_for`: CUDA tensors when Triton imports, or CPU tensors with ``IDLAB_KERNEL=triton``
under ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU), and
`idlab.subspace.fastfood` calls them through it. The plain-torch code is the reference every kernel
is tested against (tests/test_triton.py).

Kernels (contiguous float32, bfloat16 or float16 inputs; arithmetic in float32; no atomics, so
every result is deterministic):

- ``wht_(x)``: H_n on every row of x (R, n) in place, n a power of two. The transform is
  H_n = H_m1 ⊗ ... ⊗ H_mk (``radix`` factors of at most 2^8); each factor is one pass whose
  program loads a (rows, m, columns) tile and applies H_m in registers: log2(m) identical
  butterfly stages, each splitting the tile's top index bit off and appending it as the lowest
  (reshape / permute / split / join), so after log2(m) stages the tile is transposed and one
  permute puts it back. Passes after the first run in place on a float32 scratch when x is not
  float32 (float32 accumulation).
- ``ff_expand(u, z, keys, ...)``: z_i = sum_j G_j,i u_j[Pi_j(i) & (c - 1)] for i < n, all q blocks
  of a piece in one pass (same hash integers as the CPU kernel and the torch code, in int64).
- ``ff_bin(z, c, keys, ...)``: bins_j,t = sum_{i : Pi_j(i) & (c - 1) = t} G_j,i z_i. Instead of
  a scatter (atomics, not deterministic) each output t gathers its n / c preimages
  i = Pi_j^-1(t + s c): Pi's rounds are invertible (odd multipliers have inverses mod 2^k, the
  xorshift by ceil(k/2) is an involution), so the binned sum is a fixed-order gather-reduce,
  split in S fixed slices whose partial sums are added in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

#: largest radix factor of one pass (bits) and largest tile (elements) of a transform program
MAX_PASS_BITS = 8
TILE = 4096
#: elements per program of the Fastfood passes
FF_BLOCK = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_GOLD32 = 0x9E3779B1
_FMIX = 0x045D9F3B
_M32 = 0xFFFFFFFF


@triton.jit
def _wht_axis0(x, M: tl.constexpr, T: tl.constexpr, LOG_M: tl.constexpr):  # type: ignore[no-untyped-def]
    """H_M along the first axis of a flat (M, T) tile (index m * T + t), in registers."""
    N: tl.constexpr = M * T
    for _ in tl.static_range(LOG_M):
        a, b = tl.split(tl.permute(tl.reshape(x, (2, N // 2)), (1, 0)))  # top bit split off
        x = tl.reshape(tl.join(a + b, a - b), (N,))  # ... and appended as the lowest bit
    return tl.reshape(tl.permute(tl.reshape(x, (T, M)), (1, 0)), (N,))


@triton.jit
def _wht_pass(src, dst, A, post, n_pp, TA: tl.constexpr, M: tl.constexpr, TP: tl.constexpr,  # type: ignore[no-untyped-def]
              LOG_M: tl.constexpr):
    """dst = H_M along the middle axis of src viewed as (A, M, post); one (TA, M, TP) tile per program."""
    pid = tl.program_id(0)
    pa = pid // n_pp
    pp = pid % n_pp
    a = (pa * TA + tl.arange(0, TA)).to(tl.int64)
    m = tl.arange(0, M).to(tl.int64)
    p = (pp * TP + tl.arange(0, TP)).to(tl.int64)
    off = a[:, None, None] * (M * post) + m[None, :, None] * post + p[None, None, :]
    mask = tl.broadcast_to((a < A)[:, None, None], (TA, M, TP))
    x = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.reshape(tl.permute(x, (1, 0, 2)), (M * TA * TP,))
    x = _wht_axis0(x, M, TA * TP, LOG_M)
    x = tl.permute(tl.reshape(x, (M, TA, TP)), (1, 0, 2))
    tl.store(dst + off, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _hash(i, key, gold, fmix, m32):  # type: ignore[no-untyped-def]
    h = (i * gold + key) & m32
    h = (((h >> 16) ^ h) * fmix) & m32
    h = (((h >> 16) ^ h) * fmix) & m32
    return (h >> 16) ^ h


@triton.jit
def _ff_expand(u, z, keys, table, q, c, n, msk, r, gold, fmix, m32,  # type: ignore[no-untyped-def]
               BLOCK: tl.constexpr):
    """z_i = sum_j G_j,i u_j[Pi_j(i) & (c - 1)]; keys (q, 9) int64: xk, a0, a1, ak, a2, kg, a0^-1, a1^-1, a2^-1."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = i < n
    acc = tl.full((BLOCK,), 0.0, tl.float32)  # (tl.zeros is a jit helper: not in the interpreter once triton is imported)
    for j in range(q):
        kp = keys + j * 9
        x = (i ^ tl.load(kp)) & msk
        x = (x * tl.load(kp + 1)) & msk
        x = x ^ (x >> r)
        x = (x * tl.load(kp + 2)) & msk
        x = x ^ (x >> r)
        x = (x + tl.load(kp + 3)) & msk
        x = (x * tl.load(kp + 4)) & msk
        x = x ^ (x >> r)
        g = tl.load(table + (_hash(i, tl.load(kp + 5), gold, fmix, m32) >> 20), mask=live, other=0.0)
        v = tl.load(u + j * c + (x & (c - 1)), mask=live, other=0.0).to(tl.float32)
        acc += g * v
    tl.store(z + i, acc.to(z.dtype.element_ty), mask=live)


@triton.jit
def _ff_bin(z, part, keys, table, c, n_t, S, per, steps, msk, r, gold, fmix, m32,  # type: ignore[no-untyped-def]
            BLOCK: tl.constexpr):
    """part[j, s, t] = sum over the s-th slice of k < n / c of G_j,i z_i at i = Pi_j^-1(t + k c)."""
    pid = tl.program_id(0)
    tb = pid % n_t
    s = (pid // n_t) % S
    j = pid // (n_t * S)
    t = tb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = t < c
    kp = keys + j * 9
    xk = tl.load(kp)
    ak = tl.load(kp + 3)
    kg = tl.load(kp + 5)
    i0 = tl.load(kp + 6)
    i1 = tl.load(kp + 7)
    i2 = tl.load(kp + 8)
    acc = tl.full((BLOCK,), 0.0, tl.float32)  # (tl.zeros is a jit helper: not in the interpreter once triton is imported)
    for step in range(steps):
        k = s * steps + step
        x = t + k.to(tl.int64) * c
        ok = live & (x <= msk)  # k < n / c
        x = x ^ (x >> r)  # the rounds of Pi, undone last to first
        x = (x * i2) & msk
        x = (x - ak) & msk
        x = x ^ (x >> r)
        x = (x * i1) & msk
        x = x ^ (x >> r)
        x = (x * i0) & msk
        i = (x ^ xk) & msk
        g = tl.load(table + (_hash(i, kg, gold, fmix, m32) >> 20), mask=ok, other=0.0)
        acc += g * tl.load(z + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(part + (j * S + s).to(tl.int64) * c + t, acc, mask=live)


def radix(n: int) -> list[int]:
    """The pass factors of a length-n transform: ceil(log2 n / 8) factors, bits spread evenly."""
    bits = n.bit_length() - 1
    if bits == 0:
        return []
    k = -(-bits // MAX_PASS_BITS)
    return [1 << (bits // k + (1 if i < bits % k else 0)) for i in range(k)]


def _launch_pass(src: Tensor, dst: Tensor, A: int, m: int, post: int) -> None:
    if post == 1:
        ta, tp = min(TILE // m, triton.next_power_of_2(A)), 1
    else:
        ta, tp = 1, min(post, TILE // m)
    n_pp = post // tp
    grid = (triton.cdiv(A, ta) * n_pp,)
    _wht_pass[grid](src, dst, A, post, n_pp, TA=ta, M=m, TP=tp, LOG_M=m.bit_length() - 1)


def wht_(x: Tensor) -> Tensor:
    """H_n x in place over the last dimension of a contiguous (..., n) tensor; returns x."""
    if not x.is_contiguous() or x.dtype not in DTYPES:
        raise ValueError(f"triton wht_: needs a contiguous {DTYPES} tensor, got {x.dtype}")
    n = x.shape[-1]
    R = x.numel() // n if n else 0
    plan = radix(n)
    if R == 0 or not plan:
        return x
    work = x if x.dtype == torch.float32 or len(plan) == 1 else torch.empty(x.shape, dtype=torch.float32,
                                                                          device=x.device)
    pre = 1
    for k, m in enumerate(plan):
        post = n // (pre * m)
        src = x if k == 0 else work
        dst = x if k == len(plan) - 1 else work
        _launch_pass(src, dst, R * pre, m, post)
        pre *= m
    return x


def _inverse(a: int, kbits: int) -> int:
    return pow(a & ((1 << kbits) - 1), -1, 1 << kbits) if kbits > 0 else 0


def keys_tensor(keys: Sequence[tuple[int, int, int, int, int, int]], kbits: int, device: torch.device) -> Tensor:
    """(q, 9) int64 on device: each block's (xk, a0, a1, ak, a2, kg) and Pi's inverse multipliers."""
    rows = [[xk, a0, a1, ak, a2, kg, _inverse(a0, kbits), _inverse(a1, kbits), _inverse(a2, kbits)]
            for xk, a0, a1, ak, a2, kg in keys]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _shift(kbits: int) -> int:
    return (kbits + 1) // 2 if kbits > 1 else 1


def ff_expand(u: Tensor, z: Tensor, kbits: int, keys: Tensor, table: Tensor) -> Tensor:
    """z (2^kbits,) = sum_j G_j u_j[Pi_j mod c] for u (q, c) (float32 accumulation); returns z."""
    q, c = u.shape
    n = 1 << kbits
    grid = (triton.cdiv(n, FF_BLOCK),)
    _ff_expand[grid](u.contiguous(), z, keys, table, q, c, n, n - 1, _shift(kbits), _GOLD32, _FMIX, _M32,
                     BLOCK=FF_BLOCK)
    return z


def ff_bin(z: Tensor, c: int, kbits: int, keys: Tensor, table: Tensor) -> Tensor:
    """bins (q, c) float32: bins_j,t = sum_{Pi_j(i) mod c = t} G_j,i z_i, deterministic."""
    q = keys.shape[0]
    n = 1 << kbits
    per = n // c
    n_t = triton.cdiv(c, FF_BLOCK)
    S = max(1, min(per, 2048 // max(1, q * n_t)))  # enough programs to fill a GPU, in fixed slices
    steps = -(-per // S)
    part = torch.empty(q, S, c, dtype=torch.float32, device=z.device)
    _ff_bin[(q * S * n_t,)](z, part, keys, table, c, n_t, S, per, steps, n - 1, _shift(kbits), _GOLD32, _FMIX,
                            _M32, BLOCK=FF_BLOCK)
    return part.sum(1) if S > 1 else part[:, 0]
