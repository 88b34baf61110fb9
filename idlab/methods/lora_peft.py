"""LoRA through PEFT: apply, count, read out as `LowRankDelta`, save and load adapters.

LoRA (Hu et al. 2021) freezes W_0 and trains a rank-r update of chosen linear layers:

    W = W_0 + Delta W,   Delta W = s * B @ A,   B (d_out, r), A (r, d_in),
    s = lora_alpha / r   (rsLoRA, Kalajdzievski 2023: s = lora_alpha / sqrt(r)).

B starts at zero, so Delta W = 0 at step 0. The layers are PEFT's (``peft.LoraConfig``
+ ``peft.get_peft_model``); this module only validates arguments with clear errors, reads the
factors back in idlab's `LowRankDelta` form, and writes/reads adapters in PEFT's on-disk format
(``adapter_config.json`` + ``adapter_model.safetensors``) atomically. Module names are the base model's qualified names
(``model.layers.3.self_attn.q_proj``, ``net.0``) without PEFT's ``base_model.model.``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from idlab.atomic import atomic_dir
from idlab.deltas.lowrank import LowRankDelta

PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------
# Module discovery
# --------------------------------------------------------------------------------------


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear layer (nn.Linear or transformers' Conv1D), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):  # GPT-2 style (in, out)
        w: Any = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Qualified names of every linear layer of ``model`` (nn.Linear / Conv1D), in order."""
    return [n for n, m in model.named_modules() if n and _linear_dims(m) is not None]


def _short_names(names: Iterable[str]) -> list[str]:
    """Distinct shortest suffixes of qualified names not starting with a number (``q_proj``, ``net.0``)."""
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        k = next((i for i in range(len(parts) - 1, -1, -1) if not parts[i].isdigit()), 0)
        seen.setdefault(".".join(parts[k:]), None)
    return list(seen)


def _describe_linears(model: nn.Module) -> str:
    names = linear_module_names(model)
    if not names:
        return "the model has no linear layers"
    short = _short_names(names)
    few = names[:6] + (["..."] if len(names) > 6 else [])
    return f"its linear layers are named {short} (e.g. {few})"


def _name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the qualified name equals it or ends with ``.target``."""
    return name == target or name.endswith("." + target)


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (``lm_head``), which PEFT's ``all-linear`` leaves out."""
    out: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except Exception:  # some models raise NotImplementedError
            emb = None
        if emb is not None:
            out |= {n for n, m in model.named_modules() if m is emb}
    return out


def matched_targets(
    model: nn.Module, target_modules: str | Sequence[str], exclude: set[str]
) -> dict[str, tuple[int, int]]:
    """{qualified name: (d_in, d_out)} of the linear layers ``target_modules`` selects.

    Raises ValueError naming any list entry (or regex) that matches no module.
    """
    linears = {
        n: d for n, m in model.named_modules() if n and (d := _linear_dims(m)) is not None
    }
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            out_layers = _output_layer_names(model)
            hit = {n: d for n, d in linears.items() if n not in out_layers and n not in exclude}
            if not hit:
                raise ValueError(f"apply_lora: target_modules='all-linear' matched nothing; "
                                 f"{_describe_linears(model)}")
            return hit
        hit = {n: d for n, d in linears.items() if re.fullmatch(target_modules, n)}
        if not any(re.fullmatch(target_modules, n) for n, _ in model.named_modules() if n):
            raise ValueError(
                f"apply_lora: target_modules={target_modules!r} (a regex, as in PEFT, matched "
                f"against full module names) matches no module; {_describe_linears(model)}"
            )
        return hit
    targets = list(target_modules)
    if not targets:
        raise ValueError("apply_lora: target_modules is empty; pass e.g. ('q_proj', 'v_proj') or 'all-linear'")
    all_names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(_name_matches(n, t) for n in all_names)]
    if missing:
        raise ValueError(
            f"apply_lora: target_modules {missing} match no module of {type(model).__name__}; "
            f"{_describe_linears(model)}. Pass short names (e.g. 'q_proj'), full names, or 'all-linear'"
        )
    return {n: d for n, d in linears.items() if any(_name_matches(n, t) for t in targets)}


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def classification_head(model: nn.Module) -> str | None:
    """The head of a ``*ForSequenceClassification`` model (`idlab.models.head_module_name`), else None."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    from idlab.models import head_module_name

    return head_module_name(model)


# --------------------------------------------------------------------------------------
# apply_lora
# --------------------------------------------------------------------------------------


def apply_lora(
    model: nn.Module,
    r: int,
    lora_alpha: float | None = None,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    modules_to_save: Sequence[str] | Literal["auto"] | None = "auto",
    **peft_kwargs: Any,
) -> Any:
    """Wrap ``model`` with PEFT LoRA adapters; only adapters (and ``modules_to_save``) train.

    Each targeted linear layer y = W_0 x becomes y = W_0 x + s * B (A x), with
    A (r, d_in) random, B (d_out, r) zero, s = lora_alpha / r (``use_rslora``:
    lora_alpha / sqrt(r)). The base weights are frozen (requires_grad=False).
    PEFT wraps ``model`` in place.

    Args:
        model: a Hugging Face model or any nn.Module with nn.Linear layers (MNIST FC:
            ``target_modules=["net.0", "net.2"]``).
        r: adapter rank, 1 <= r <= min(d_in, d_out) of every targeted layer.
        lora_alpha: scaling numerator; default ``r`` (so s = 1 without rsLoRA).
        target_modules: PEFT names -- a list of short or qualified module names
            (``("q_proj", "v_proj")``, ``["lm_head"]``), ``"all-linear"`` (every linear
            layer except the output layer), or a regex string matched in full.
        lora_dropout: dropout on the adapter's input.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        init_lora_weights: PEFT's option (True: Kaiming A, zero B; False: random B too,
            so Delta W != 0 -- for tests; or "gaussian", "pissa", ...).
        modules_to_save: modules trained in full beside the adapters (PEFT keeps a
            trainable copy). ``"auto"`` (default): the classification head of a
            ``*ForSequenceClassification`` model (``score`` for Llama, ``classifier``
            for BERT/RoBERTa), nothing otherwise. ``None`` or ``()``: nothing.
        **peft_kwargs: further ``peft.LoraConfig`` fields (``rank_pattern``,
            ``alpha_pattern``, ``bias``, ``layers_to_transform``, ``task_type``, ...).

    Returns:
        The ``peft.PeftModel`` (``PeftModelForCausalLM`` / ``...ForSequenceClassification``
        when the model's class says which).

    Raises:
        ValueError: r <= 0; r > min(d_in, d_out) of a targeted layer (named);
            lora_alpha <= 0; a target that matches no module (the model's linear
            layer names are listed); an unknown ``modules_to_save`` entry.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"apply_lora: r must be a positive integer, got r={r!r}")
    alpha = float(r) if lora_alpha is None else lora_alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"apply_lora: lora_alpha must be a positive number, got lora_alpha={lora_alpha!r}; "
                         "leave it None for lora_alpha = r")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"apply_lora: lora_dropout must be in [0, 1), got {lora_dropout}")
    if hasattr(model, "peft_config"):
        raise ValueError("apply_lora: model already carries PEFT adapters; pass the base model "
                         "(or use peft's add_adapter for a second adapter)")
    if isinstance(target_modules, (list, tuple)):
        target_modules = list(target_modules)

    # modules_to_save
    head = classification_head(model)
    if isinstance(modules_to_save, str):
        if modules_to_save != "auto":
            raise ValueError(f"apply_lora: modules_to_save={modules_to_save!r}; pass 'auto', None "
                             "or a list of module names, e.g. ['score']")
        save: list[str] = [head] if head else []
    else:
        save = list(modules_to_save or [])
    names = [n for n, _ in model.named_modules() if n]
    bad = [m for m in save if not any(_name_matches(n, m) for n in names)]
    if bad:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"apply_lora: modules_to_save {bad} match no module of {type(model).__name__}; "
                         f"its top-level modules are {top}")

    user_exclude = peft_kwargs.get("exclude_modules")
    exclude = set() if isinstance(user_exclude, str) else set(user_exclude or [])
    if target_modules == "all-linear" and head is not None and not isinstance(user_exclude, str):
        # never put LoRA on the classification head (PEFT only skips it for task_type SEQ_CLS)
        head_linears = [n for n in linear_module_names(model) if n == head or n.startswith(head + ".")]
        exclude |= set(head_linears)
        if head_linears:
            peft_kwargs["exclude_modules"] = sorted(exclude)
    matched = matched_targets(model, target_modules, exclude)
    rank_pattern: Mapping[str, int] = peft_kwargs.get("rank_pattern") or {}
    for name, (d_in, d_out) in matched.items():
        r_here = r
        for pat, rp in rank_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", name):
                r_here = rp
                break
        if r_here > min(d_in, d_out):
            raise ValueError(
                f"apply_lora: r={r_here} exceeds min(d_in, d_out) = min({d_in}, {d_out}) of {name!r}; "
                f"use r <= {min(d_in, d_out)} or leave that module out of target_modules"
            )

    task_type = peft_kwargs.pop("task_type", _task_type(model))
    if task_type == "SEQ_CLS" and head is not None and head not in save:
        task_type = None  # PEFT's SEQ_CLS would train the head regardless of modules_to_save
    fields: dict[str, Any] = dict(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
        modules_to_save=save or None,
        task_type=task_type,
        **peft_kwargs,
    )
    config = LoraConfig(**fields)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing alias
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        return get_peft_model(model, config)


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter entries of ``model``, each shared tensor once.

    Works on models built on the ``meta`` device (counts ``numel`` only). A PEFT model's
    total includes the adapters (and both the frozen original and the trained copy of
    every ``modules_to_save`` module), as PEFT's ``print_trainable_parameters`` does.
    """
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def parameter_summary(model: nn.Module) -> str:
    """``"trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"``."""
    total, trainable = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


# --------------------------------------------------------------------------------------
# Reading adapters out
# --------------------------------------------------------------------------------------


def _strip_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _active_adapter(model: nn.Module, adapter_name: str | None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, (list, tuple)):
        active = active[0]
    return str(active)


def lora_deltas(model: nn.Module, adapter_name: str | None = None,
                with_base: bool = True) -> dict[str, LowRankDelta]:
    """One `LowRankDelta` per LoRA-adapted linear layer of a PEFT model.

    Delta W = scale * B @ A with B = ``lora_B.weight`` (d_out, r), A = ``lora_A.weight``
    (r, d_in) (detached copies), ``scale`` = PEFT's ``scaling[adapter]`` (alpha/r,
    alpha/sqrt(r) with rsLoRA, or the module's rank_pattern / alpha_pattern values) and
    ``base_weight`` = W_0 (the frozen base weight, a detached view on its device, laid out
    (d_out, d_in); never copied), or None with ``with_base=False`` -- what a caller that moves the
    deltas to the host passes, so that no W_0 (26 GB in float32 for Llama-2-7B all-linear) follows.

    Keys (and ``.name``) are the base model's qualified module names without PEFT's
    ``base_model.model.`` prefix, e.g. ``model.layers.0.self_attn.q_proj``.

    Raises:
        ValueError: the model has no LoRA layer for that adapter, a layer is merged
            (W_0 is then no longer available), or uses DoRA (not a pure B @ A update).
    """
    from peft.tuners.lora import LoraLayer

    adapter = _active_adapter(model, adapter_name)
    out: dict[str, LowRankDelta] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        module: Any = mod
        if adapter not in module.lora_A:
            continue
        key = _strip_prefix(name)
        if getattr(module, "merged", False):
            raise ValueError(f"lora_deltas: {key!r} has its adapter merged into the weight; "
                             "call model.unmerge_adapter() first")
        if module.use_dora.get(adapter, False):
            raise ValueError(f"lora_deltas: {key!r} uses DoRA, whose update is not scale * B @ A")
        base = module.get_base_layer().weight.detach() if with_base else None
        if base is not None and getattr(module, "fan_in_fan_out", False):
            base = base.T  # Conv1D stores (d_in, d_out)
        out[key] = LowRankDelta(
            B=module.lora_B[adapter].weight.detach().clone(),
            A=module.lora_A[adapter].weight.detach().clone(),
            scale=float(module.scaling[adapter]),
            base_weight=base,
            name=key,
        )
    if not out:
        raise ValueError(f"lora_deltas: {type(model).__name__} has no LoRA layer for adapter {adapter!r}; "
                         "pass a model returned by apply_lora / load_adapter")
    return out


# --------------------------------------------------------------------------------------
# Saving and loading (PEFT format, atomic)
# --------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Save a PEFT model's adapter to folder ``path`` in PEFT format, atomically.

    Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (adapters and
    ``modules_to_save`` weights) into a temporary folder beside ``path``, then renames
    it (an existing folder at ``path`` is replaced). Loadable by `load_adapter` and by
    ``peft.PeftModel.from_pretrained(base_model, path)``.
    """
    if not hasattr(model, "peft_config") or not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_adapter: {type(model).__name__} is not a PEFT model; pass what apply_lora returned")
    adapter = _active_adapter(model, adapter_name)
    peft_model: Any = model

    def write(tmp: Path) -> None:
        stage = tmp / "_stage"
        peft_model.save_pretrained(str(stage), selected_adapters=[adapter], safe_serialization=True)
        src = stage if adapter == "default" else stage / adapter
        for f in src.iterdir():
            if f.is_file():
                os.replace(f, tmp / f.name)
        shutil.rmtree(stage)

    return atomic_dir(path, write)


def load_adapter(base_model: nn.Module, path: str | os.PathLike[str], is_trainable: bool = False) -> Any:
    """Load a PEFT adapter folder onto ``base_model``: ``peft.PeftModel.from_pretrained``.

    ``is_trainable=True`` keeps the adapter trainable (to continue training).
    """
    from peft import PeftModel

    p = Path(path)
    if not (p / "adapter_config.json").exists():
        raise FileNotFoundError(f"load_adapter: no adapter_config.json in {str(p)!r}; "
                                "pass a folder written by save_adapter / write_adapter / PEFT")
    return PeftModel.from_pretrained(base_model, str(p), is_trainable=is_trainable)


def write_adapter(
    deltas: Mapping[str, LowRankDelta],
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder from factors alone, atomically.

    For each module ``name`` with Delta W = scale * B @ A (B (d_out, r), A (r, d_in)):
    ``target_modules`` = the module names; ``r`` = the most common rank, other ranks in
    ``rank_pattern``; ``lora_alpha`` = scale * r of the first module with that rank, so
    PEFT's alpha / r reproduces ``scale``, with per-module ``alpha_pattern`` entries
    where scales differ. Pattern keys are the names regex-escaped (PEFT reads them as
    regexes). Loaded onto the base model, the adapter adds exactly scale * B @ A to
    each module's weight.

    Args:
        deltas: {qualified module name (no ``base_model.model.`` prefix): LowRankDelta}.
        path: the adapter folder to create (replaced if it exists).
        base_model_name_or_path: recorded in ``adapter_config.json``.
        task_type: PEFT task type to record (``"CAUSAL_LM"``, ``"SEQ_CLS"``) or None.

    Raises:
        ValueError: no deltas, a name with PEFT's prefix, or a scale that is not a
            finite nonzero number.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not deltas:
        raise ValueError("write_adapter: no deltas to write")
    for name, d in deltas.items():
        if name.startswith(PEFT_PREFIX):
            raise ValueError(f"write_adapter: module name {name!r} carries PEFT's prefix; "
                             f"pass {_strip_prefix(name)!r}")
        if not (math.isfinite(d.scale) and d.scale != 0):
            raise ValueError(f"write_adapter: {name!r} has scale={d.scale}; it must be finite and nonzero "
                             "(fold the scale into B and use scale=1.0)")
    names = sorted(deltas)
    ranks = {n: deltas[n].r for n in names}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    first = next(n for n in names if ranks[n] == r0)
    alpha0 = deltas[first].scale * r0
    rank_pattern = {re.escape(n): ranks[n] for n in names if ranks[n] != r0}
    alpha_pattern: dict[str, float] = {}
    for n in names:
        alpha_n = deltas[n].scale * ranks[n]
        if not math.isclose(alpha_n, alpha0, rel_tol=1e-12, abs_tol=0.0):
            alpha_pattern[re.escape(n)] = alpha_n
    fields: dict[str, Any] = dict(
        r=r0,
        lora_alpha=alpha0,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    config = LoraConfig(**fields)
    tensors: dict[str, torch.Tensor] = {}
    for n in names:
        d = deltas[n]
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = d.A.detach().cpu().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = d.B.detach().cpu().contiguous().clone()

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return atomic_dir(path, write)


__all__ = [
    "apply_lora",
    "classification_head",
    "count_parameters",
    "linear_module_names",
    "load_adapter",
    "lora_deltas",
    "matched_targets",
    "parameter_summary",
    "save_adapter",
    "write_adapter",
]
