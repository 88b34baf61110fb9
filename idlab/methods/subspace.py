"""Random-subspace training (Li et al. 2018 DID; Aghajanyan et al. 2021 SAID).

theta = theta_0 + P theta_d (SAID: + one scale lambda_i per tensor) through
`idlab.subspace.SubspaceModel`. Study block ``subspace:``: ``d`` (a list, or ``auto``: a log
grid refined by bisection near the d90 crossing, one sweep stage per refinement step),
``projection`` and ``said`` (axes), ``head`` (``train``: the classification head trains
directly and is counted; ``project``: it is inside P), ``layout`` and ``fastfood_state``
(Fastfood only), ``lr``. Delta W = the 2-D linear entries of ``SubspaceModel.delta()``;
theta_d (and lambda, the head) are saved as ``subspace.safetensors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal, cast

import torch
from torch import nn

from idlab.d90 import (
    Crossing,
    compare_crossings,
    crossing_text,
    next_bisection,
    rate_scores,
    select_lr,
)
from idlab.errors import ConfigError
from idlab.jsontypes import JsonObject, as_int
from idlab.methods.base import Axes, Delta, GridContext, Method, PlanTerms, Prepared, Style
from idlab.models import head_module_name, linear_weights
from idlab.options import doc
from idlab.subspace.base import DEFAULT_LAYOUT, LEGACY_LAYOUT, FastfoodState, Layout, ProjectionKind

#: ``d: auto`` refinement stops once the bracket is this narrow, (hi - lo) / hi <= 1/6, i.e. hi / lo < 1.2
REFINE_RTOL = 1 / 6


def subspace_memory(D: int, largest: int, weight_bytes: int, streamed: bool = False) -> int:
    """Device bytes a subspace run adds on top of theta_0, its activations and theta_d's optimiser.

    ``streamed`` (Fastfood layout "blocks", the default engine, docs/ENGINE.md): each weight is
    built when its module reads it and rebuilt in the backward, so one tensor exists at a time:
    the ``largest`` projected tensor in the weights' dtype (``weight_bytes`` each) plus its float32
    offset and that offset's gradient, (weight_bytes + 2 x 4 B) x largest. Otherwise (layout
    "global", dense, sparse): autograd keeps one reparameterised copy theta_0 + P theta_d of all
    D projected entries, plus 2 x 4 B x the largest tensor. The projection's own state and scratch
    are taken as negligible (one block of 2^20 floats for "blocks").
    """
    if streamed:
        return (weight_bytes + 2 * 4) * largest
    return D * weight_bytes + 2 * 4 * largest


def _projected(model: nn.Module, head: str) -> list[nn.Parameter]:
    """The tensors a run projects (`prepare`): every float parameter once (tied ones once), but the
    classification head with ``head: train``; D is their size, SAID's m their number."""
    name = head_module_name(model) if head == "train" else None
    head_ids = {id(p) for p in model.get_submodule(name).parameters()} if name else set()
    out: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        if p.is_floating_point() and id(p) not in head_ids:
            out.setdefault(id(p), p)
    return list(out.values())


@dataclass(frozen=True)
class SubspaceSettings:
    """The study's ``subspace:`` block."""

    d: tuple[int, ...] | Literal["auto"] = field(
        default=(100, 1000),
        metadata=doc("subspace dimensions, or 'auto': a log grid from auto_min to auto_max refined near d90"))
    projection: tuple[ProjectionKind, ...] = field(
        default=("fastfood",), metadata=doc("projection kinds to sweep: dense, sparse, fastfood"))
    said: tuple[bool, ...] = field(default=(False,), metadata=doc("False = DID, True = SAID (axis)"))
    head: Literal["train", "project"] = field(
        default="train",
        metadata=doc("classification head: 'train' (directly, counted as trainable) or 'project' (inside P)"))
    lr: tuple[float, ...] = field(default=(1e-2,), metadata=doc("learning rate(s) (nuisance search per cell)"))
    layout: Layout = field(
        default=DEFAULT_LAYOUT,
        metadata=doc("Fastfood layout: 'blocks' (stacked hashed blocks, streamed per tensor, near-zero state) or "
                     "'global' (Li et al.'s single block over next_pow2(D)); see docs/ENGINE.md"))
    fastfood_state: FastfoodState = field(
        default="auto",
        metadata=doc("what a Fastfood projection keeps between calls (same P, same results): 'auto' ('none' for "
                     "blocks, 'all' for global); global: 'all' (4 bytes per padded coordinate, fastest), 'index' "
                     "(2 bytes; G redrawn each call), 'none' (slowest); blocks: 'none' only"))
    auto_min: int = field(default=10, metadata=doc("d: auto -- smallest d of the initial log grid"))
    auto_max: int = field(default=100_000, metadata=doc("d: auto -- largest d of the initial log grid"))
    auto_per_decade: int = field(default=2, metadata=doc("d: auto -- grid points per decade (1, 2 or 3)"))
    refine: int = field(default=2, metadata=doc("d: auto -- bisection steps (geometric) inside the crossing bracket"))

    def auto_grid(self) -> tuple[int, ...]:
        """The initial log-spaced grid of d for ``d: auto``."""
        mult = {1: (1,), 2: (1, 3), 3: (1, 2, 5)}[self.auto_per_decade]
        out: list[int] = []
        dec = 1
        while dec <= self.auto_max:
            out += [m * dec for m in mult if self.auto_min <= m * dec <= self.auto_max]
            dec *= 10
        return tuple(out)


@dataclass(frozen=True)
class SubspaceAxes(Axes):
    """One subspace run. ``layout`` and ``fastfood_state`` are Fastfood's only (None otherwise)."""

    d: int
    projection: ProjectionKind
    said: bool = False
    head: Literal["train", "project"] = "train"
    layout: Layout | None = None
    fastfood_state: FastfoodState | None = None

    def to_dict(self) -> JsonObject:
        # run-id layout: layout enters for Fastfood unless Li's global (every run made before layouts
        # existed); fastfood_state only when it changes memory from the old default ("auto"/"all")
        out: JsonObject = {"projection": self.projection, "said": self.said, "head": self.head, "d": self.d}
        if self.projection == "fastfood" and self.layout not in (None, LEGACY_LAYOUT):
            out["layout"] = self.layout
        if self.projection == "fastfood" and self.fastfood_state not in (None, "auto", "all"):
            out["fastfood_state"] = self.fastfood_state
        return out

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> SubspaceAxes:
        ff = cfg["projection"] == "fastfood"
        # the literals are as stored (checked when the run was configured)
        return cls(d=as_int(cfg["d"]), projection=cast(ProjectionKind, cfg["projection"]), said=bool(cfg["said"]),
                   head=cast('Literal["train", "project"]', cfg.get("head", "train")),
                   layout=cast(Layout, cfg.get("layout", LEGACY_LAYOUT)) if ff else None,
                   fastfood_state=cast(FastfoodState, cfg.get("fastfood_state", "auto")) if ff else None)

    def label(self) -> str:
        return f"d={self.d} {self.projection}{' said' if self.said else ''}"

    def variant(self) -> str:
        return f"{'SAID' if self.said else 'DID'} {self.projection}"

    def size(self) -> int:
        return self.d

    @property
    def streamed(self) -> bool:
        """The engine builds one weight at a time (Fastfood layout "blocks")."""
        return self.projection == "fastfood" and self.layout == "blocks"


class Subspace(Method[SubspaceSettings, SubspaceAxes]):
    """DID / SAID: train theta_d in a random subspace."""

    name = "subspace"
    settings_type = SubspaceSettings
    axes_type = SubspaceAxes
    help = "random-subspace axes (Li et al. 2018 DID, Aghajanyan et al. 2021 SAID)"
    title = "subspace"
    size_counts_parameters = True
    size_key = "d"
    quantity = "d90"
    style = Style(marker="o", size=5.0)
    renamed: ClassVar[dict[str, str]] = {"cache_state": "subspace.fastfood_state (values 'auto', 'all', 'index', 'none')",
               "threshold": "target.threshold (the d90 / r90 / p90 threshold of every method)",
               "baseline": "target.baseline (the fixed baseline of every method's crossing)"}

    def check(self, settings: SubspaceSettings, where: str) -> None:
        if settings.d != "auto" and any(d < 1 for d in settings.d):
            raise ConfigError(f"{where}: key 'subspace.d': got {list(settings.d)}; every d must be >= 1 (or d: auto)")
        if settings.layout == "blocks" and settings.fastfood_state not in ("auto", "none"):
            raise ConfigError(f"{where}: key 'subspace.fastfood_state': got {settings.fastfood_state!r} with layout "
                              "'blocks', which has no state to keep; use 'auto' (or 'none'), or subspace.layout=global")
        if settings.auto_per_decade not in (1, 2, 3):
            raise ConfigError(f"{where}: key 'subspace.auto_per_decade': allowed values: 1, 2, 3")

    def check_model(self, settings: SubspaceSettings, model: nn.Module, where: str) -> None:
        """d <= D (a subspace has no more directions than the parameters it projects) and, with SAID,
        d > m (one coordinate per projected tensor: every listed d; with d: auto, some point of the grid),
        on the study's model (meta: shapes only)."""
        projected = _projected(model, settings.head)
        D, m = sum(p.numel() for p in projected), len(projected)
        auto = not isinstance(settings.d, tuple)
        grid: tuple[int, ...] = settings.d if isinstance(settings.d, tuple) else settings.auto_grid()
        what = (f"{type(model).__name__} projects D = {D:,} parameters in m = {m} tensors"
                + (" (the classification head trains directly: subspace.head=train)"
                   if settings.head == "train" and head_module_name(model) else ""))
        over = [d for d in grid if d > D]
        if over:
            key, got = ("subspace.auto_max", f"auto_max={settings.auto_max} (the d: auto grid {list(grid)})") if auto \
                else ("subspace.d", str(list(grid)))
            fix = f"subspace.auto_max={D}" if auto else f"subspace.d={[d for d in grid if d <= D] or [D]}"
            raise ConfigError(f"{where}: key '{key}': got {got}, but {what}; d = {over} exceed D (a subspace has at "
                              f"most D directions); use d <= {D} (e.g. {fix}), or a larger model")
        under = [d for d in grid if d <= m]
        # a d: auto grid spans decades: its SAID points at d <= m fail (and are reported) as long as one
        # lies above m (gpu_study, recipes/roberta_large_mrpc: DID keeps its low points); a listed d is refused
        if True in settings.said and under and (not auto or len(under) == len(grid)):
            key = "subspace.auto_min" if auto else "subspace.d"
            raise ConfigError(
                f"{where}: key '{key}': got {'auto_min=' + str(settings.auto_min) if auto else list(grid)} with "
                f"SAID (subspace.said={list(settings.said)}), but {what}; SAID spends one coordinate per projected "
                f"tensor (lambda_i), so it needs d > m = {m}, and d = {under} are not; use d >= {m + 1}, or "
                "subspace.said=[false] (DID)")

    def _kinds(self, settings: SubspaceSettings) -> list[SubspaceAxes]:
        """One cell per projection x said, at d = 0 (filled in by `cells`)."""
        out = []
        for p in settings.projection:
            ff = p == "fastfood"
            for said in settings.said:
                out.append(SubspaceAxes(d=0, projection=p, said=said, head=settings.head,
                                        layout=settings.layout if ff else None,
                                        fastfood_state=settings.fastfood_state if ff else None))
        return out

    def cells(self, settings: SubspaceSettings, ctx: GridContext | None = None) -> list[SubspaceAxes]:
        grid = settings.auto_grid() if settings.d == "auto" else tuple(settings.d)
        target = ctx.target() if (ctx is not None and settings.d == "auto") else None
        out = []
        for kind in self._kinds(settings):
            ds = list(grid)
            if target is not None and ctx is not None:
                ds += [d for d in self._refine(settings, ctx, kind, grid, target) if d not in ds]
            out += [replace(kind, d=d) for d in ds]
        return out

    def _refine(self, settings: SubspaceSettings, ctx: GridContext, kind: SubspaceAxes, grid: Sequence[int],
                target: float) -> list[int]:
        """Bisection points of one cell (`idlab.d90.next_bisection`), from stored results only.

        The curve is the seed mean (a diverged or unscored run a failure) at the best learning
        rate of each d; a stage waits until every run of the previous one is stored, so a
        restarted sweep recomputes the same points.
        """
        points: list[int] = []
        for _ in range(settings.refine):
            ds = sorted({*grid, *points})
            means: list[float] = []
            for d in ds:
                scores = ctx.scores(replace(kind, d=d), settings.lr)
                if scores is None:
                    return points  # the previous stage is not complete yet
                best = select_lr(scores)
                means.append(-math.inf if best is None else rate_scores(scores)[best])
            mid = next_bisection(ds, means, target, REFINE_RTOL)
            if mid is None:
                break
            points.append(mid)
        return points

    def stages(self, settings: SubspaceSettings) -> int:
        return 1 + (settings.refine if settings.d == "auto" else 0)

    def describe(self, settings: SubspaceSettings, cells: Sequence[SubspaceAxes]) -> str:
        ds = sorted({c.d for c in cells})
        return (f"d {ds}{' (auto)' if settings.d == 'auto' else ''} x projection {list(settings.projection)} x said "
                f"{list(settings.said)} x lr {list(settings.lr)}, head={settings.head}")

    def warm_up(self, axes: SubspaceAxes) -> None:
        """Build (first time, ~30 s, announced) or load the C++ Walsh-Hadamard kernel that `prepare`
        records and the Fastfood projections use, before the run is timed."""
        from idlab.subspace.hadamard import backend

        backend()

    def prepare(self, model: nn.Module, axes: SubspaceAxes, seed: int) -> Prepared:
        from idlab.subspace import SubspaceModel
        from idlab.subspace.hadamard import backend

        head = head_module_name(model) if axes.head == "train" else None
        linear = linear_weights(model)
        options = ({"fastfood_state": axes.fastfood_state}
                   if axes.fastfood_state not in (None, "auto") else None)
        sm = SubspaceModel(model, axes.d, projection=axes.projection, said=axes.said, seed=seed,
                           exclude=[head] if head else None, train_excluded=bool(head),
                           projection_options=options, layout=axes.layout or DEFAULT_LAYOUT)

        def extract() -> dict[str, Delta]:
            return {m: dt for m, dt in sm.delta(by_module=True).items() if m in linear}

        def save(folder: Path) -> None:
            from safetensors.torch import save_file

            tensors = {n: p.detach().cpu().contiguous().clone() for n, p in sm.named_parameters() if p.requires_grad}
            save_file(tensors, str(folder / "subspace.safetensors"), metadata={
                "d": str(axes.d), "projection": str(axes.projection), "layout": str(axes.layout),
                "said": str(axes.said), "seed": str(seed), "head": str(head)})

        def load(folder: Path) -> None:
            from safetensors.torch import load_file

            saved = load_file(str(folder / "subspace.safetensors"))
            trained = {n: p for n, p in sm.named_parameters() if p.requires_grad}
            if set(saved) != set(trained):
                raise ValueError(f"{folder / 'subspace.safetensors'} holds {sorted(saved)}, the model trains "
                                 f"{sorted(trained)}: not this run's subspace")
            with torch.no_grad():
                for n, t in saved.items():
                    trained[n].copy_(t)

        mode = "train" if head else ("project" if axes.head == "project" else "none")
        info = {"head": mode, "head_module": head, "layout": axes.layout, "kernel": backend()}
        return Prepared(sm, info, extract, save, load=load, merged=sm.merged)

    def claims(self, found: Mapping[str, Crossing]) -> list[str]:
        """Aghajanyan et al. 2021: SAID's d90 is at most DID's (per projection with both curves), stated
        with the bootstrap intervals (`crossing_text`, `compare_crossings`)."""
        out = []
        for proj in sorted({v.split(" ", 1)[1] for v in found if " " in v}):
            said, did = found.get(f"SAID {proj}"), found.get(f"DID {proj}")
            if said is None or did is None:
                continue
            verdict = compare_crossings(said, did)
            out.append(f"- Aghajanyan et al.: SAID's d90 <= DID's ({proj}). Here SAID {crossing_text(said)}, "
                       f"DID {crossing_text(did)}: {verdict}.")
        return out

    def plan_terms(self, model: nn.Module, axes: SubspaceAxes, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        # the weights are built from theta_d: they need no gradient of their own, the head trains directly
        projected = _projected(model, axes.head)
        D, largest = sum(p.numel() for p in projected), max((p.numel() for p in projected), default=0)
        for p in projected:
            p.requires_grad_(False)
        wb = max((loaded.get(id(p), torch.float32).itemsize for p in model.parameters() if p.is_floating_point()),
                 default=4)
        method_bytes = subspace_memory(D, largest, 2 if precision == "bf16" else wb, axes.streamed)
        linear = sum(w.numel() for w in linear_weights(model).values())
        return PlanTerms(extra_trainable=axes.d, extra_trainable_bytes=4 * axes.d, method_bytes=method_bytes,
                         host_copies=4 * linear)


__all__ = ["REFINE_RTOL", "Subspace", "SubspaceAxes", "SubspaceSettings", "subspace_memory"]
