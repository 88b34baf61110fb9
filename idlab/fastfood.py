"""Fastfood projections P (D x d) in two layouts, made by `idlab.projections.make_projection`.

Both map theta_d (d,) to (D,) with every implicit column of unit length over all D rows
(to the usual Fastfood accuracy, about 1 +- 0.01; exactly 1 in expectation). H is the
unnormalised Walsh-Hadamard matrix (`idlab.hadamard`).

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

**"global": Li et al.'s single block** (`FastfoodProjection`, unchanged and bit-identical for a
given seed to idlab's earlier default): y = (H G Pi H B pad_L theta)[:D] / (||G|| sqrt(D)),
L = next_pow2(D), B, Pi, G drawn from a CPU torch generator; 2-4 bytes of state per padded
coordinate and two (L,) scratch buffers. Kept for the Li et al. reproduction.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from idlab.hadamard import fast_module, radix_plan, wht, wht_, wht_pingpong
from idlab.projections import Projection, _generator, next_pow2

__all__ = [
    "BLOCK_STATES",
    "FASTFOOD_BLOCK",
    "GLOBAL_STATES",
    "LAYOUTS",
    "BlockFastfoodProjection",
    "FastfoodProjection",
    "hashed_perm",
]

LAYOUTS = ("blocks", "global")
GLOBAL_STATES = ("all", "index", "none")
BLOCK_STATES = ("none",)
# "blocks": default largest block (power of two); pieces of a segment are at most this long.
FASTFOOD_BLOCK = 1 << 20
# "blocks": largest allowed block (the torch path holds a few int64 (block,) temporaries).
FASTFOOD_BLOCK_MAX = 1 << 24
# "global": pack Pi and G into one int32 when b = next_pow2(d) <= 2^13 (G keeps >= 10 bits).
FASTFOOD_PACK_MAX_BITS = 13
# "global": Pi mod b is unpacked to int64 this many coordinates at a time (8 MiB scratch) ...
FASTFOOD_CHUNK = 1 << 20
# ... and gathered / scatter-added as this many rows, which run in parallel on CPU.
FASTFOOD_ROWS = 16

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1
_GOLD32 = 0x9E3779B1
_FMIX = 0x045D9F3B
_TABLE_BITS = 12


def _check_d(D: int, d: int, layout: str) -> None:
    if d > D:
        raise ValueError(
            f"fastfood projection (layout {layout!r}) needs d <= D, got d={d} > D={D}: a d-dimensional "
            f"subspace of D parameters needs d <= D; use d <= {D} (or a 'dense'/'sparse' projection)"
        )


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
    ) -> None:
        super().__init__(D, d, seed, dtype)
        _check_d(D, d, "blocks")
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
            for start in range(0, length, bs):
                ln = min(bs, length - start)
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
        keys = self._keys(pc, dev)
        scale = self.block_scale[pc.first_block : pc.first_block + q].to(dt).view(q, 1)
        xb = torch.zeros(q * c, dtype=dt, device=dev)
        xb[: self.d] = theta
        xb = xb.view(q, c).mul_(_signs(c, keys[6], dt)).mul_(scale)  # (q, c) B theta * scale
        u = wht_(xb)  # (q, c) H_c B theta, one period each
        if z is None:
            z = torch.empty(n, dtype=dt, device=dev)
        mod = fast_module(z)
        if mod is not None and q == 1:
            k = block_keys(self.seed, pc.index, 0)
            mod.ff_expand(u[0], z, pc.kbits, *k.perm_args(), gauss_table(), False)
        else:
            idx, g = self._tables(pc, keys, dt)  # (q, n)
            torch.sum(torch.gather(u, 1, idx).mul_(g), dim=0, out=z)  # (n,) sum_j G_j u_j[idx_j]
        return wht_(z)

    def _piece_adjoint(self, grad: Tensor, pc: _Piece, out: Tensor) -> None:
        """out (d,) += P_piece^T grad, grad (length,)."""
        dev, dt = grad.device, grad.dtype
        n, c, q = 1 << pc.kbits, pc.c, pc.q
        z = torch.empty(n, dtype=dt, device=dev)
        z[: pc.length] = grad
        z[pc.length :] = 0
        wht_(z)  # H_n pad grad
        keys = self._keys(pc, dev)
        mod = fast_module(z)
        if mod is not None and q == 1:
            k = block_keys(self.seed, pc.index, 0)
            bins = mod.ff_bin(z, c, pc.kbits, *k.perm_args(), gauss_table()).view(1, c)
        else:
            idx, g = self._tables(pc, keys, dt)  # (q, n)
            bins = torch.zeros(q, c, dtype=dt, device=dev).scatter_add_(1, idx, g.mul_(z))
        gb = wht_(bins)  # (q, c) H_c Pi^T G H grad
        scale = self.block_scale[pc.first_block : pc.first_block + q].to(dt).view(q, 1)
        gb.mul_(_signs(c, keys[6], dt)).mul_(scale)
        out.add_(gb.view(-1)[: self.d])

    def segment_forward(self, theta: Tensor, segment: int) -> Tensor:
        """Rows of segment ``segment`` of P theta: theta (d,) -> (segments[segment],), no autograd."""
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
        out = torch.zeros(self.d, dtype=grad.dtype, device=grad.device)
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
        parts = [_SegmentFn.apply(theta_d, self, s) for s in range(len(self.segments))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _device(self) -> torch.device:
        return self.block_scale.device

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, layout=blocks, segments={len(self.segments)}, "
                f"block_size={self.block_size}, blocks={self.num_blocks}")


class _SegmentFn(torch.autograd.Function):
    """y_s = P_s theta (segment s's rows); backward g -> P_s^T g."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, theta: Tensor, proj: BlockFastfoodProjection,
                segment: int) -> Tensor:
        ctx.proj, ctx.segment = proj, segment  # type: ignore[attr-defined]
        return proj.segment_forward(theta.detach(), segment)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        proj: BlockFastfoodProjection = ctx.proj  # type: ignore[attr-defined]
        return proj.segment_adjoint(grad.contiguous(), ctx.segment), None, None  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- global


class FastfoodProjection(Projection):
    """Layout "global", Li et al.'s Fastfood: y = (H G Pi H B pad_L(theta))[:D] / (||G||_2 sqrt(D)).

    L = next power of two >= D, one block for the whole model, d <= D. B (L,) random +-1,
    Pi a random permutation of L (applied as a gather: (Pi v)_i = v[Pi_i]), G (L,) N(0,1),
    drawn in that order from one CPU generator. H is the unnormalised Walsh-Hadamard matrix.

    Structure used: with b = next_pow2(d) and a = L / b, H_L = H_a ⊗ H_b and pad_L(theta) is
    zero outside its first b entries, so H B pad_L(theta) = ones(a) ⊗ u, u = H_b(B_b pad_b theta)
    (b,), and Pi of it is u[Pi mod b]. Forward: u (O(b log b)), z = G * u[idx] with
    idx = Pi mod b (L,), then one full H_L. Backward (adjoint): one full H_L on pad_L(g), times G,
    summed into b bins by idx, then H_b and B. Only B's first d entries matter and are kept.
    The gather and the binned sum run over FASTFOOD_CHUNK coordinates at a time as
    FASTFOOD_ROWS parallel rows (each row sums in a fixed order: deterministic on CPU).

    State, chosen by ``fastfood_state`` (all modes give the same P, bit for bit):

    - "all" (default), when b <= 2^FASTFOOD_PACK_MAX_BITS: one int32 word per padded
      coordinate whose low log2(b) bits hold idx and whose bits, read as a float32, *are* G:
      the N(0,1) draw with its lowest log2(b) mantissa bits replaced by idx (relative change
      < 2^-(23 - log2 b) <= 2^-10; the normalisation uses this G's norm). 4 bytes per padded
      coordinate, so 4 L / D per parameter (up to 8 when D is just above a power of two).
      Wider b: idx int32 + G float32 (8 bytes).
    - "index": idx only, int16 (int32 when b > 2^15): 2 bytes per padded coordinate, so
      2 L / D < 4 per parameter for every D, plus the 5 KiB generator state that G is redrawn
      from, into the workspace, in every forward and backward (one `randn` of L: about 40 ms
      at L = 2^24 on 2 CPU cores), then packed with idx exactly as above.
    - "none": nothing of length L; B, Pi and G are redrawn from the seed in every
      forward and backward (a randperm of L each time: slow, zero state).

    Workspace (keep_workspace=True): two float32 (L,) scratch buffers and one int64 index chunk
    reused across calls (8 bytes per padded coordinate + 8 MiB, not counted in `state_bytes`,
    freed by `release_workspace`); fresh 64 MiB buffers cost a page-fault pass each on CPU.
    """

    kind = "fastfood"
    layout = "global"
    b_sign: Tensor  # (d,) first d entries of B
    word: Tensor  # (L,) int32 packed idx | G bits (packed, cached)
    idx: Tensor  # (L,) int32 Pi mod b (unpacked, cached); int16/int32 in "index" mode
    g: Tensor  # (L,) float32 G (unpacked, cached)

    def __init__(
        self,
        D: int,
        d: int,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        fastfood_state: str = "all",
        keep_workspace: bool = True,
    ) -> None:
        super().__init__(D, d, seed, dtype)
        _check_d(D, d, "global")
        if not isinstance(fastfood_state, str) or fastfood_state not in GLOBAL_STATES:
            raise ValueError(
                f"fastfood_state={fastfood_state!r} is not a state of the 'global' Fastfood layout; "
                f"allowed: {', '.join(GLOBAL_STATES)} (or 'auto' = 'all')"
            )
        self.state_mode = fastfood_state
        self.L = next_pow2(D)
        self.b = next_pow2(d)
        self.keep_workspace = keep_workspace
        self.packed = self.b.bit_length() - 1 <= FASTFOOD_PACK_MAX_BITS
        self._ws: list[Tensor] = []
        self._g_state: Tensor | None = None  # CPU generator state before G ("index" mode)
        b_sign, idx, g, word = self._draw()
        g64 = g.double()
        self.scale = 1.0 / (math.sqrt(float((g64 * g64).sum())) * math.sqrt(D))
        self.register_buffer(
            "b_sign", b_sign.to(device=device, dtype=dtype), persistent=False
        )  # (d,)
        if self.state_mode == "index":
            small = torch.int16 if self.b <= 1 << 15 else torch.int32
            self.register_buffer("idx", idx.to(device=device, dtype=small), persistent=False)  # (L,)
        elif self.state_mode == "all":
            if word is not None:
                self.register_buffer("word", word.to(device), persistent=False)  # (L,) int32
            else:
                self.register_buffer("idx", idx.to(device), persistent=False)  # (L,) int32
                self.register_buffer("g", g.to(device), persistent=False)  # (L,) float32

    def state_bytes(self) -> int:
        """Bytes held between calls: buffers, plus the saved generator state in "index" mode."""
        extra = 0 if self._g_state is None else self._g_state.numel()
        return super().state_bytes() + extra

    def _bp(self) -> tuple[Tensor, Tensor, torch.Generator]:
        """B (L,) and Pi (L,) on CPU, and the generator positioned to draw G next."""
        gen = _generator(self.seed)
        b_full = (torch.randint(0, 2, (self.L,), generator=gen) * 2 - 1).float()
        perm = torch.randperm(self.L, generator=gen)
        return b_full, perm, gen

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """The raw draws on CPU: B (L,) +-1 float32, Pi (L,) int64, G (L,) float32 (as drawn)."""
        b_full, perm, gen = self._bp()
        return b_full, perm, torch.randn(self.L, generator=gen)

    def _pack(self, g: Tensor, idx: Tensor) -> Tensor:
        """In place: G's low log2(b) bits := idx; returns the int32 view (the packed word)."""
        return g.view(torch.int32).bitwise_and_(~(self.b - 1)).bitwise_or_(idx)

    def _draw(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """B[:d] (d,), idx = Pi mod b int32 (L,), G as used float32 (L,), packed word or None.

        In "index" mode the first call also saves the generator state that G is drawn from.
        """
        b_full, perm, gen = self._bp()
        if self.state_mode == "index" and self._g_state is None:
            self._g_state = gen.get_state()
        g = torch.randn(self.L, generator=gen)
        idx = (perm % self.b).to(torch.int32)
        del perm
        word = None
        if self.packed:
            word = self._pack(g, idx)
            g = word.view(torch.float32)
        return b_full[: self.d], idx, g, word

    def diag_g(self) -> Tensor:
        """G (L,) float32 exactly as used (see the class docstring)."""
        return self._draw()[2]

    def release_workspace(self) -> None:
        """Drop the cached scratch buffers (they come back on the next call if kept)."""
        self._ws = []

    def workspace_bytes(self) -> int:
        """Bytes of scratch currently held between calls (not persistent state)."""
        return sum(t.numel() * t.element_size() for t in self._ws)

    def _workspace(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Two (1, L) scratch buffers and one (chunk,) int64 index buffer, reused when kept."""
        ws = self._ws
        if len(ws) == 3 and ws[0].dtype == dtype and ws[0].device == device:
            return ws
        ws = [torch.empty(1, self.L, dtype=dtype, device=device) for _ in range(2)]
        ws.append(torch.empty(min(self.L, FASTFOOD_CHUNK), dtype=torch.int64, device=device))
        if self.keep_workspace:
            self._ws = ws
        return ws

    def _tables(
        self, device: torch.device, g_out: Tensor | None = None
    ) -> tuple[Tensor, Tensor, bool]:
        """(ints (L,), G (L,) float32, masked) on device: idx = Pi mod b = ints & (b - 1) when
        masked (the packed word), else ints itself. "index" mode redraws G into ``g_out`` (an
        (L,) scratch view) when it is a float32 CPU tensor; "none" redraws everything.
        """
        if self.state_mode == "none":
            _, idx, g, word = self._draw()
            ints = word if word is not None else idx
            return ints.to(device), g.to(device), word is not None
        if self.state_mode == "index":
            assert self._g_state is not None
            gen = torch.Generator()
            gen.set_state(self._g_state)
            ok = g_out is not None and g_out.device.type == "cpu" and g_out.dtype == torch.float32
            g = torch.randn(self.L, generator=gen, out=g_out if ok else None).to(device)
            if self.packed:
                self._pack(g, self.idx)
            return self.idx, g, False
        if not self.packed:
            return self.idx, self.g, False
        return self.word, self.word.view(torch.float32), True

    def _index_chunks(
        self, ints: Tensor, masked: bool, scratch: Tensor
    ) -> Iterator[tuple[slice, Tensor]]:
        """Yield (span, idx) over consecutive chunks of the L coordinates, idx = Pi mod b as an
        int64 (ROWS, chunk / ROWS) view of ``scratch``: 2-D so that `gather`/`scatter_add_` can
        run the rows in parallel (a 1-D `index_add_` into b bins is one thread on CPU).
        """
        n = scratch.numel()  # chunk length, a power of two dividing L
        rows = min(FASTFOOD_ROWS, n)
        for c0 in range(0, self.L, n):
            idx = scratch.copy_(ints[c0 : c0 + n])  # (n,) int64
            if masked:
                idx.bitwise_and_(self.b - 1)
            yield slice(c0, c0 + n), idx.view(rows, n // rows)

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        out: Tensor = _FastfoodFn.apply(theta_d, self)
        return out


def _fastfood_forward(theta: Tensor, proj: FastfoodProjection) -> Tensor:
    """(H G Pi H B pad_L theta)[:D] * scale; theta (d,) -> (D,), no autograd.

    Passes over L: gather u[Pi mod b] (chunked), times G, one per radix factor of H_L; one
    fresh (L,) buffer (the output), the rest in the workspace.
    """
    dev = theta.device
    xb = torch.zeros(proj.b, dtype=theta.dtype, device=dev)  # (b,)
    xb[: proj.d] = theta * proj.b_sign.to(theta.dtype) * proj.scale
    u = wht(xb)  # (b,) = H_b B pad_b theta, one period of H_L B pad_L theta
    out = torch.empty(1, proj.L, dtype=theta.dtype, device=dev)  # (1, L), returned
    work, _, scratch = proj._workspace(theta.dtype, dev)  # (1, L), -, (chunk,) int64
    # odd number of passes: start from the workspace so the result lands in `out`
    first, other = (out, work) if len(radix_plan(proj.L)) % 2 == 0 else (work, out)
    ints, g, masked = proj._tables(dev, other[0])  # "index" mode: G redrawn into `other`
    for span, idx in proj._index_chunks(ints, masked, scratch):  # idx (rows, n / rows)
        rows = idx.shape[0]
        torch.gather(u.expand(rows, proj.b), 1, idx, out=first[0, span].view(rows, -1))
    first.mul_(g)  # (1, L) = G Pi H B pad theta
    del ints, g
    y = wht_pingpong(first, other)  # (1, L) = H G Pi H B pad theta
    return y[0, : proj.D]


def _fastfood_adjoint(grad: Tensor, proj: FastfoodProjection) -> Tensor:
    """P^T grad = (B H_b sum_blocks Pi^T G H pad_L grad)[:d] * scale; grad (D,) -> (d,)."""
    dev = grad.device
    w1, w2, scratch = proj._workspace(grad.dtype, dev)  # (1, L), (1, L), (chunk,) int64
    if proj.D == proj.L:
        h = wht_pingpong(w1, w2, src=grad.view(1, proj.L))  # H grad
    else:
        w1[0, : proj.D] = grad
        w1[0, proj.D :] = 0
        h = wht_pingpong(w1, w2)  # (1, L) = H pad_L grad
    ints, g, masked = proj._tables(dev, (w2 if h is w1 else w1)[0])  # G may use the free buffer
    h.mul_(g)  # G H pad grad
    bins: Tensor | None = None  # (rows, b) partial sums, one row per parallel lane
    for span, idx in proj._index_chunks(ints, masked, scratch):  # idx (rows, n / rows)
        if bins is None:
            bins = torch.zeros(idx.shape[0], proj.b, dtype=grad.dtype, device=dev)
        bins.scatter_add_(1, idx, h[0, span].view(idx.shape[0], -1))
    assert bins is not None
    gb = wht(bins.sum(0))  # (b,) H_b Pi^T G H pad grad, summed over the a = L / b periods
    return gb[: proj.d] * proj.b_sign.to(grad.dtype) * proj.scale


class _FastfoodFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, theta: Tensor, proj: FastfoodProjection
    ) -> Tensor:
        ctx.proj = proj  # type: ignore[attr-defined]
        return _fastfood_forward(theta, proj)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return _fastfood_adjoint(grad.contiguous(), ctx.proj), None  # type: ignore[attr-defined]


