"""Fastfood projections P (D x d) in two layouts, made by `idlab.subspace.projections.make_projection`.

Both map theta_d (d,) to (D,) with every implicit column of unit length over all D rows
(to the usual Fastfood accuracy, about 1 +- 0.01; exactly 1 in expectation). H is the
unnormalised Walsh-Hadamard matrix (`idlab.subspace.hadamard`).

**"blocks" (the default): a stack of independent Fastfood blocks, streamed.** The flat
parameter vector is cut into *segments* (`SubspaceModel` passes one per projected tensor)
and each segment into pieces of at most ``block_size`` = 2^k entries (default 2^20). Piece p
(length D_p, n_p = next_pow2(D_p), c_p = min(n_p, b), b = next_pow2(d)) reads *all* of
theta_d, in q_p = ceil(d / c_p) chunks of c_p coordinates (one chunk when n_p >= b):

    y_p = sum_j (H_n G_pj Pi_pj H_c B_pj theta[j c : (j+1) c])[:D_p] / (||G_pj||_2 sqrt(D))

(H_n Pi H_c B of a length-c input, zero padded to n, written without padding: with
idx = Pi mod c, (Pi (ones(n/c) ⊗ u))_i = u[idx_i]). Each block's squared column norm is
D_p / D in expectation, so the columns of the stacked P have unit norm over all D; no
coordinate of theta_d is dropped, however short the piece (SCIENCE.md section 2's second
defect). A segment's rows are computed on their own, in O(block_size) scratch: no length-D
offset and no length-L buffer ever exists, and P_s^T g_s of one segment's gradient needs only
that gradient. B, Pi and G are *hashed*, not drawn (zero state, see below), so block k needs
no other block's draw. It is the default because it is the only layout whose memory is
O(largest block) instead of O(next_pow2(D)) and whose state is near zero (8 bytes per block:
its ||G||), which is what subspace training at Llama scale needs; and it is faster (small
transforms stay in cache, no padding of D to a power of two).

**"global": Li et al.'s single block** lives in `idlab.subspace.fastfood_global` (`FastfoodProjection`,
re-exported here); the Li et al. reproduction uses it.

**Hashed factors of block (p, j)** (identical integers on CPU and CUDA, in the C++ kernel and
in torch): keys = splitmix64 chain of (seed, p, j). With i < n = 2^k, all arithmetic mod 2^32:

    Pi(i) = f3(f2(f1(i ^ x)))  with f(x) = ((x * a) mod 2^k) ^ (((x * a) mod 2^k) >> ceil(k/2)),
            a odd (x + a_k added before the last round): a bijection of [0, 2^k);
    G_i   = T[h(i, k_g) >> 20],  T[t] = Phi^-1((t + 1/2) / 4096) (float32): a 4,096-level
            inverse-CDF Gaussian from the 12 top bits of a 32-bit hash h;
    B_t   = 1 - 2 * (h(t, k_b) >> 31).

h(i, k) = fmix(i * 0x9E3779B1 + k), fmix(h) = two rounds of h = (h ^ h >> 16) * 0x45D9F3B, then
h ^ h >> 16 (all mod 2^32). The same seed gives the same integers everywhere; floats then differ
between devices only by summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from idlab.subspace.base import LAYOUTS, Projection, next_pow2
from idlab.subspace.fastfood_global import (
    FASTFOOD_CHUNK,
    GLOBAL_STATES,
    FastfoodProjection,
    check_d,
)
from idlab.subspace.hadamard import fast_module, triton_module, wht_
from idlab.subspace.pieces import cut_segment, piece_cost

__all__ = [
    "BLOCK_STATES",
    "FASTFOOD_BLOCK",
    "GLOBAL_STATES",
    "LAYOUTS",
    "BlockFastfoodProjection",
    "FastfoodProjection",
    "cut_segment",
    "hashed_perm",
    "piece_cost",
]

BLOCK_STATES = ("none",)
# "blocks": default largest block (power of two); pieces of a segment are at most this long.
FASTFOOD_BLOCK = 1 << 20
# "blocks": largest allowed block (the torch path holds a few int64 (block,) temporaries).
FASTFOOD_BLOCK_MAX = 1 << 24
# "blocks": B * scale is cached for pieces with q * c at most this (small tensors: per-call setup dominates)
_SIGN_CACHE = 1 << 13

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_GOLD32 = 0x9E3779B1
_FMIX = 0x045D9F3B
_TABLE_BITS = 12


# ----------------------------------------------------------------------------- hashing


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class BlockKeys:
    """The 32-bit keys of one block: Pi's rounds (xk, a0, a1, ak, a2), G's (kg) and B's (kb)."""

    xk: int
    a0: int
    a1: int
    ak: int
    a2: int
    kg: int
    kb: int

    def perm_args(self) -> tuple[int, int, int, int, int, int]:
        return (self.xk, self.a0, self.a1, self.ak, self.a2, self.kg)


@lru_cache(maxsize=1 << 16)
def block_keys(seed: int, piece: int, chunk: int) -> BlockKeys:
    """Keys of block (piece, chunk) for ``seed``: a pure function, no other block involved."""
    s = _splitmix64((int(seed) & _M64) ^ 0xD1B54A32D192ED03)
    s = _splitmix64(s ^ int(piece))
    s = _splitmix64(s ^ (int(chunk) << 32))
    v = [_splitmix64((s + t) & _M64) for t in range(7)]
    return BlockKeys(v[0] & _M32, (v[1] & _M32) | 1, (v[2] & _M32) | 1, v[3] & _M32,
                     (v[4] & _M32) | 1, v[5] & _M32, v[6] & _M32)


def hashed_perm(i: Tensor, kbits: int, xk: int | Tensor, a0: int | Tensor, a1: int | Tensor,
                ak: int | Tensor, a2: int | Tensor) -> Tensor:
    """Pi(i) for int64 i in [0, 2^kbits): a bijection of [0, 2^kbits) (keys broadcast with i)."""
    mask = (1 << kbits) - 1
    r = (kbits + 1) // 2 if kbits > 1 else 1
    x = (i ^ xk) & mask
    x = (x * a0) & mask
    x = x ^ (x >> r)
    x = (x * a1) & mask
    x = x ^ (x >> r)
    x = (x + ak) & mask
    x = (x * a2) & mask
    return x ^ (x >> r)


def hashed_u32(i: Tensor, key: int | Tensor) -> Tensor:
    """h(i, key): a 32-bit hash of int64 i < 2^31 (as int64 in [0, 2^32))."""
    h = (i * _GOLD32 + key) & _M32
    h = (((h >> 16) ^ h) * _FMIX) & _M32
    h = (((h >> 16) ^ h) * _FMIX) & _M32
    return (h >> 16) ^ h


_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def gauss_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """T (4096,): Phi^-1((t + 1/2) / 4096) rounded to float32 (then cast), shared and cached."""
    dev = torch.device(device)
    key = (dev, dtype)
    t = _TABLES.get(key)
    if t is None:
        q = (torch.arange(1 << _TABLE_BITS, dtype=torch.float64) + 0.5) / (1 << _TABLE_BITS)
        t = torch.special.ndtri(q).float().to(device=dev, dtype=dtype)
        _TABLES[key] = t
    return t


def _gauss(i: Tensor, kg: int | Tensor, dtype: torch.dtype) -> Tensor:
    return gauss_table(i.device, dtype)[hashed_u32(i, kg) >> (32 - _TABLE_BITS)]


def _signs(c: int, kb: Tensor, dtype: torch.dtype) -> Tensor:
    """B (q, c): +-1 from the top bit of h(t, kb) for t < c, one row per key in kb (q, 1)."""
    t = torch.arange(c, device=kb.device, dtype=torch.int64)
    return (1 - 2 * (hashed_u32(t, kb) >> 31)).to(dtype)


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class _Piece:
    """Rows [start, start + length) of segment `segment` (global piece index `index`)."""

    index: int
    segment: int
    start: int  # within the segment
    length: int
    kbits: int  # n = 2^kbits >= length
    c: int  # chunk length of theta_d: min(n, b)
    q: int  # number of chunks (blocks) of this piece
    first_block: int  # index into the per-block scales


class BlockFastfoodProjection(Projection):
    """Layout "blocks": a stack of hashed Fastfood blocks, one segment at a time (see module doc).

    Args:
        D, d, seed, device, dtype: as `make_projection` (P is a pure function of D, d, seed,
            segments and block_size).
        segments: lengths summing to D (default (D,)); `segment_forward` / `segment_adjoint`
            compute one segment's rows of P theta / P^T g on their own.
        block_size: largest piece, a power of two in [1, 2^24] (default 2^20).
        pow2: layout "pow2": cut each segment by `cut_segment`'s power-of-two rule (another P).

    State between calls: one float64 scale 1 / (||G_pj|| sqrt(D)) per block (8 bytes per block,
    about 8e-6 bytes per parameter at the default block size), plus a shared 16 KiB table.
    """

    kind = "fastfood"
    layout = "blocks"
    block_scale: Tensor  # (num_blocks,) float64

    def __init__(
        self,
        D: int,
        d: int,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        segments: Sequence[int] | None = None,
        block_size: int = FASTFOOD_BLOCK,
        pow2: bool = False,
    ) -> None:
        super().__init__(D, d, seed, dtype)
        self.layout = "pow2" if pow2 else "blocks"
        check_d(D, d, self.layout)
        segs = tuple(int(s) for s in segments) if segments is not None else (self.D,)
        if any(s <= 0 for s in segs) or sum(segs) != self.D:
            raise ValueError(
                f"fastfood segments must be positive lengths summing to D={self.D}, got {len(segs)} "
                f"segments summing to {sum(segs)}; pass the projected tensors' sizes (or None)"
            )
        bs = int(block_size)
        if bs < 1 or bs > FASTFOOD_BLOCK_MAX or bs & (bs - 1):
            raise ValueError(
                f"fastfood block_size must be a power of two in [1, 2^24], got {block_size}; e.g. 2**20"
            )
        self.segments = segs
        self.block_size = bs
        self.b = next_pow2(self.d)
        self.seg_starts = tuple(sum(segs[:i]) for i in range(len(segs)))
        pieces: list[list[_Piece]] = []
        nblk = 0
        idx = 0
        for si, length in enumerate(segs):
            mine: list[_Piece] = []
            for start, ln in cut_segment(length, bs, self.d, pow2):
                n = next_pow2(ln)
                c = min(n, self.b)
                q = -(-self.d // c)
                mine.append(_Piece(idx, si, start, ln, n.bit_length() - 1, c, q, nblk))
                idx += 1
                nblk += q
            pieces.append(mine)
        self._pieces = pieces
        self.num_blocks = nblk
        dev = torch.device(device) if device is not None else torch.device("cpu")
        gsq = torch.empty(nblk, dtype=torch.float64)
        for mine in pieces:
            for pc in mine:
                gsq[pc.first_block : pc.first_block + pc.q] = self._gsq(pc)
        scale = 1.0 / (gsq.sqrt() * math.sqrt(self.D))
        self.register_buffer("block_scale", scale.to(dev), persistent=False)
        # per-piece key caches, built on first use: 56-72 bytes per block (the Triton and C++ kernels' keys,
        # the torch path's key columns), and B * scale (q, c) for pieces with q * c <= _SIGN_CACHE
        self._tri_keys: dict[tuple[int, torch.device], Tensor] = {}
        self._key_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._cpu_keys: dict[int, Tensor] = {}
        self._bs_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    # -------------------------------------------------------------- factors
    def _keys(self, pc: _Piece, device: torch.device) -> Tensor:
        """(7, q, 1) int64 keys of the piece's q blocks: xk, a0, a1, ak, a2, kg, kb."""
        ks = [block_keys(self.seed, pc.index, j) for j in range(pc.q)]
        rows = [[getattr(k, f) for k in ks] for f in ("xk", "a0", "a1", "ak", "a2", "kg", "kb")]
        return torch.tensor(rows, dtype=torch.int64).view(7, pc.q, 1).to(device)

    def _gsq(self, pc: _Piece) -> Tensor:
        """||G_pj||^2 (q,) float64 for the piece's blocks (CPU; kernel when available)."""
        n = 1 << pc.kbits
        probe = torch.empty(1)
        mod = fast_module(probe)
        out = torch.empty(pc.q, dtype=torch.float64)
        for j in range(pc.q):
            k = block_keys(self.seed, pc.index, j)
            if mod is not None:
                out[j] = mod.ff_gsq(pc.kbits, k.kg, gauss_table())
                continue
            acc = 0.0
            for s0 in range(0, n, FASTFOOD_CHUNK):
                i = torch.arange(s0, min(n, s0 + FASTFOOD_CHUNK), dtype=torch.int64)
                acc += float(_gauss(i, k.kg, torch.float64).square().sum())
            out[j] = acc
        return out

    def block_factors(self, piece: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """B (c,) float64, Pi (n,) int64, G (n,) float64 and the scale of block (piece, chunk).

        Test utility (O(n) memory): the block is y = (H_n G Pi H_c B x)[:D_p] * scale with
        (Pi v)_i = v[Pi_i mod c] for v = H_c B x periodic, x (c,) the chunk of theta_d.
        """
        pc = [p for mine in self._pieces for p in mine][piece]
        n = 1 << pc.kbits
        k = block_keys(self.seed, pc.index, chunk)
        i = torch.arange(n, dtype=torch.int64)
        perm = hashed_perm(i, pc.kbits, k.xk, k.a0, k.a1, k.ak, k.a2)
        g = _gauss(i, k.kg, torch.float64)
        b = _signs(pc.c, torch.tensor([[k.kb]]), torch.float64)[0]
        return b, perm, g, float(self.block_scale[pc.first_block + chunk])

    def pieces(self) -> list[tuple[int, int, int, int, int]]:
        """(segment, start in segment, length, n, q) of every piece, in order."""
        return [(p.segment, p.start, p.length, 1 << p.kbits, p.q) for mine in self._pieces for p in mine]

    def state_bytes(self) -> int:
        """Bytes held between calls: the per-block scales (the 16 KiB Gaussian table is shared)."""
        return self.block_scale.numel() * self.block_scale.element_size()

    # -------------------------------------------------------------- compute
    def _cached_keys(self, pc: _Piece, device: torch.device) -> Tensor:
        key = (pc.index, device)
        t = self._key_cache.get(key)
        if t is None:
            t = self._key_cache[key] = self._keys(pc, device)
        return t

    def _kernel_keys(self, pc: _Piece) -> Tensor:
        """(q, 6) int64 CPU keys (xk, a0, a1, ak, a2, kg) of the piece's blocks for the C++ kernel."""
        t = self._cpu_keys.get(pc.index)
        if t is None:
            rows = [block_keys(self.seed, pc.index, j).perm_args() for j in range(pc.q)]
            t = self._cpu_keys[pc.index] = torch.tensor(rows, dtype=torch.int64)
        return t

    def _sign_scale(self, pc: _Piece, keys: Tensor, dt: torch.dtype) -> Tensor:
        """B_j * scale_j (q, c): the same bits as multiplying by B then by the scale (B = +-1)."""
        key = (pc.index, keys.device, dt)
        t = self._bs_cache.get(key)
        if t is None:
            scale = self.block_scale[pc.first_block : pc.first_block + pc.q].to(dt).view(pc.q, 1)
            t = _signs(pc.c, keys[6], dt).mul_(scale)
            if pc.q * pc.c <= _SIGN_CACHE:
                self._bs_cache[key] = t
        return t

    def _triton_keys(self, tri: ModuleType, pc: _Piece, device: torch.device) -> Tensor:
        """(q, 9) int64 keys of the piece's blocks for the Triton kernels (cached per device)."""
        key = (pc.index, device)
        t = self._tri_keys.get(key)
        if t is None:
            ks = [block_keys(self.seed, pc.index, j).perm_args() for j in range(pc.q)]
            t = self._tri_keys[key] = tri.keys_tensor(ks, pc.kbits, device)
        return t

    def _tables(self, pc: _Piece, keys: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """idx = Pi mod c (q, n) int64 and G (q, n) for the piece's blocks (torch path)."""
        i = torch.arange(1 << pc.kbits, device=keys.device, dtype=torch.int64)
        perm = hashed_perm(i, pc.kbits, keys[0], keys[1], keys[2], keys[3], keys[4])
        return perm & (pc.c - 1), _gauss(i, keys[5], dtype)

    def _piece_forward(self, theta: Tensor, pc: _Piece, z: Tensor | None = None) -> Tensor:
        """(H_n sum_j G_j Pi_j H_c B_j theta_j) * scale_j, the piece's n rows (n,), no autograd.

        ``z`` (n,) contiguous: where to write (e.g. the output slice when the piece is n long).
        """
        dev, dt = theta.device, theta.dtype
        n, c, q = 1 << pc.kbits, pc.c, pc.q
        keys = self._cached_keys(pc, dev)
        xb = torch.zeros(q * c, dtype=dt, device=dev)
        xb[: self.d] = theta
        xb = xb.view(q, c).mul_(self._sign_scale(pc, keys, dt))  # (q, c) B theta * scale
        u = wht_(xb)  # (q, c) H_c B theta, one period each
        if z is None:
            z = torch.empty(n, dtype=dt, device=dev)
        tri = triton_module(z)
        if tri is not None:  # z = sum_j G_j u_j[Pi_j mod c]: one Triton pass over all blocks
            tri.ff_expand(u, z, pc.kbits, self._triton_keys(tri, pc, dev), gauss_table(dev))
            return wht_(z)
        mod = fast_module(z)
        if mod is not None:  # z = sum_j G_j u_j[Pi_j mod c], one fused pass over all blocks
            mod.ff_expand_multi(u, z, pc.kbits, self._kernel_keys(pc), gauss_table())
        else:
            idx, g = self._tables(pc, keys, dt)  # (q, n)
            torch.sum(torch.gather(u, 1, idx).mul_(g), dim=0, out=z)  # (n,) sum_j G_j u_j[idx_j]
        return wht_(z)

    def _piece_adjoint(self, grad: Tensor, pc: _Piece, out: Tensor) -> None:
        """out (d,) += P_piece^T grad, grad (length,)."""
        dev, dt = grad.device, grad.dtype
        n, c, q = 1 << pc.kbits, pc.c, pc.q
        tri = triton_module(grad)
        if tri is not None:  # float32 throughout (bf16 gradients accumulate in float32)
            dt = torch.float32
        z = torch.empty(n, dtype=dt, device=dev)
        z[: pc.length] = grad
        z[pc.length :] = 0
        wht_(z)  # H_n pad grad
        keys = self._cached_keys(pc, dev)
        mod = fast_module(z)
        if tri is not None:  # bins_j = sum over Pi_j mod c of G_j z: a deterministic Triton gather-reduce
            bins = tri.ff_bin(z, c, pc.kbits, self._triton_keys(tri, pc, dev), gauss_table(dev))
        elif mod is not None:  # bins_j = sum over Pi_j mod c of G_j z, all blocks in one call
            bins = mod.ff_bin_multi(z, c, pc.kbits, self._kernel_keys(pc), gauss_table())
        else:
            idx, g = self._tables(pc, keys, dt)  # (q, n)
            bins = torch.zeros(q, c, dtype=dt, device=dev).scatter_add_(1, idx, g.mul_(z))
        gb = wht_(bins)  # (q, c) H_c Pi^T G H grad
        gb.mul_(self._sign_scale(pc, keys, dt))
        out.add_(gb.view(-1)[: self.d])

    def segment_forward(self, theta: Tensor, segment: int, out: Tensor | None = None) -> Tensor:
        """Rows of segment ``segment`` of P theta: theta (d,) -> (segments[segment],), no autograd
        (written into ``out`` when given: a contiguous (segments[segment],) tensor)."""
        if out is None:
            out = torch.empty(self.segments[segment], dtype=theta.dtype, device=theta.device)
        for pc in self._pieces[segment]:
            dst = out[pc.start : pc.start + pc.length]
            if pc.length == 1 << pc.kbits:
                self._piece_forward(theta, pc, dst)  # written in place: no copy
            else:
                dst.copy_(self._piece_forward(theta, pc)[: pc.length])
        return out

    def segment_adjoint(self, grad: Tensor, segment: int) -> Tensor:
        """P_s^T grad for one segment: grad (segments[segment],) -> (d,), no autograd."""
        grad = grad.reshape(-1)
        dt = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
        out = torch.zeros(self.d, dtype=dt, device=grad.device)
        for pc in self._pieces[segment]:
            self._piece_adjoint(grad[pc.start : pc.start + pc.length], pc, out)
        return out

    def segment_slice(self, segment: int) -> slice:
        """Where segment ``segment`` sits in the flat (D,) output."""
        s = self.seg_starts[segment]
        return slice(s, s + self.segments[segment])

    def forward(self, theta_d: Tensor) -> Tensor:
        """P theta_d (D,), one differentiable segment at a time (concatenated)."""
        self._check_input(theta_d)
        out: Tensor = _StackFn.apply(theta_d, self)
        return out

    def _device(self) -> torch.device:
        return self.block_scale.device

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, layout={self.layout}, segments={len(self.segments)}, "
                f"block_size={self.block_size}, blocks={self.num_blocks}")


class _StackFn(torch.autograd.Function):
    """y = P theta, every segment written into one (D,) output (no concatenation); backward: the sum of
    the segments' P_s^T g_s, last segment first."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, theta: Tensor, proj: BlockFastfoodProjection) -> Tensor:
        ctx.proj = proj  # type: ignore[attr-defined]
        theta = theta.detach()
        out = torch.empty(proj.D, dtype=theta.dtype, device=theta.device)
        for s in range(len(proj.segments)):
            proj.segment_forward(theta, s, out[proj.segment_slice(s)])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        proj: BlockFastfoodProjection = ctx.proj  # type: ignore[attr-defined]
        grad = grad.contiguous()
        last = len(proj.segments) - 1
        out = proj.segment_adjoint(grad[proj.segment_slice(last)], last)
        for s in range(last - 1, -1, -1):  # last segment first: the order autograd summed per-segment nodes in
            out.add_(proj.segment_adjoint(grad[proj.segment_slice(s)], s))
        return out, None
