"""Streamed subspace weights: each projected tensor is built when its module reads it.

With the Fastfood layout "blocks" (`idlab.subspace.fastfood.BlockFastfoodProjection`) every projected
tensor i has its own rows P_i of P, so its weight

    theta_i = theta_0,i + lambda_i P_i theta          (lambda_i = 1 without SAID)

can be computed on its own. `SubspaceModel` registers one `SlotWeight` parametrization
(`torch.nn.utils.parametrize`) per projected tensor, so a module's weight exists only while
the module runs: just in time, one tensor at a time, never a length-D offset.

- `build_weight`: theta_i from theta, lambda_i and theta_0,i (no autograd); the forward and
  the recomputation share it, so both give the same bits.
- `StreamedWeight`: the autograd node of theta_i. Forward: `build_weight`. Backward, as soon
  as g_i = dL/dtheta_i exists: a = P_i^T g_i (d',), d theta = lambda_i a and
  d lambda_i = <g_i, P_i theta> = <a, theta>. Nothing of length D_i is saved.
- `recompute_hooks`: `torch.autograd.graph.saved_tensors_hooks` that save a *recipe* (tensor
  index and view geometry) instead of a weight that an op keeps for its backward (a linear
  layer keeps W^T to compute dL/dx), and rebuild the weight in the backward. With them a
  step holds no copy of the reparameterised weights at all (docs/ENGINE.md, "Memory").
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["SlotWeight", "StreamedWeight", "build_weight", "recompute_hooks"]

#: Attribute that marks a weight built by `SlotWeight` as (id of its owner, tensor index).
_TAG = "_idlab_slot"


class _Owner(Protocol):
    """What a `SlotWeight` needs of its `idlab.subspace.SubspaceModel`."""

    def slot_weight(self, i: int, t0: Tensor) -> Tensor: ...

    def rebuild_weight(self, i: int) -> Tensor: ...


class SegmentProjection(Protocol):
    """What `build_weight` and `StreamedWeight` need of P (`BlockFastfoodProjection` has it)."""

    def segment_forward(self, theta: Tensor, i: int, /) -> Tensor: ...

    def segment_adjoint(self, g: Tensor, i: int, /) -> Tensor: ...


class _Ctx(Protocol):
    """The autograd context of `StreamedWeight` with the attributes it stores."""

    proj: SegmentProjection
    i: int
    has_lam: bool
    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *tensors: Tensor) -> None: ...


def build_weight(theta: Tensor, lam: Tensor | None, t0: Tensor, proj: SegmentProjection, i: int) -> Tensor:
    """theta_0,i + lambda_i P_i theta, shape and dtype of t0, no autograd.

    P_i theta is computed in theta's dtype (float32 by default), scaled, added to theta_0,i and
    rounded once to the model's dtype. ``proj`` is a `BlockFastfoodProjection`, ``i`` its
    segment (the tensor's rows).
    """
    y = proj.segment_forward(theta.detach(), i)  # (D_i,) theta's dtype
    if lam is not None:
        y.mul_(lam.detach().to(y.dtype))
    flat = t0.detach().reshape(-1)  # (D_i,)
    out = y.add_(flat) if flat.dtype == y.dtype else y.add_(flat.to(y.dtype)).to(t0.dtype)
    return out.view(t0.shape)


class StreamedWeight(torch.autograd.Function):
    """theta_i = theta_0,i + lambda_i P_i theta for one tensor; see the module docstring."""

    @staticmethod
    def forward(ctx: _Ctx, theta: Tensor, lam: Tensor | None, t0: Tensor, proj: SegmentProjection, i: int) -> Tensor:
        ctx.proj, ctx.i, ctx.has_lam = proj, i, lam is not None
        ctx.save_for_backward(theta, lam if lam is not None else theta.new_empty(0))
        return build_weight(theta, lam, t0, proj, i)

    @staticmethod
    @once_differentiable
    def backward(ctx: _Ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        theta, lam = ctx.saved_tensors
        a = ctx.proj.segment_adjoint(g.reshape(-1).to(theta.dtype), ctx.i)  # (d',) P_i^T g_i
        if not ctx.has_lam:
            return a, None, None, None, None
        g_lam = torch.dot(a, theta).to(lam.dtype) if ctx.needs_input_grad[1] else None
        return a.mul_(lam.to(a.dtype)), g_lam, None, None, None


class SlotWeight(nn.Module):
    """Parametrization of projected tensor ``i``: the module reads theta_0,i + lambda_i P_i theta.

    Registered by `SubspaceModel` with `torch.nn.utils.parametrize.register_parametrization`;
    the original parameter (theta_0,i, frozen) stays the module's storage. The owner is held
    by a weak reference, so the wrapped model does not own its wrapper (no module cycle).
    """

    def __init__(self, owner: nn.Module, i: int) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)
        self.i = i

    def forward(self, t0: Tensor) -> Tensor:
        owner: Any = self._owner()
        if owner is None:
            raise RuntimeError(
                "this module's weight is parametrized by an idlab SubspaceModel that no longer exists; "
                "use SubspaceModel.merged() for a plain model"
            )
        w: Tensor = owner.slot_weight(self.i, t0)
        return w

    def extra_repr(self) -> str:
        return f"tensor={self.i}"


def tag(weight: Tensor, owner: object, i: int) -> Tensor:
    """Mark ``weight`` as tensor ``i`` of ``owner`` (so `recompute_hooks` may drop and rebuild it)."""
    root = weight if weight._base is None else weight._base  # saved views point at the root
    setattr(root, _TAG, (id(owner), i))
    return weight


class _Recipe(NamedTuple):
    """How to rebuild a saved weight (or a view of it, e.g. the W^T a linear layer keeps)."""

    i: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def recompute_hooks(owner: _Owner) -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which ops save recipes instead of ``owner``'s tagged weights (or their views).

    pack: a tensor whose base carries ``owner``'s tag becomes a `_Recipe` (index, size, stride,
    storage offset); any other tensor is saved as usual. unpack (in the backward): the weight is
    rebuilt with `build_weight` (same bits: theta and lambda have not changed before the optimiser
    step) and the saved view is taken again with ``as_strided``.
    """
    me = id(owner)

    def pack(t: Tensor) -> Tensor | _Recipe:
        base = t if t._base is None else t._base
        mark = getattr(base, _TAG, None)
        if mark is None or mark[0] != me or t.dtype != base.dtype:
            return t
        return _Recipe(mark[1], t.size(), t.stride(), int(t.storage_offset()))

    def unpack(x: Tensor | _Recipe) -> Tensor:
        if not isinstance(x, _Recipe):
            return x
        with torch.no_grad():
            w = owner.rebuild_weight(x.i)
        return w.as_strided(x.size, x.stride, x.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
