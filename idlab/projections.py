"""Random projections P (D x d) for subspace training: theta_D = theta_0 + P theta_d.

Li et al. (ICLR 2018), SCIENCE.md section 1. Every implicit column of P has unit length over
all D coordinates. Three kinds, made by `make_projection`:

- "dense": N(0,1) entries, each column divided by its norm. Above `DENSE_CACHE_LIMIT` entries
  the matrix is never held: fixed row blocks of P are regenerated from (seed, block) in the
  forward and again in the backward; only the d column norms are kept.
- "sparse": very sparse random projection (Li, Hastie & Church 2006), density 1/sqrt(D),
  entries +-1, columns normalised; held as compact int32 row indices with the sign folded in.
- "fastfood": Li et al.'s single block y = H G Pi H B pad_L(theta_d), first D entries, divided
  by ||G||_2 sqrt(D). Pi mod b and G share one int32 per padded coordinate (4 bytes); only
  B's first d signs are kept. Two (L,) scratch buffers and an index chunk are reused across
  calls (one module is not safe to call from several threads at once).

All random draws come from CPU `torch.Generator`s seeded from `seed`, then move to `device`,
so a projection is the same on every device for the same (kind, D, d, seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from idlab.hadamard import radix_plan, wht, wht_pingpong

KINDS = ("dense", "sparse", "fastfood")

# Dense: cache the matrix when D * d is at most this many entries (64 MiB in float32).
DENSE_CACHE_LIMIT = 1 << 24
# Dense: rows per regenerated block are chosen so a block holds about this many entries.
DENSE_BLOCK_ENTRIES = 1 << 20
# Fastfood: pack Pi and G into one int32 when b = next_pow2(d) <= 2^13 (G keeps >= 10 bits).
FASTFOOD_PACK_MAX_BITS = 13
# Fastfood: Pi mod b is unpacked to int64 this many coordinates at a time (8 MiB scratch) ...
FASTFOOD_CHUNK = 1 << 20
# ... and gathered / scatter-added as this many rows, which run in parallel on CPU.
FASTFOOD_ROWS = 16

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for mixing (seed, block) into one seed


def _generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded deterministically from (seed, stream)."""
    return torch.Generator().manual_seed(
        (seed * _MIX + stream * 0x632BE59BD9B4E019 + 1) % (1 << 63)
    )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class Projection(nn.Module):
    """A frozen random linear map R^d -> R^D with unit-length columns.

    Attributes:
        kind: "dense", "sparse" or "fastfood".
        D: output length (number of model parameters).
        d: input length (subspace dimension).
        seed: the seed every random draw derives from.
    """

    kind: str

    def __init__(self, D: int, d: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.D, self.d, self.seed, self.dtype = int(D), int(d), int(seed), dtype

    def forward(self, theta_d: Tensor) -> Tensor:
        """P theta_d: theta_d (d,) -> (D,), differentiable in theta_d."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of persistent state held by this projection (buffers and cached tensors)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def explicit(self, dtype: torch.dtype | None = None) -> Tensor:
        """The D x d matrix, built by applying the projection to the d basis vectors.

        Test utility for small D * d only: allocates D * d entries.
        """
        dev = self._device()
        eye = torch.eye(self.d, dtype=dtype or self.dtype, device=dev)  # (d, d)
        return torch.stack([self(eye[j]) for j in range(self.d)], dim=1)  # (D, d)

    def _device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _check_input(self, theta_d: Tensor) -> None:
        if theta_d.shape != (self.d,):
            raise ValueError(
                f"{self.kind} projection expects theta_d of shape ({self.d},), got {tuple(theta_d.shape)}"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, D={self.D}, d={self.d}, seed={self.seed}"


# ----------------------------------------------------------------------------- dense


class DenseProjection(Projection):
    """P = Z diag(1/||Z_j||), Z (D, d) with N(0,1) entries.

    Z is defined block by block: rows [k*rb, (k+1)*rb) are `torch.randn(rb, d)` from a generator
    seeded by (seed, k), with rb = max(1, DENSE_BLOCK_ENTRIES // d). The same blocks make the
    cached matrix (D * d <= cache_limit) and the regenerated one, so both modes give the same P.
    Regenerated: forward y = Z (theta / n) and backward g -> (Z^T g) / n, one pass over the
    blocks each, memory O(rb * d); the column norms n (d,) are computed once at construction.
    """

    kind = "dense"
    matrix: Tensor  # (D, d) normalised P, only when cached
    inv_norm: Tensor  # (d,) 1 / column norms, only when regenerated

    def __init__(
        self,
        D: int,
        d: int,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
        cache_limit: int = DENSE_CACHE_LIMIT,
    ) -> None:
        super().__init__(D, d, seed, dtype)
        self.block_rows = max(1, DENSE_BLOCK_ENTRIES // d)
        self.cached = D * d <= cache_limit
        if self.cached:
            z = torch.cat([self.block(k) for k in range(self.num_blocks)])  # (D, d)
            p = z / z.double().norm(dim=0).to(z.dtype)
            self.register_buffer("matrix", p.to(device=device, dtype=dtype), persistent=False)
        else:
            sq = torch.zeros(d, dtype=torch.float64)
            for k in range(self.num_blocks):
                sq += self.block(k).double().square().sum(0)
            self.register_buffer(
                "inv_norm", sq.rsqrt().to(device=device, dtype=dtype), persistent=False
            )

    @property
    def num_blocks(self) -> int:
        return -(-self.D // self.block_rows)

    def block(self, k: int) -> Tensor:
        """Rows [k*rb, min((k+1)*rb, D)) of the unnormalised Gaussian Z, float32 on CPU."""
        rows = min(self.block_rows, self.D - k * self.block_rows)
        return torch.randn(rows, self.d, generator=_generator(self.seed, k + 1))  # (rows, d)

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        if self.cached:
            return self.matrix.to(theta_d.dtype) @ theta_d  # (D, d) @ (d,) -> (D,)
        out: Tensor = _DenseRegen.apply(theta_d, self)
        return out


class _DenseRegen(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, theta: Tensor, proj: DenseProjection
    ) -> Tensor:
        ctx.proj = proj  # type: ignore[attr-defined]
        v = theta * proj.inv_norm.to(theta.dtype)  # (d,)
        out = torch.empty(proj.D, dtype=theta.dtype, device=theta.device)  # (D,)
        rb = proj.block_rows
        for k in range(proj.num_blocks):
            z = proj.block(k).to(device=theta.device, dtype=theta.dtype)  # (rows, d)
            torch.mv(z, v, out=out[k * rb : k * rb + z.shape[0]])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None]:
        proj: DenseProjection = ctx.proj  # type: ignore[attr-defined]
        acc = torch.zeros(proj.d, dtype=g.dtype, device=g.device)  # (d,)
        rb = proj.block_rows
        for k in range(proj.num_blocks):
            z = proj.block(k).to(device=g.device, dtype=g.dtype)  # (rows, d)
            acc.addmv_(z.T, g[k * rb : k * rb + z.shape[0]])
        return acc * proj.inv_norm.to(g.dtype), None


# ----------------------------------------------------------------------------- sparse


class SparseProjection(Projection):
    """Very sparse random projection (Li, Hastie & Church 2006), columns normalised.

    Each entry is nonzero with probability 1/s, s = sqrt(D), with sign +-1 equally likely.
    Column j has k_j ~ Binomial(D, 1/s) distinct rows drawn uniformly; a column drawn empty
    gets one row (k_j >= 1), so every column has unit length. Nonzeros of column j are
    +-1/sqrt(k_j) (the LHC scale sqrt(s) cancels in the normalisation).

    Stored (CSC): `signed_rows` int32 (nnz,) = (row + 1) * sign, column-major, and
    `col_ptr` int64 (d + 1,). Forward y = index_add over rows of v * theta[col]; backward is
    the gather/sum adjoint, both from autograd.
    """

    kind = "sparse"
    signed_rows: Tensor  # (nnz,) int32
    col_ptr: Tensor  # (d + 1,) int64

    def __init__(
        self, D: int, d: int, seed: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> None:
        super().__init__(D, d, seed, dtype)
        gen = _generator(seed)
        p = 1.0 / math.sqrt(D)
        counts = torch.binomial(
            torch.full((d,), float(D), dtype=torch.float64),
            torch.full((d,), p, dtype=torch.float64),
            generator=gen,
        )
        counts = counts.long().clamp_(1, D)  # (d,)
        cols = torch.repeat_interleave(torch.arange(d), counts)  # (nnz,)
        rows = torch.randint(D, (int(counts.sum()),), generator=gen)
        # distinct rows per column: drop duplicates, redraw the shortfall until none is left
        while True:
            key = torch.unique(cols * D + rows)  # sorted by (col, row)
            cols, rows = key // D, key % D
            have = torch.bincount(cols, minlength=d)
            short = counts - have
            if not bool((short > 0).any()):
                break
            extra_cols = torch.repeat_interleave(torch.arange(d), short)
            cols = torch.cat([cols, extra_cols])
            rows = torch.cat([rows, torch.randint(D, (extra_cols.numel(),), generator=gen)])
        signs = torch.randint(0, 2, (rows.numel(),), generator=gen) * 2 - 1
        col_ptr = torch.zeros(d + 1, dtype=torch.int64)
        col_ptr[1:] = torch.cumsum(counts, 0)
        self.register_buffer(
            "signed_rows", ((rows + 1) * signs).to(torch.int32).to(device), persistent=False
        )
        self.register_buffer("col_ptr", col_ptr.to(device), persistent=False)

    @property
    def nnz(self) -> int:
        return int(self.signed_rows.numel())

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        """(rows int64 (nnz,), cols int64 (nnz,), values (nnz,)) of P, values +-1/sqrt(k_j)."""
        counts = self.col_ptr.diff()  # (d,)
        cols = torch.repeat_interleave(torch.arange(self.d, device=counts.device), counts)
        sr = self.signed_rows.long()
        rows = sr.abs() - 1
        vals = sr.sign().to(self.dtype) * counts.to(self.dtype).rsqrt()[cols]
        return rows, cols, vals

    def sparse_matrix(self) -> Tensor:
        """P as a torch sparse COO tensor (D, d)."""
        rows, cols, vals = self.coo()
        return torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (self.D, self.d), check_invariants=True
        ).coalesce()

    def forward(self, theta_d: Tensor) -> Tensor:
        self._check_input(theta_d)
        rows, cols, vals = self.coo()
        contrib = vals.to(theta_d.dtype) * theta_d[cols]  # (nnz,)
        return torch.zeros(self.D, dtype=theta_d.dtype, device=theta_d.device).index_add(
            0, rows, contrib
        )


# ----------------------------------------------------------------------------- fastfood


class FastfoodProjection(Projection):
    """Li et al.'s Fastfood: y = (H G Pi H B pad_L(theta))[:D] / (||G||_2 sqrt(D)).

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

    State, chosen by ``cache_state`` (all modes give the same P, bit for bit):

    - True (or "all"), when b <= 2^FASTFOOD_PACK_MAX_BITS: one int32 word per padded
      coordinate whose low log2(b) bits hold idx and whose bits, read as a float32, *are* G:
      the N(0,1) draw with its lowest log2(b) mantissa bits replaced by idx (relative change
      < 2^-(23 - log2 b) <= 2^-10; the normalisation uses this G's norm). 4 bytes per padded
      coordinate, so 4 L / D per parameter (up to 8 when D is just above a power of two).
      Wider b: idx int32 + G float32 (8 bytes).
    - "index": idx only, int16 (int32 when b > 2^15): 2 bytes per padded coordinate, so
      2 L / D < 4 per parameter for every D, plus the 5 KiB generator state that G is redrawn
      from, into the workspace, in every forward and backward (one `randn` of L: about 40 ms
      at L = 2^24 on 2 CPU cores), then packed with idx exactly as above.
    - False (or "none"): nothing of length L; B, Pi and G are redrawn from the seed in every
      forward and backward (a randperm of L each time: slow, zero state).

    Workspace (keep_workspace=True): two float32 (L,) scratch buffers and one int64 index chunk
    reused across calls (8 bytes per padded coordinate + 8 MiB, not counted in `state_bytes`,
    freed by `release_workspace`); fresh 64 MiB buffers cost a page-fault pass each on CPU.
    """

    kind = "fastfood"
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
        cache_state: bool | str = True,
        keep_workspace: bool = True,
    ) -> None:
        super().__init__(D, d, seed, dtype)
        if d > D:
            raise ValueError(
                f"fastfood projection needs d <= D, got d={d} > D={D}: one Fastfood block maps at most "
                f"D coordinates; use d <= {D} or a 'dense'/'sparse' projection"
            )
        modes = {True: "all", "all": "all", "index": "index", False: "none", "none": "none"}
        if not isinstance(cache_state, (bool, str)) or cache_state not in modes:
            raise ValueError(
                f"fastfood cache_state must be True/'all', 'index' or False/'none', got {cache_state!r}"
            )
        self.state_mode = modes[cache_state]
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


# ----------------------------------------------------------------------------- factory


def make_projection(
    kind: str,
    D: int,
    d: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_state: bool | str = True,
    keep_workspace: bool = True,
    dense_cache_limit: int = DENSE_CACHE_LIMIT,
) -> Projection:
    """Build a frozen random projection P (D x d) with unit-length columns.

    Args:
        kind: "dense", "sparse" or "fastfood".
        D: number of model parameters (rows of P), > 0.
        d: subspace dimension (columns of P), > 0; fastfood needs d <= D.
        seed: every random draw derives from it (generated on CPU, identical on every device).
        device, dtype: where and in which float dtype the forward computes.
        cache_state: fastfood only, what is kept between calls (the same P in every mode):
            True / "all" idx and G (4 bytes per padded coordinate, fastest); "index" idx only
            (2 bytes per padded coordinate, < 4 per parameter for any D; G redrawn each
            call); False / "none" nothing of length L (everything redrawn, much slower).
        keep_workspace: fastfood only: reuse two (L,) scratch buffers across calls.
        dense_cache_limit: dense only: hold P as a matrix when D * d is at most this many
            entries (4 bytes each), else regenerate its blocks in every call. Both modes give
            the same P; caching trades memory for speed (e.g. 2**28 = 1 GiB for LeNet-size D).

    Returns:
        A `Projection`; ``proj(theta_d)`` maps (d,) -> (D,).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if int(D) <= 0:
        raise ValueError(f"projection needs D > 0 (number of parameters), got D={D}")
    if int(d) <= 0:
        raise ValueError(f"projection needs d > 0 (subspace dimension), got d={d}")
    if not dtype.is_floating_point:
        raise ValueError(f"projection dtype must be a float dtype, got {dtype}")
    if kind == "dense":
        if int(dense_cache_limit) < 0:
            raise ValueError(f"dense_cache_limit must be >= 0 entries, got {dense_cache_limit}")
        return DenseProjection(D, d, seed, device, dtype, cache_limit=int(dense_cache_limit))
    if kind == "sparse":
        return SparseProjection(D, d, seed, device, dtype)
    return FastfoodProjection(
        D, d, seed, device, dtype, cache_state=cache_state, keep_workspace=keep_workspace
    )
