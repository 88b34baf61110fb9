"""Fastfood layout "global": Li et al.'s single Fastfood block over the whole parameter vector.

`FastfoodProjection`, unchanged and bit-identical for a given seed to idlab's earlier default:
y = (H G Pi H B pad_L theta)[:D] / (||G|| sqrt(D)), L = next_pow2(D), B, Pi, G drawn from a CPU torch generator; 2-4 bytes of state per padded
coordinate and two (L,) scratch buffers. Kept for the Li et al. reproduction.

The default layout, "blocks", is in `idlab.subspace.fastfood`; `idlab.subspace.projections.make_projection`
chooses between them (docs/ENGINE.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from idlab.subspace.base import Projection, _generator, next_pow2
from idlab.subspace.hadamard import radix_plan, wht, wht_pingpong

__all__ = ["FASTFOOD_CHUNK", "FASTFOOD_PACK_MAX_BITS", "FASTFOOD_ROWS", "GLOBAL_STATES", "FastfoodProjection",
           "check_d"]

GLOBAL_STATES = ("all", "index", "none")
# Pack Pi and G into one int32 when b = next_pow2(d) <= 2^13 (G keeps >= 10 bits).
FASTFOOD_PACK_MAX_BITS = 13
# Pi mod b is unpacked to int64 this many coordinates at a time (8 MiB scratch) ...
FASTFOOD_CHUNK = 1 << 20
# ... and gathered / scatter-added as this many rows, which run in parallel on CPU.
FASTFOOD_ROWS = 16


def check_d(D: int, d: int, layout: str) -> None:
    """Raise a ValueError naming the fix when d > D (a Fastfood P of either layout needs d <= D)."""
    if d > D:
        raise ValueError(
            f"fastfood projection (layout {layout!r}) needs d <= D, got d={d} > D={D}: a d-dimensional "
            f"subspace of D parameters needs d <= D; use d <= {D} (or a 'dense'/'sparse' projection)"
        )


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
        check_d(D, d, "global")
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


