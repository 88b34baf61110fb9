"""Random-subspace training (Li et al. 2018) and its structure-aware variant SAID
(Aghajanyan et al. 2021) for any ``nn.Module``.

`SubspaceModel` wraps a model *without changing its code or its attributes*. Its
own parameters theta_0 (the initial or pretrained weights) stay where they are,
frozen, and every forward runs the model through `torch.func.functional_call`
with the reparameterised tensors

    DID:   theta_i = theta_0,i + (P theta_d)[s_i]                      (1)
    SAID:  theta_i = theta_0,i + lambda_i * (P theta_{d-m})[s_i]       (2)

where P is a frozen random D x d' projection (`idlab.subspace.projections.make_projection`,
every column unit length over all D projected entries together), (P theta)[s_i] the
rows of P that belong to tensor i (reshaped to its shape), m the
number of projected tensors, lambda (m,) one scalar per tensor initialised to 1,
and d' = d (DID) or d - m (SAID) so that the trainable count is exactly ``dim``.
theta_d starts at zero, so training starts exactly at theta_0.

Which tensors are projected: every floating-point parameter, or those selected by
``include`` / ``exclude`` -- shell-style `fnmatch` globs matched against a
parameter's qualified name (``"bert.encoder.layer.0.attention.self.query.weight"``)
*or* against any of its owning modules' names, so ``"classifier"`` selects
``classifier.weight`` and ``classifier.bias``, and ``"*.bias"`` every bias.
Excluded tensors are frozen, or trained directly with ``train_excluded=True``
(e.g. a freshly initialised classification head: ``score`` for Llama,
``classifier`` for BERT). Tied tensors (Hugging Face tied embeddings) are
projected once.

Engine (docs/ENGINE.md). With the default Fastfood layout "blocks" the projection is
*streamed* (`idlab.subspace.streamed`): each projected tensor is a `torch.nn.utils.parametrize`
parametrization that builds theta_0,i + lambda_i P_i theta when its module reads it (O(2^20)
scratch, `idlab.subspace.fastfood`), and its autograd node turns the tensor's gradient g_i into
P_i^T g_i as soon as g_i exists; with ``recompute=True`` (default) the weights an op keeps
for its backward are rebuilt there instead of kept. No length-D offset, gradient or scratch,
and no second copy of the weights, is ever held. Other kinds and layout "global" build the
whole length-D offset P theta each forward, split it and run the model through
`torch.func.functional_call`.

Memory: the wrapper holds the projection's state (near zero for "blocks"), theta_d and
lambda; theta_0 is the wrapped model's own storage (no copy). The m reparameterised
tensors are transient: rebuilt every forward (and, streamed with ``recompute``, again in the
backward instead of being kept by autograd).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from idlab.jsontypes import JsonObject
from idlab.subspace.base import DEFAULT_LAYOUT, LEGACY_LAYOUT, STREAMED_LAYOUTS
from idlab.subspace.selection import (
    Slot,
    as_patterns,
    drop_frozen_from_state,
    forgive_frozen_missing,
    select_tensors,
)
from idlab.subspace.streamed import (
    SegmentProjection,
    SlotWeight,
    StreamedWeight,
    build_weight,
    recompute_hooks,
    tag,
)

__all__ = ["SubspaceModel"]

_STATE_VERSION = 1


# make_projection keywords that change speed or memory, never the projection P itself.
_PROJECTION_OPTIONS = frozenset({"fastfood_state", "keep_workspace", "dense_cache_limit"})
_RENAMED_OPTIONS = {"cache_state": "fastfood_state (string values: 'auto', 'all', 'index', 'none')"}


class SubspaceModel(nn.Module):
    """Train ``model`` in a random ``dim``-dimensional subspace of its parameters.

    Args:
        model: any module (MLP, CNN, Hugging Face transformer). It is *not* copied:
            its projected (and frozen excluded) parameters get ``requires_grad=False``
            and serve as theta_0; its forward and buffers (BatchNorm statistics) are
            used as they are.
        dim: the trainable count d (>= 1). With ``said=True``, d - m coordinates are
            projected and m lambdas are trained (d must exceed m).
        projection: ``"fastfood"`` (default; needs d' <= D), ``"dense"`` or ``"sparse"``.
        layout: Fastfood layout, ``"blocks"`` (default: stacked hashed blocks, one segment per
            projected tensor, streamed, near-zero state) or ``"global"`` (Li et al.'s single
            block over next_pow2(D), as in idlab before; the Li reproduction uses it). Dense and
            sparse accept either (their P does not depend on it).
        said: structure-aware reparameterisation (2), one lambda per projected tensor.
        seed: seed of the projection P (P is a pure function of kind, D, d', seed).
        include: glob(s) choosing the projected tensors (default: every float parameter).
        exclude: glob(s) removed from the projected set.
        train_excluded: train the excluded float parameters directly (else they are frozen).
        device, dtype: where / in which precision the projection and theta_d live
            (default: the device of the model's first projected tensor, float32).
        projection_options: extra keyword arguments for `make_projection` that change speed
            or memory but never P itself (``fastfood_state``, ``keep_workspace``,
            ``dense_cache_limit``).
        recompute: streamed layout only: rebuild each weight in the backward instead of letting
            autograd keep it (no copy of the weights lives through the step; costs one more
            P_i theta per tensor). Default True.

    Raises:
        ValueError: dim <= 0, dim <= m with SAID, no float parameters, an include that
            matches nothing, everything excluded, an unknown projection kind, or d' > D
            for Fastfood (the last two from `make_projection`).

    State: ``state_dict()`` holds theta_d, lambdas, the extra state (`config`: seed,
    dim, kind, said, D, projected names, ...), the model's buffers and any directly
    trained excluded tensors -- not theta_0 and not P (regenerated from the seed).
    ``load_state_dict`` on a fresh wrap of the same base model restores the exact
    model (a different saved seed rebuilds P; a different structure raises ValueError).

    Example::

        sm = SubspaceModel(mnist_fc(), dim=750)       # 750 trainable numbers
        train(sm, task, TrainConfig(optimizer="adam", lr=1e-3), extra_loss=lambda: sm.l2_penalty(1e-5))
        plain = sm.merged()                           # an ordinary model with theta_0 + P theta_d
    """

    theta_d: nn.Parameter
    lambdas: nn.Parameter | None

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        projection: str = "fastfood",
        said: bool = False,
        seed: int = 0,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        train_excluded: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        projection_options: Mapping[str, Any] | None = None,
        *,
        layout: str = DEFAULT_LAYOUT,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"SubspaceModel: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"SubspaceModel: dim must be a positive integer, got dim={dim!r}")
        if not isinstance(projection, str):
            raise TypeError(f"SubspaceModel: projection must be a kind name, got {projection!r}")
        self.model = model
        self.dim = dim
        self.kind = projection
        self.said = bool(said)
        self.seed = int(seed)
        self.include = as_patterns(include, "include")
        self.exclude = as_patterns(exclude, "exclude")
        self.train_excluded = bool(train_excluded)
        self.layout = layout
        self.recompute = bool(recompute)
        self.projection_options = dict(projection_options or {})
        unknown = set(self.projection_options) - _PROJECTION_OPTIONS
        if unknown:
            renamed = [f"{k} is now {_RENAMED_OPTIONS[k]}" for k in sorted(unknown) if k in _RENAMED_OPTIONS]
            raise ValueError(
                f"SubspaceModel: unknown projection_options {sorted(unknown)}; "
                f"allowed: {sorted(_PROJECTION_OPTIONS)}" + (f" ({'; '.join(renamed)})" if renamed else "")
            )

        floats, selected = select_tensors(model, self.include, self.exclude)

        projected_ids = {id(p) for _, p in selected}
        slots: list[Slot] = []
        theta0: list[Tensor] = []
        start = 0
        for names, p in selected:
            slots.append(Slot(names[0], tuple(names), tuple(p.shape), start, p.numel()))
            theta0.append(p)
            start += p.numel()
        self._slots: tuple[Slot, ...] = tuple(slots)
        self._sizes: list[int] = [s.numel for s in slots]
        self.D = start
        self.m = len(slots)
        d_proj = dim - self.m if self.said else dim
        if self.said and d_proj <= 0:
            raise ValueError(
                f"SubspaceModel: said=True needs dim > m, the number of projected tensors; got dim={dim}, "
                f"m={self.m}; use dim >= {self.m + 1}, said=False, or project fewer tensors"
            )
        self.d_proj = d_proj
        self._device = torch.device(device) if device is not None else theta0[0].device
        self._dtype = dtype
        self.theta_d = nn.Parameter(torch.zeros(d_proj, device=self._device, dtype=dtype))
        if self.said:
            self.lambdas = nn.Parameter(torch.ones(self.m, device=self._device, dtype=dtype))
        else:
            self.register_parameter("lambdas", None)
        self.projection = self._make_projection(self.seed)

        # Only now, with every check passed, change the wrapped model's flags.
        for t in theta0:
            t.requires_grad_(False)
        self._trained_excluded: list[str] = []
        for names, p in floats:
            if id(p) not in projected_ids:
                p.requires_grad_(self.train_excluded)
                if self.train_excluded:
                    self._trained_excluded.append(names[0])

        self._readers: list[tuple[nn.Module, str]] = []
        if self.streamed:
            self._parametrize()
        self._use_cache = False
        self._cache: tuple[tuple[int, int], list[Tensor]] | None = None
        self.register_state_dict_post_hook(drop_frozen_from_state)
        self.register_load_state_dict_post_hook(forgive_frozen_missing)

    # ------------------------------------------------------------------ building
    def _make_projection(self, seed: int) -> nn.Module:
        from idlab.subspace.projections import make_projection

        segments = self._sizes if self.kind == "fastfood" and self.layout in STREAMED_LAYOUTS else None
        return make_projection(self.kind, self.D, self.d_proj, seed=seed, device=self._device, dtype=self._dtype,
                               layout=self.layout, segments=segments, **self.projection_options)

    def _parametrize(self) -> None:
        """Register a `SlotWeight` on every projected tensor and tied alias (streamed layout):
        each is built when its module reads it. ``_readers[i]`` = (module, attribute) whose
        parametrization holds theta_0,i (a plain list: no submodule registration)."""
        self._readers = []
        for i, slot in enumerate(self._slots):
            for name in slot.aliases:
                owner, _, attr = name.rpartition(".")
                module = self.model.get_submodule(owner)
                parametrize.register_parametrization(module, attr, SlotWeight(self, i), unsafe=True)
                if name == slot.name:
                    self._readers.append((module, attr))

    @contextmanager
    def _plain(self) -> Iterator[None]:
        """Within: the wrapped model without our parametrizations (theta_0 as plain parameters).

        torch's parametrized classes are shared by deep copies, so a copy is taken of the plain
        model and both sides are parametrized again afterwards (`merged`, ``copy.deepcopy``).
        """
        if not self.streamed:
            yield
            return
        for name in (n for slot in self._slots for n in slot.aliases):
            owner, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(self.model.get_submodule(owner), attr, leave_parametrized=False)
        try:
            yield
        finally:
            self._parametrize()

    def __deepcopy__(self, memo: dict[int, object]) -> SubspaceModel:
        """A deep copy whose parametrizations read the copy's theta_d (built on the plain model)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        with self._plain():
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if new.streamed:
            new._parametrize()
        return new

    @property
    def streamed(self) -> bool:
        """True when each tensor's offset is computed on its own (Fastfood layout "blocks")."""
        from idlab.subspace.fastfood import BlockFastfoodProjection

        return isinstance(self.projection, BlockFastfoodProjection)

    def _theta0(self) -> list[Tensor]:
        """theta_0,i: the wrapped model's own (frozen) tensors, parametrized or not."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        out: list[Tensor] = []
        for s in self._slots:
            owner, _, attr = s.name.rpartition(".")
            key = s.name if s.name in params else f"{owner + '.' if owner else ''}parametrizations.{attr}.original"
            out.append(params[key])
        return out

    def slot_weight(self, i: int, t0: Tensor) -> Tensor:
        """theta_i = theta_0,i + lambda_i P_i theta, differentiable (streamed layout; `SlotWeight`)."""
        lam = self.lambdas[i] if self.lambdas is not None else None
        w: Tensor = StreamedWeight.apply(self.theta_d, lam, t0, self.projection, i)
        return tag(w, self, i) if self.recompute else w

    def rebuild_weight(self, i: int) -> Tensor:
        """theta_i again, no autograd, the same bits as `slot_weight` (for `recompute_hooks`)."""
        lam = self.lambdas[i] if self.lambdas is not None else None
        module, attr = self._readers[i]
        t0 = getattr(module.parametrizations, attr).original  # theta_0,i, no lookup by name
        # streamed: P is a BlockFastfoodProjection
        return build_weight(self.theta_d, lam, t0, cast(SegmentProjection, self.projection), i)

    def _versions(self) -> tuple[int, int]:
        lam = self.lambdas._version if self.lambdas is not None else 0
        return (self.theta_d._version, lam)

    def offset(self) -> Tensor:
        """The flat offset P theta_d' of length D (before the SAID lambdas; materialises D)."""
        return self.projection(self.theta_d)

    def _reparameterised(self) -> list[Tensor]:
        """theta_i for every projected tensor, eq. (1)/(2): one add (addcmul) per tensor."""
        if self.streamed:
            return [self.slot_weight(i, t0) for i, t0 in enumerate(self._theta0())]
        pieces = self.offset().split(self._sizes)  # views; backward is a single cat
        lams = self.lambdas.unbind() if self.lambdas is not None else None
        out: list[Tensor] = []
        for i, (slot, t0, piece) in enumerate(zip(self._slots, self._theta0(), pieces)):
            piece = piece.view(slot.shape)
            if piece.dtype != t0.dtype:
                piece = piece.to(t0.dtype)
            if lams is None:
                out.append(t0 + piece)
            else:
                out.append(torch.addcmul(t0, piece, lams[i].to(t0.dtype)))
        return out

    def forward(self, *args: object, **kwargs: object) -> object:
        """The wrapped model's forward with theta_0 + offset in place of its projected tensors."""
        if self.streamed:  # the parametrizations build each tensor when its module reads it
            if self.recompute and torch.is_grad_enabled():
                with recompute_hooks(self):
                    return self.model(*args, **kwargs)
            return self.model(*args, **kwargs)
        tensors = self._reparameterised()
        if self._use_cache and torch.is_grad_enabled():
            self._cache = (self._versions(), tensors)
        params = {s.name: t for s, t in zip(self._slots, tensors)}
        return functional_call(self.model, params, args, kwargs, tie_weights=True, strict=False)

    # ------------------------------------------------------------------ helpers
    @property
    def num_trainable(self) -> int:
        """Trainable entries: ``dim`` plus the directly trained excluded tensors."""
        named = dict(self.model.named_parameters())
        return self.dim + sum(named[n].numel() for n in self._trained_excluded)

    @property
    def projected_names(self) -> list[str]:
        """Qualified names of the projected tensors (one per tied group), in offset order."""
        return [s.name for s in self._slots]

    def l2_penalty(self, weight: float) -> Tensor:
        """Li et al.'s L2 on theta_D: ``weight * sum_i ||theta_i||^2``, a scalar.

        Sums over the projected tensors (eq. 1/2) and the directly trained excluded
        ones. Use as ``train(..., extra_loss=lambda: sm.l2_penalty(1e-5))``: after the
        first call the tensors of the latest training forward are reused (they are
        already in its autograd graph), so the penalty costs no second projection.
        """
        self._use_cache = True
        cache, self._cache = self._cache, None
        if cache is not None and cache[0] == self._versions():
            tensors = cache[1]
        else:
            tensors = self._reparameterised()
        named = dict(self.model.named_parameters())
        total = sum((t.float().pow(2).sum() for t in tensors), torch.zeros((), device=tensors[0].device))
        for n in self._trained_excluded:
            total = total + named[n].float().pow(2).sum()
        return weight * total

    def penalty(self, l2: float) -> Callable[[], Tensor]:
        """``extra_loss`` for `idlab.training.loop.train`: a closure computing ``l2_penalty(l2)``."""
        return lambda: self.l2_penalty(l2)

    @torch.no_grad()
    def _offsets(self) -> list[Tensor]:
        """lambda_i * (P theta)[s_i] per projected tensor, in float32 at least (float64 for a float64
        theta_d): a bf16 theta_d (pure bf16 training) is widened before P is applied."""
        work = torch.promote_types(self.theta_d.dtype, torch.float32)
        theta = self.theta_d.detach().to(work)
        if self.streamed:
            proj = self.projection
            raw = [proj.segment_forward(theta, i) for i in range(self.m)]  # type: ignore[operator]
        else:
            raw = list(self.projection(theta).split(self._sizes))
        lam = self.lambdas.detach().to(work) if self.lambdas is not None else None
        return [(r if lam is None else r * lam[i]).view(s.shape) for i, (s, r) in enumerate(zip(self._slots, raw))]

    @torch.no_grad()
    def delta(self, by_module: bool = False) -> dict[str, Tensor]:
        """Delta W = lambda_i (P theta_d)[s_i] for every projected tensor (full shape, detached).

        Exact whatever the model's dtype: the projection's own offset, computed in theta_d's
        dtype (float32 by default), not the difference of two rounded (e.g. bf16) weights.
        Keys are parameter names (``net.0.weight``). With ``by_module=True`` only
        2-D ``.weight`` tensors are returned, keyed by their module's name (``net.0``),
        the convention of `idlab.deltas.io.save_deltas`.
        """
        out: dict[str, Tensor] = {}
        for slot, dw in zip(self._slots, self._offsets()):
            if not by_module:
                out[slot.name] = dw
            elif slot.name.endswith(".weight") and dw.ndim == 2:
                out[slot.name[: -len(".weight")]] = dw
        return out

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A deep copy of the wrapped model holding theta_0 + offset (all params trainable)."""
        with self._plain():
            plain = copy.deepcopy(self.model)
        params = dict(plain.named_parameters(remove_duplicate=False))
        for slot, t in zip(self._slots, self._reparameterised()):
            params[slot.name].copy_(t)
        for p in plain.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        return plain

    # ------------------------------------------------------------------ state
    def config(self) -> JsonObject:
        """JSON-able description: dim, kind, said, seed, D, d', m, patterns, projected names."""
        return {
            "version": _STATE_VERSION,
            "dim": self.dim,
            "projection": self.kind,
            "layout": self.layout,
            "said": self.said,
            "seed": self.seed,
            "D": self.D,
            "d_proj": self.d_proj,
            "m": self.m,
            "include": list(self.include) if self.include is not None else None,
            "exclude": list(self.exclude) if self.exclude is not None else None,
            "train_excluded": self.train_excluded,
            "projected": list(self.projected_names),
            "trained_excluded": list(self._trained_excluded),
        }

    def get_extra_state(self) -> JsonObject:
        return self.config()

    def set_extra_state(self, state: object) -> None:
        """Restore the seed (rebuilding P if it differs); refuse a different structure."""
        if not isinstance(state, dict) or "seed" not in state:
            raise ValueError(f"SubspaceModel: unrecognised extra state {state!r}")
        mine = self.config()
        keys = ["dim", "projection", "said", "D", "d_proj", "projected", "trained_excluded"]
        if self.kind == "fastfood":  # states saved before layouts existed used the global one
            state = {**state, "layout": state.get("layout", LEGACY_LAYOUT)}
            keys.append("layout")
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"SubspaceModel.load_state_dict: saved {key}={_short(state.get(key))} but this wrapper "
                    f"has {key}={_short(mine[key])}; wrap the same base model with the same dim, "
                    "projection, layout, said, include/exclude and train_excluded"
                )
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self.projection = self._make_projection(self.seed).to(self.theta_d.device)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, projection={self.kind!r}, layout={self.layout!r}, said={self.said}, seed={self.seed}, "
            f"D={self.D}, m={self.m}, trainable={self.num_trainable}"
        )


def _short(v: object) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."
