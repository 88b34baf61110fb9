"""LoRA (Hu et al. 2021) through PEFT: W = W_0 + s B A on the target modules.

Study block ``lora:`` with PEFT's names: ``r`` (ranks to sweep), ``target_modules`` (sets to
sweep: an alias of `TARGET_SETS` or a list of module names), ``lora_alpha`` (a rule ``<c>r``,
alpha = c * r, or a number), ``use_rslora`` (axis), ``lora_dropout``, ``lr``. A classification
head goes to PEFT's ``modules_to_save``: it trains directly and is counted. Delta W is read as
`LowRankDelta` factors (`idlab.methods.lora_peft.lora_deltas`); the adapter is saved in PEFT's
format under ``adapter/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from idlab.errors import ConfigError
from idlab.jsontypes import JsonObject, as_float, as_int
from idlab.methods.base import Axes, GridContext, Method, PlanTerms, Prepared, Style
from idlab.models import head_module_name
from idlab.options import doc

#: Named target-module sets (a YAML item may also be a list of module names, or a
#: comma-separated string of them). Llama names, then BERT names (minilm-l6).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "v": ("v_proj",),
    "qv": ("q_proj", "v_proj"),
    "qk": ("q_proj", "k_proj"),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("all-linear",),
    "bert-qv": ("query", "value"),
    "bert-qkvo": ("query", "key", "value", "attention.output.dense"),
}


def target_set_label(modules: Sequence[str]) -> str:
    """Short name of a target-module set: its alias in `TARGET_SETS`, else the names joined by '+'."""
    for k, v in TARGET_SETS.items():
        if tuple(modules) == v:
            return k
    return "+".join(modules)


def parse_target_sets(value: object) -> tuple[tuple[str, ...], ...]:
    """A YAML ``target_modules`` value -> the tuple of target sets it names.

    Accepts an alias, a comma-separated string, a flat list of module names (one set) or a list
    of any of those. Raises ValueError naming the allowed aliases.
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("must not be an empty list")
    if all(isinstance(v, str) for v in items) and not any(
            isinstance(v, str) and (v in TARGET_SETS or "," in v) for v in items):
        items = [list(items)]  # a flat list of module names (not aliases) is one set
    out = []
    for i, v in enumerate(items):
        if isinstance(v, str):
            if v in TARGET_SETS:
                out.append(TARGET_SETS[v])
            elif "," in v:
                out.append(tuple(s.strip() for s in v.split(",") if s.strip()))
            else:
                raise ValueError(f"[{i}]: unknown target set {v!r}; allowed aliases: {', '.join(TARGET_SETS)} "
                                 "(or a list of module names)")
        elif isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v):
            out.append(tuple(v))
        else:
            raise ValueError(f"[{i}]: got {v!r}; expected an alias or a list of module names")
    return tuple(out)


def alpha_value(rule: str | float, r: int) -> float:
    """lora_alpha for rank ``r`` under a rule: ``'<c>r'`` gives c * r (``'r'``: r), a number is fixed."""
    if isinstance(rule, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]*)\s*r\s*", rule)
        if m:
            return (float(m.group(1)) if m.group(1) else 1.0) * r
    return float(rule)


@dataclass(frozen=True)
class LoraSettings:
    """The study's ``lora:`` block (PEFT's option names)."""

    r: tuple[int, ...] = field(default=(8,), metadata=doc("ranks to sweep"))
    target_modules: tuple[tuple[str, ...], ...] = field(
        default=(("q_proj", "v_proj"),),
        metadata={**doc("target-module sets to sweep; each an alias (" + ", ".join(TARGET_SETS)
                        + ") or a list of module names"), "parse": parse_target_sets})
    lora_alpha: str = field(
        default="2r", metadata=doc("lora_alpha rule: '<c>r' (alpha = c * r, e.g. 2r, r) or a fixed number (e.g. 16)"))
    use_rslora: tuple[bool, ...] = field(default=(False,), metadata=doc("rsLoRA scaling alpha/sqrt(r) (axis)"))
    lora_dropout: float = field(default=0.0, metadata=doc("lora_dropout"))
    lr: tuple[float, ...] = field(default=(1e-3,), metadata=doc("learning rate(s) (nuisance search per cell)"))


@dataclass(frozen=True)
class LoraAxes(Axes):
    """One LoRA run: rank, target set, alpha (resolved), rsLoRA, dropout."""

    r: int
    target_modules: tuple[str, ...]
    lora_alpha: float
    use_rslora: bool = False
    lora_dropout: float = 0.0

    @property
    def target_set(self) -> str:
        """Short label of the target modules (`target_set_label`)."""
        return target_set_label(self.target_modules)

    def to_dict(self) -> JsonObject:
        return {"r": self.r, "target_modules": list(self.target_modules), "target_set": self.target_set,
                "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora, "lora_dropout": self.lora_dropout}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> LoraAxes:
        return cls(r=as_int(cfg["r"]), target_modules=tuple(cast("Iterable[str]", cfg["target_modules"])),
                   lora_alpha=as_float(cfg["lora_alpha"]), use_rslora=bool(cfg.get("use_rslora", False)),
                   lora_dropout=as_float(cfg.get("lora_dropout", 0.0)))

    def label(self) -> str:
        return f"r={self.r} {self.target_set}"

    def variant(self) -> str:
        return f"LoRA {self.target_set}" + (" rsLoRA" if self.use_rslora else "")

    def size(self) -> int:
        return self.r


def load_adapter_weights(peft_model: nn.Module, folder: Path) -> None:
    """Load a saved PEFT adapter folder's weights (``adapter_model.safetensors``: adapters and
    ``modules_to_save``) into ``peft_model``, a model PEFT wrapped with the same config. Raises on a
    missing file or a weight the model does not have."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"no {f.name} in {folder}: not a finished run's adapter folder")
    res: Any = set_peft_model_state_dict(peft_model, load_file(str(f)))
    unexpected = list(getattr(res, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"{f}: weights the model does not have: {sorted(unexpected)[:5]}")


def _matches(model: nn.Module, targets: Sequence[str]) -> bool:
    """``targets`` (a `TARGET_SETS` value) name linear layers of ``model``."""
    from idlab.methods.lora_peft import matched_targets

    try:
        return bool(matched_targets(model, "all-linear" if list(targets) == ["all-linear"] else list(targets), set()))
    except ValueError:
        return False


class LoRA(Method[LoraSettings, LoraAxes]):
    """LoRA adapters on the target modules (PEFT)."""

    name = "lora"
    settings_type = LoraSettings
    axes_type = LoraAxes
    help = "LoRA axes (Hu et al. 2021) through PEFT"
    title = "LoRA"
    size_key = "r"
    runtime_imports = ("peft", "torch._dynamo")  # PEFT loads torch's compiler stack (and Triton)
    quantity = "r90"
    style = Style(marker="s", size=5.0)
    renamed: ClassVar[dict[str, str]] = {"alpha": "lora.lora_alpha (PEFT's name)", "dropout": "lora.lora_dropout (PEFT's name)"}

    def check(self, settings: LoraSettings, where: str) -> None:
        if any(r < 1 for r in settings.r):
            raise ConfigError(f"{where}: key 'lora.r': got {list(settings.r)}; every value must be >= 1")
        try:
            alpha_value(settings.lora_alpha, 1)
        except ValueError:
            raise ConfigError(f"{where}: key 'lora.lora_alpha': got {settings.lora_alpha!r}; allowed: '<c>r' "
                              "(e.g. 2r, r) or a number") from None

    def check_model(self, settings: LoraSettings, model: nn.Module, where: str) -> None:
        """Every target set names linear layers of the model (as `prepare` applies it), and every r fits them."""
        from idlab.methods.lora_peft import (
            classification_head,
            linear_module_names,
            matched_targets,
        )

        head = classification_head(model)
        for t in settings.target_modules:
            targets: Any = "all-linear" if list(t) == ["all-linear"] else list(t)
            exclude = {n for n in linear_module_names(model) if head and targets == "all-linear"
                       and (n == head or n.startswith(head + "."))}  # apply_lora leaves the head out
            try:
                dims = matched_targets(model, targets, exclude)
                if not dims:
                    raise ValueError(f"target_modules {list(t)} name no linear layer of {type(model).__name__}")
            except ValueError as e:
                fits = [k for k, v in TARGET_SETS.items() if _matches(model, v)]
                raise ConfigError(f"{where}: key 'lora.target_modules': got {list(t)} for model {type(model).__name__}: "
                                  f"{str(e).removeprefix('apply_lora: ')}; target sets this model has: "
                                  f"{', '.join(fits)}") from None
            name, (d_in, d_out) = min(dims.items(), key=lambda kv: min(kv[1]))
            over = [r for r in settings.r if r > min(d_in, d_out)]
            if over:
                raise ConfigError(f"{where}: key 'lora.r': got {list(settings.r)}; r = {over} exceed min(d_in, d_out) "
                                  f"= min({d_in}, {d_out}) of {name!r} (target set {target_set_label(t)}), the most a "
                                  f"rank-r update of that layer can have; use r <= {min(d_in, d_out)}, or leave that "
                                  "layer out of lora.target_modules")

    def cells(self, settings: LoraSettings, ctx: GridContext | None = None) -> list[LoraAxes]:
        return [LoraAxes(r=r, target_modules=tuple(t), lora_alpha=alpha_value(settings.lora_alpha, r),
                         use_rslora=rs, lora_dropout=settings.lora_dropout)
                for t in settings.target_modules for r in settings.r for rs in settings.use_rslora]

    def describe(self, settings: LoraSettings, cells: Sequence[LoraAxes]) -> str:
        return (f"r {list(settings.r)} x targets {[target_set_label(t) for t in settings.target_modules]}"
                f" x rslora {list(settings.use_rslora)} x lr {list(settings.lr)}, lora_alpha={settings.lora_alpha}")

    def prepare(self, model: nn.Module, axes: LoraAxes, seed: int) -> Prepared:
        from idlab.methods.lora_peft import apply_lora, lora_deltas, save_adapter

        head = head_module_name(model)
        targets: Any = "all-linear" if list(axes.target_modules) == ["all-linear"] else list(axes.target_modules)
        kwargs: dict[str, Any] = {"modules_to_save": [head]} if head else {}
        torch.manual_seed(seed)
        peft_model = apply_lora(model, axes.r, lora_alpha=axes.lora_alpha, target_modules=targets,
                                lora_dropout=axes.lora_dropout, use_rslora=axes.use_rslora, **kwargs)

        def save(folder: Path) -> None:
            save_adapter(peft_model, folder / "adapter")

        return Prepared(peft_model, {"head": "train" if head else "none", "head_module": head},
                        lambda: dict(lora_deltas(peft_model, with_base=False)), save,
                        load=lambda folder: load_adapter_weights(peft_model, folder / "adapter"),
                        merged=lambda: cast(nn.Module, cast(Any, peft_model).merge_and_unload()))

    def plan_model(self, model: nn.Module, axes: LoraAxes, seed: int) -> nn.Module:
        return self.prepare(model, axes, seed).model

    def plan_terms(self, model: nn.Module, axes: LoraAxes, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return PlanTerms(host_copies=4 * trainable)  # Delta W as factors, float32


__all__ = ["TARGET_SETS", "LoRA", "LoraAxes", "LoraSettings", "alpha_value", "load_adapter_weights", "parse_target_sets",
           "target_set_label"]
