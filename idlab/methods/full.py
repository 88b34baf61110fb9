"""Full fine-tuning: every parameter trains; the baseline of d90 and r90.

Delta W of every 2-D ``nn.Linear`` weight is W_ft - W_0, taken in float32 against a host copy
of W_0 made before training (as loaded: a bf16 model's copy is exact at 2 B per entry). It is
exact under fp32 / tf32 / bf16-mixed (float32 master weights); under pure ``bf16`` precision it
is the difference of the bf16-rounded weights the run trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from idlab.methods.base import Axes, Delta, GridContext, Method, PlanTerms, Prepared, Style
from idlab.models import linear_weights
from idlab.options import doc


@dataclass(frozen=True)
class FullSettings:
    """The study's ``full:`` block."""

    lr: tuple[float, ...] = field(
        default=(2e-5,), metadata=doc("learning rate(s); several = a per-cell search, best kept in the report"))


@dataclass(frozen=True)
class FullAxes(Axes):
    """Full fine-tuning has no axes: one cell."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> FullAxes:
        return cls()

    def variant(self) -> str:
        return "full FT"


class FullFineTuning(Method[FullSettings, FullAxes]):
    """Every parameter trainable."""

    name = "full"
    settings_type = FullSettings
    axes_type = FullAxes
    help = "full fine-tuning: every parameter trainable (the baseline of d90 and r90)"
    title = "full FT"
    baseline = True
    shardable = True
    style = Style(marker="*", size=11.0)

    def cells(self, settings: FullSettings, ctx: GridContext | None = None) -> list[FullAxes]:
        return [FullAxes()]

    def prepare(self, model: nn.Module, axes: FullAxes, seed: int) -> Prepared:
        for p in model.parameters():
            p.requires_grad_(True)
        w0 = {n: w.detach().to("cpu", copy=True) for n, w in linear_weights(model).items()}

        def extract() -> dict[str, Delta]:
            # against W_0 rounded to the dtype W trained in (exact for fp32 and bf16-mixed)
            return {n: w.detach().cpu().float() - w0[n].to(w.dtype).float()
                    for n, w in linear_weights(model).items()}

        def load(folder: Path) -> None:
            """W = W_0 + Delta W from delta.safetensors: the linear weights only (the file's content)."""
            import warnings

            from idlab.deltas.io import dense_of, load_deltas

            warnings.warn(f"{folder}: a full fine-tuning run folder holds Delta W of the linear weights only; "
                          "embeddings, norms and biases are restored at their pretrained values", stacklevel=2)
            weights = linear_weights(model)
            with torch.no_grad():
                for n, dw in load_deltas(folder / "delta.safetensors").items():
                    w = weights[n]
                    w.copy_((w0[n].float() + dense_of(dw)).to(w.dtype))

        return Prepared(model, {"head": "train"}, extract, load=load, merged=lambda: model)

    def plan_terms(self, model: nn.Module, axes: FullAxes, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        weights = list(linear_weights(model).values())
        w0 = sum(w.numel() * loaded.get(id(w), torch.float32).itemsize for w in weights)
        return PlanTerms(host_copies=w0 + 4 * sum(w.numel() for w in weights))  # W_0 copy + Delta W fp32

    def describe(self, settings: FullSettings, cells: Sequence[FullAxes]) -> str:
        return f"lr {list(settings.lr)}"


__all__ = ["FullAxes", "FullFineTuning", "FullSettings"]
