"""Every PEFT method on the intrinsic-dimension axis: one study block names any of them by name.

Study block ``peft:``, a list of entries, each one PEFT method with its own learning rates::

    peft:
      - {method: vera, r: [64, 256], lr: [3e-3, 1e-2]}
      - {method: dora, r: [1, 4], target_modules: [qv], lr: [1e-3]}
      - {method: ia3, lr: [3e-3]}

``method`` is a PEFT type in lower case (``vera``, ``ia3``, ``oft``, ``fourierft``, ...: PEFT's own
registry, ``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``) or an alias of a LoRA variant (`ALIASES`:
``dora``, ``rslora``, ``pissa``, ``olora``; ``bias`` is PEFT's BEFT). The method's size knob
(`SIZE_KNOBS`: ``r``, ``n_frequency``, ``oft_block_size``, ...; none for IA3, LN tuning, bias) is an
axis, ``target_modules`` an axis of target sets (aliases of `idlab.methods.lora.TARGET_SETS`; absent:
PEFT's default for the model), ``lr`` the learning rates searched per cell (required: good rates
differ by orders of magnitude between methods); every other key is a field of the method's PEFT
config class, passed as is and checked against it before any run starts.

Each PEFT method is its own curve (`PeftAxes.variant`: "VeRA qv") on the generic ``size`` axis, its
crossing called p90. A classification head goes to PEFT's ``modules_to_save`` (trains, counted once).
Delta W is exact for every method PEFT can merge: W_0 of every linear weight is copied to the host in
float32 before PEFT touches the model (PiSSA / OLoRA rewrite it), and Delta W = the weight of a merged
copy of the trained model minus W_0 (`Prepared.extract`). Methods without one (`NO_DELTA`) say so in
``method_info["no_delta"]``. Adapters are saved in PEFT's format under ``adapter/``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from idlab.errors import ConfigError
from idlab.jsontypes import JsonObject
from idlab.methods.base import Axes, GridContext, Method, PlanTerms, Prepared, Style
from idlab.methods.lora import (
    TARGET_SETS,
    load_adapter_weights,
    parse_target_sets,
    target_set_label,
)
from idlab.models import head_module_name, linear_weights
from idlab.options import doc

#: study names that are a PEFT type with fixed config fields
ALIASES: dict[str, tuple[str, dict[str, object]]] = {
    "dora": ("LORA", {"use_dora": True}),
    "rslora": ("LORA", {"use_rslora": True}),
    "pissa": ("LORA", {"init_lora_weights": "pissa"}),
    "olora": ("LORA", {"init_lora_weights": "olora"}),
    "bias": ("BEFT", {}),
}
#: the size axis of each PEFT type: the config field swept (None: the method has no size knob);
#: a type not listed has ``r`` when its config has one
SIZE_KNOBS: dict[str, str | None] = {
    "LORA": "r", "ADALORA": "init_r", "VERA": "r", "LOHA": "r", "LOKR": "r", "OFT": "oft_block_size",
    "BOFT": "boft_block_size", "HRA": "r", "HIRA": "r", "IA3": None, "FOURIERFT": "n_frequency", "VBLORA": "r",
    "RANDLORA": "r", "C3A": "block_size", "SHIRA": "r", "UNILORA": "r", "TINYLORA": "r", "LN_TUNING": None,
    "BEFT": None, "LILY": "r",
}
#: report names
TITLES: dict[str, str] = {
    "lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "pissa": "PiSSA", "olora": "OLoRA", "adalora": "AdaLoRA",
    "vera": "VeRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "hra": "HRA", "hira": "HiRA",
    "ia3": "IA3", "fourierft": "FourierFT", "vblora": "VB-LoRA", "randlora": "RandLoRA", "c3a": "C3A",
    "shira": "SHiRA", "unilora": "Uni-LoRA", "tinylora": "TinyLoRA", "ln_tuning": "LN tuning", "bias": "bias tuning",
    "beft": "bias tuning", "lily": "Lily",
}
#: PEFT types whose trained update is not a change of linear weights, and why
NO_DELTA: dict[str, str] = {
    "LILY": "PEFT cannot merge Lily adapters (no merge), so the update is no weight difference",
    "BEFT": "bias tuning changes biases only, no weight matrix",
    "LN_TUNING": "LN tuning changes layer-norm weights only, no linear weight",
}
#: PEFT types that are not a weight-space method on one adapter (refused)
NOT_WEIGHT_SPACE = {"XLORA", "POLY", "ADAPTION_PROMPT", "TRAINABLE_TOKENS", "CARTRIDGE"}
#: config fields idlab sets itself (an entry may not)
MANAGED = {"peft_type", "task_type", "modules_to_save", "target_modules", "base_model_name_or_path", "revision",
           "inference_mode", "auto_mapping"}
PEFT_PREFIX = "base_model.model."


def _frozen(v: object) -> object:
    """A YAML value made hashable (lists -> tuples, mappings -> sorted pair tuples)."""
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _frozen(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _thawed(v: object) -> object:
    """A stored option value back as PEFT takes it (tuples -> lists)."""
    return [_thawed(x) for x in v] if isinstance(v, (list, tuple)) else v


def peft_registry() -> dict[str, type]:
    """PEFT's config class per PEFT type (``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(k.value if hasattr(k, "value") else k): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def peft_type(method: str) -> str:
    """The PEFT type of a study method name (``dora`` -> LORA, ``vera`` -> VERA)."""
    return ALIASES[method][0] if method in ALIASES else method.upper()


def method_names() -> list[str]:
    """Every method name an entry may give (aliases, then PEFT's types in lower case)."""
    return [*ALIASES, *sorted(k.lower() for k in peft_registry())]


def size_knob(method: str) -> str | None:
    """The config field of a method's size axis, or None."""
    t = peft_type(method)
    if t in SIZE_KNOBS:
        return SIZE_KNOBS[t]
    cls = peft_registry().get(t)
    return "r" if cls is not None and "r" in {f.name for f in dataclasses.fields(cast(Any, cls))} else None


def title(method: str) -> str:
    """The report name of a method (``VeRA``)."""
    return TITLES.get(method, method)


def _parse_entries(value: object) -> object:
    """The YAML entries -> PeftEntry mappings: the size knob's key (``r: [4]``) becomes ``size``, other
    keys that are no entry field become ``options`` (PEFT config fields, checked in `PeftMethod.check`)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    known = {f.name for f in dataclasses.fields(PeftEntry)}
    out: list[object] = []
    for i, e in enumerate(items):
        if isinstance(e, str):
            e = {"method": e}  # `peft: [ia3]`
        if not isinstance(e, Mapping):
            raise ValueError(f"[{i}]: got {e!r}; expected a mapping like {{method: vera, r: [64], lr: [1e-3]}}")
        e = dict(e)
        if isinstance(e.get("method"), str):
            e["method"] = e["method"].strip().lower().replace("-", "_")
        knob = size_knob(str(e.get("method", ""))) if str(e.get("method", "")) in method_names() else None
        entry: dict[str, object] = {}
        opts = dict(cast("Mapping[str, object]", e.pop("options"))) if isinstance(e.get("options"), Mapping) else {}
        for k, v in e.items():
            if knob is not None and k == knob:
                if "size" in e:
                    raise ValueError(f"[{i}]: both 'size' and {knob!r} given; give one")
                entry["size"] = v
            elif k in known:
                entry[k] = v
            else:
                opts[str(k)] = v
        if opts:
            entry["options"] = [[k, _frozen(v)] for k, v in sorted(opts.items())]
        out.append(entry)
    return out


@dataclass(frozen=True)
class PeftEntry:
    """One PEFT method of the ``peft:`` block (any other key: a field of its PEFT config)."""

    method: str = field(default="", metadata=doc("the PEFT method: " + ", ".join(ALIASES) + " or a PEFT type "
                                                  "in lower case (vera, ia3, oft, fourierft, ...)"))
    lr: tuple[float, ...] = field(default=(), metadata=doc("learning rate(s) of this method (required)"))
    size: tuple[int, ...] = field(default=(), metadata=doc("values of the method's size knob (or its own name: "
                                                           "r, n_frequency, oft_block_size, ...)"))
    target_modules: tuple[tuple[str, ...], ...] = field(
        default=(), metadata={**doc("target-module sets to sweep (aliases " + ", ".join(TARGET_SETS)
                                    + "); absent: PEFT's default for the model"), "parse": parse_target_sets})
    options: tuple[tuple[str, object], ...] = field(default=(), metadata=doc("other PEFT config fields"))


@dataclass(frozen=True)
class PeftSettings:
    """The study's ``peft:`` block: a list of `PeftEntry`."""

    entries: tuple[PeftEntry, ...] = field(default=(), metadata={
        **doc("the PEFT methods: a list of {method: ..., <size knob>: [...], lr: [...], ...}"),
        "parse": _parse_entries, "list_block": True})


@dataclass(frozen=True)
class PeftAxes(Axes):
    """One run of a PEFT method: method, size knob value, target set, fixed options (and the entry's
    learning rates, which are not part of the run id)."""

    peft_method: str = "lora"
    value: int | None = None
    target_modules: tuple[str, ...] = ()
    options: tuple[tuple[str, object], ...] = ()
    lrs: tuple[float, ...] = field(default=(), compare=False)

    @property
    def target_set(self) -> str:
        return target_set_label(self.target_modules) if self.target_modules else "default"

    def to_dict(self) -> JsonObject:
        return {"peft_method": self.peft_method, "size_knob": size_knob(self.peft_method), "peft_size": self.value,
                "target_modules": list(self.target_modules), "target_set": self.target_set,
                "peft_options": cast(JsonObject, {k: _thawed(v) for k, v in self.options})}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> PeftAxes:
        opts = cfg.get("peft_options") or {}
        size = cfg.get("peft_size")
        return cls(peft_method=str(cfg["peft_method"]), value=None if size is None else int(cast(int, size)),
                   target_modules=tuple(cast("Sequence[str]", cfg.get("target_modules") or ())),
                   options=tuple(sorted((str(k), _frozen(v)) for k, v in cast("Mapping[str, object]", opts).items())))

    def label(self) -> str:
        knob = size_knob(self.peft_method)
        return " ".join(x for x in (title(self.peft_method), f"{knob}={self.value}" if knob else "",
                                    self.target_set) if x)

    def variant(self) -> str:
        opts = " ".join(f"{k}={_thawed(v)}" for k, v in self.options)
        return " ".join(x for x in (title(self.peft_method), self.target_set if self.target_modules else "", opts) if x)

    def size(self) -> int | None:
        return self.value


def peft_config(axes: PeftAxes, model: nn.Module) -> Any:
    """PEFT's config of one run (the head of a classification model in ``modules_to_save``)."""
    t = peft_type(axes.peft_method)
    fields: dict[str, Any] = dict(ALIASES[axes.peft_method][1]) if axes.peft_method in ALIASES else {}
    fields.update({k: _thawed(v) for k, v in axes.options})
    knob = size_knob(axes.peft_method)
    if knob is not None and axes.value is not None:
        fields[knob] = axes.value
        if t == "OFT" and knob == "oft_block_size":
            fields.setdefault("r", 0)  # OFT takes one of r (blocks) and oft_block_size
        if t == "BOFT" and knob == "boft_block_size":
            fields.setdefault("boft_block_num", 0)
    if axes.target_modules:
        fields["target_modules"] = "all-linear" if list(axes.target_modules) == ["all-linear"] else list(axes.target_modules)
    head = head_module_name(model) if type(model).__name__.endswith("ForSequenceClassification") else None
    if head:
        fields.update(modules_to_save=[head], task_type="SEQ_CLS")
    elif type(model).__name__.endswith("ForCausalLM"):
        fields["task_type"] = "CAUSAL_LM"
    return peft_registry()[t](**fields)


def wrap(model: nn.Module, axes: PeftAxes, low_cpu_mem_usage: bool = False) -> Any:
    """``peft.get_peft_model`` of ``model`` (in place) at ``axes``."""
    from peft import get_peft_model

    config = peft_config(axes, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, config, low_cpu_mem_usage=low_cpu_mem_usage)


def tuned_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    """{base model name: PEFT layer} of every module PEFT adapted."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n.removeprefix(PEFT_PREFIX): cast(nn.Module, m) for n, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer)}


def merged_deltas(peft_model: nn.Module, w0: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Delta W = merged weight - W_0 (float32, host) per module of ``w0``.

    Merges a float32 copy on the host (PEFT's own merge: DoRA's magnitude, OFT's rotation, ...); the
    trained model is left as it was (moved to the host for the copy and back).
    """
    device = next(peft_model.parameters()).device
    peft_model.to("cpu")
    try:
        merged = cast(Any, copy.deepcopy(peft_model)).float().merge_and_unload()
    finally:
        peft_model.to(device)
    weights = linear_weights(merged)
    return {n: weights[n].detach().float() - w for n, w in w0.items()}


def _where_key(i: int, key: str = "") -> str:
    return f"peft[{i}]" + (f".{key}" if key else "")


class PeftMethod(Method[PeftSettings, PeftAxes]):
    """Any PEFT method by name, each its own curve on its size axis."""

    name = "peft"
    settings_type = PeftSettings
    axes_type = PeftAxes
    help = "any PEFT method by name (a list of {method, <size knob>, lr, target_modules, PEFT fields})"
    title = "PEFT"
    size_key = "size"
    runtime_imports = ("peft", "torch._dynamo")  # PEFT loads torch's compiler stack (and Triton)
    quantity = "p90"
    style = Style(marker="D", size=5.0)
    listed_by_default = False  # a study lists it with its entries

    def learning_rates(self, settings: PeftSettings) -> tuple[float, ...]:
        return tuple(sorted({lr for e in settings.entries for lr in e.lr}))

    def learning_rates_for(self, settings: PeftSettings, axes: PeftAxes) -> tuple[float, ...]:
        return axes.lrs or self.learning_rates(settings)

    def check(self, settings: PeftSettings, where: str) -> None:
        if not settings.entries:
            raise ConfigError(f"{where}: key 'peft': list at least one PEFT method, e.g. "
                              "peft: [{method: vera, r: [64], lr: [3e-3]}]")
        names, registry = method_names(), peft_registry()
        for i, e in enumerate(settings.entries):
            if e.method not in names:
                raise ConfigError(f"{where}: key '{_where_key(i, 'method')}': got {e.method!r}; allowed: "
                                  f"{', '.join(names)}")
            t = peft_type(e.method)
            cls = registry[t]
            from peft.config import PromptLearningConfig

            if t in NOT_WEIGHT_SPACE or issubclass(cls, PromptLearningConfig):
                raise ConfigError(f"{where}: key '{_where_key(i, 'method')}': {e.method!r} is a prompt or multi-adapter "
                                  "method, not a weight-space update on this axis; pick another method")
            if not e.lr:
                raise ConfigError(f"{where}: key '{_where_key(i, 'lr')}': required per method (good rates differ by "
                                  "orders of magnitude between methods), e.g. lr: [1e-3, 3e-3]")
            if any(not lr > 0 for lr in e.lr):
                raise ConfigError(f"{where}: key '{_where_key(i, 'lr')}': got {list(e.lr)}; learning rates must be > 0")
            fields = [f.name for f in dataclasses.fields(cast(Any, cls)) if f.name not in MANAGED]
            knob = size_knob(e.method)
            bad = [k for k, _ in e.options if k not in fields or k == knob]
            if bad:
                raise ConfigError(f"{where}: key '{_where_key(i, bad[0])}': unknown field of {title(e.method)} "
                                  f"({cls.__name__}); its fields: {', '.join(f for f in fields if f != knob)}"
                                  + (f"; the size axis is {knob}" if knob else "; it has no size axis"))
            if e.size and knob is None:
                raise ConfigError(f"{where}: key '{_where_key(i, 'size')}': {title(e.method)} has no size knob; "
                                  "leave it out (one cell per target set)")
            if any(s < 1 for s in e.size):
                raise ConfigError(f"{where}: key '{_where_key(i, knob or 'size')}': got {list(e.size)}; every value "
                                  "must be >= 1")

    def check_model(self, settings: PeftSettings, model: nn.Module, where: str) -> None:
        """Target sets the model has, and every cell built by PEFT on a copy of the meta model."""
        from idlab.methods.lora_peft import matched_targets

        for i, e in enumerate(settings.entries):
            for t in e.target_modules:
                try:
                    hit = matched_targets(model, "all-linear" if list(t) == ["all-linear"] else list(t), set())
                    linear = peft_type(e.method) not in ("LN_TUNING",)
                    if linear and not hit:
                        raise ValueError(f"target_modules {list(t)} name no linear layer of {type(model).__name__}")
                except ValueError as err:
                    fits = [k for k, v in TARGET_SETS.items() if _has(model, v)]
                    raise ConfigError(f"{where}: key '{_where_key(i, 'target_modules')}': got {list(t)} for model "
                                      f"{type(model).__name__}: {str(err).removeprefix('apply_lora: ')}; target sets "
                                      f"this model has: {', '.join(fits)}") from None
        for i, axes in ((i, a) for i, e in enumerate(settings.entries) for a in _entry_cells(e)):
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    pm = wrap(copy.deepcopy(model), axes, low_cpu_mem_usage=True)
                adjusted = [str(w.message) for w in seen if "adjust" in str(w.message).lower()]
                if adjusted:  # PEFT changed the size it was given: the run would sit elsewhere on the axis
                    raise ValueError(adjusted[0])
            except NotImplementedError:  # an operation the meta device lacks (SHiRA's nonzero): PEFT did not refuse
                continue
            except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as err:
                knob = size_knob(axes.peft_method)
                raise ConfigError(f"{where}: key '{_where_key(i)}': PEFT refuses {axes.label()} on "
                                  f"{type(model).__name__}: {type(err).__name__}: {err}"
                                  + (f"; pick other {knob} values" if knob else "")) from None
            if peft_type(axes.peft_method) == "BEFT":
                bare = [n for n, m in tuned_modules(pm).items()
                        if getattr(cast(Any, m).get_base_layer(), "bias", None) is None]
                if bare:
                    raise ConfigError(f"{where}: key '{_where_key(i, 'target_modules')}': bias tuning needs biases, "
                                      f"and {len(bare)} targeted module(s) of {type(model).__name__} have none (e.g. "
                                      f"{bare[0]!r}); target modules with a bias, or use another method")

    def cells(self, settings: PeftSettings, ctx: GridContext | None = None) -> list[PeftAxes]:
        return [a for e in settings.entries for a in _entry_cells(e)]

    def describe(self, settings: PeftSettings, cells: Sequence[PeftAxes]) -> str:
        parts = []
        for e in settings.entries:
            knob = size_knob(e.method)
            parts.append(title(e.method) + (f" {knob} {list(e.size)}" if e.size else "") + f" lr {list(e.lr)}")
        return "; ".join(parts)

    def prepare(self, model: nn.Module, axes: PeftAxes, seed: int) -> Prepared:
        from idlab.methods.lora_peft import save_adapter

        head = head_module_name(model) if type(model).__name__.endswith("ForSequenceClassification") else None
        # W_0 on the host, before PEFT touches the model (PiSSA / OLoRA rewrite it at init): the layers a
        # target list names (PEFT's rule: the name or a dotted suffix), every linear layer without one
        t_list = [] if list(axes.target_modules) == ["all-linear"] else list(axes.target_modules)
        w0 = {n: w.detach().to("cpu", torch.float32, copy=True) for n, w in linear_weights(model).items()
              if not (head and (n == head or n.startswith(head + ".")))
              and (not t_list or any(n == t or n.endswith("." + t) for t in t_list))}
        torch.manual_seed(seed)
        pm = wrap(model, axes)
        tuned = set(tuned_modules(pm))
        w0 = {n: w for n, w in w0.items() if n in tuned}
        t = peft_type(axes.peft_method)
        info: dict[str, Any] = {"head": "train" if head else "none", "head_module": head, "peft_type": t,
                                "peft_method": axes.peft_method, "size_knob": size_knob(axes.peft_method),
                                "adapted_modules": len(tuned)}
        why = NO_DELTA.get(t) or (None if w0 else "no linear weight is adapted")
        if why:
            info["no_delta"] = why
        else:
            info["delta"] = "exact: weight of a merged copy minus W_0 (float32)"
        if axes.peft_method in ("pissa", "olora"):
            info["adapter_note"] = ("PEFT rewrites W_0 at init: the saved adapter reloads onto that residual base, "
                                    "not the original model")

        def extract() -> dict[str, torch.Tensor]:
            return {} if why else merged_deltas(pm, w0)

        def save(folder: Path) -> None:
            save_adapter(pm, folder / "adapter")

        def merged() -> nn.Module:
            if why:  # PEFT cannot merge this method: the wrapped model itself
                return cast(nn.Module, pm)
            return cast(nn.Module, cast(Any, pm).merge_and_unload())

        return Prepared(pm, info, extract, save,
                        load=lambda folder: load_adapter_weights(cast(nn.Module, pm), folder / "adapter"),
                        merged=merged)

    def plan_model(self, model: nn.Module, axes: PeftAxes, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        try:
            return cast(nn.Module, wrap(model, axes, low_cpu_mem_usage=True))
        except NotImplementedError:  # the meta device lacks an op PEFT's init uses
            return cast(nn.Module, wrap(model, axes))

    def plan_terms(self, model: nn.Module, axes: PeftAxes, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        n = sum(cast(Any, m).get_base_layer().weight.numel() for m in tuned_modules(model).values()
                if hasattr(cast(Any, m).get_base_layer(), "weight"))
        return PlanTerms(host_copies=2 * 4 * n)  # W_0 and Delta W in float32


def _entry_cells(e: PeftEntry) -> list[PeftAxes]:
    """The cells of one entry: target sets x sizes."""
    sizes: Sequence[int | None] = e.size or (None,)
    return [PeftAxes(e.method, s, tuple(t), e.options, e.lr) for t in e.target_modules or ((),) for s in sizes]


def _has(model: nn.Module, targets: Sequence[str]) -> bool:
    from idlab.methods.lora_peft import matched_targets

    try:
        return bool(matched_targets(model, "all-linear" if list(targets) == ["all-linear"] else list(targets), set()))
    except ValueError:
        return False


__all__ = ["ALIASES", "NO_DELTA", "SIZE_KNOBS", "PeftAxes", "PeftEntry", "PeftMethod", "PeftSettings", "merged_deltas",
           "method_names", "peft_config", "peft_registry", "peft_type", "size_knob", "tuned_modules", "wrap"]
