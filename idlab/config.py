"""Study configuration: frozen dataclasses <- YAML file <- command-line ``key=value``.

A study file (``experiments/configs/*.yaml``) declares one model, one task, the
methods to compare and their scientific axes (LoRA rank and target sets,
subspace dimension, projection, SAID), the nuisance settings (learning rate per
method, optionally a short list searched per cell), the fixed training settings
and the seeds. `load_study` reads it, applies overrides such as
``lora.r=[4,8]`` or ``train.steps=50`` (values parsed as YAML), and checks every
key and value before anything runs: an error names the file, the key and the
allowed keys or values.

Every field carries a help string (``field(metadata={"help": ...})``);
`describe_fields` prints them (``idlab sweep --help-config``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


def _help(text: str) -> dict[str, str]:
    return {"help": text}


class ConfigError(ValueError):
    """An invalid study file or override; the message names file, key and allowed values."""


#: Named target-module sets (a YAML item may also be a list of module names,
#: or a comma-separated string of them).
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "v": ("v_proj",),
    "qv": ("q_proj", "v_proj"),
    "qk": ("q_proj", "k_proj"),
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("all-linear",),
    # BERT-style names (minilm-l6)
    "bert-qv": ("query", "value"),
    "bert-qkvo": ("query", "key", "value", "attention.output.dense"),
}

METHODS = ("full", "lora", "subspace")
PROJECTIONS = ("dense", "sparse", "fastfood")
BUILTIN_TASKS = ("digits", "mnist", "toy")
TASK_FAMILIES = ("glue/", "text/")


def target_set_label(modules: Sequence[str]) -> str:
    """Short name of a target-module set: its alias in `TARGET_SETS`, else names joined by '+'."""
    for k, v in TARGET_SETS.items():
        if tuple(modules) == v:
            return k
    return "+".join(modules)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to fine-tune (or train from scratch)."""

    name: str = field(
        default="mlp",
        metadata=_help(
            "model: mlp | mnist-fc | lenet (from scratch), an offline alias (smollm2-135m, minilm-l6), "
            "a Hugging Face name or folder, or 'package.module:function' returning an nn.Module"
        ),
    )
    hidden: tuple[int, ...] = field(
        default=(64,), metadata=_help("hidden sizes for model=mlp / mnist-fc (input and output come from the task)")
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata=_help("parameter dtype for pretrained models")
    )


@dataclass(frozen=True)
class TaskConfig:
    """The data, loss and metric."""

    name: str = field(
        default="digits",
        metadata=_help(
            "task: digits | mnist | toy | glue/<mrpc|sst2|rte|cola|...> | text/<corpus> | "
            "'package.module:function' returning an idlab Task"
        ),
    )
    max_length: int = field(default=128, metadata=_help("tokens per example (text tasks)"))
    max_train: int | None = field(default=None, metadata=_help("keep at most this many training examples"))
    max_val: int | None = field(default=None, metadata=_help("keep at most this many validation examples"))
    data_dir: str | None = field(
        default=None, metadata=_help("folder in the GLUE tsv layout (glue/* tasks); None: $IDLAB_GLUE_DIR if set, else Hugging Face datasets")
    )


@dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: every parameter trainable (the baseline of d90 and r90)."""

    lr: tuple[float, ...] = field(
        default=(2e-5,), metadata=_help("learning rate(s); several = a per-cell search, best kept in the report")
    )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA axes (Hu et al. 2021) through PEFT."""

    r: tuple[int, ...] = field(default=(8,), metadata=_help("ranks to sweep"))
    target_modules: tuple[tuple[str, ...], ...] = field(
        default=(("q_proj", "v_proj"),),
        metadata=_help(
            "target-module sets to sweep; each an alias (" + ", ".join(TARGET_SETS) + ") or a list of module names"
        ),
    )
    alpha: str = field(
        default="2r",
        metadata=_help("lora_alpha rule: '<c>r' (alpha = c * r, e.g. 2r, r) or a fixed number (e.g. 16)"),
    )
    use_rslora: tuple[bool, ...] = field(default=(False,), metadata=_help("rsLoRA scaling alpha/sqrt(r) (axis)"))
    dropout: float = field(default=0.0, metadata=_help("lora_dropout"))
    lr: tuple[float, ...] = field(default=(1e-3,), metadata=_help("learning rate(s) (nuisance search per cell)"))

    def alpha_for(self, r: int) -> float:
        """lora_alpha for rank ``r`` under the configured rule."""
        return _alpha_value(self.alpha, r)


def _alpha_value(rule: str, r: int) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]*)\s*r\s*", rule)
    if m:
        coef = float(m.group(1)) if m.group(1) else 1.0
        return coef * r
    return float(rule)


@dataclass(frozen=True)
class SubspaceConfig:
    """Random-subspace training (Li et al. 2018 DID; Aghajanyan et al. 2021 SAID)."""

    d: tuple[int, ...] | Literal["auto"] = field(
        default=(100, 1000),
        metadata=_help("subspace dimensions, or 'auto': a log grid from auto_min to auto_max refined near d90"),
    )
    projection: tuple[Literal["dense", "sparse", "fastfood"], ...] = field(
        default=("fastfood",), metadata=_help("projection kinds to sweep: dense, sparse, fastfood")
    )
    said: tuple[bool, ...] = field(default=(False,), metadata=_help("False = DID, True = SAID (axis)"))
    head: Literal["train", "project"] = field(
        default="train",
        metadata=_help("classification head: 'train' (directly, counted as trainable) or 'project' (inside P)"),
    )
    lr: tuple[float, ...] = field(default=(1e-2,), metadata=_help("learning rate(s) (nuisance search per cell)"))
    fastfood_state: Literal["all", "index", "none"] = field(
        default="all",
        metadata=_help(
            "what a Fastfood projection keeps between calls (same P, same results): 'all' (4 bytes per padded "
            "coordinate, fastest), 'index' (2 bytes, < 4 per parameter; G redrawn each call), 'none' (slowest)"
        ),
    )
    auto_min: int = field(default=10, metadata=_help("d: auto -- smallest d of the initial log grid"))
    auto_max: int = field(default=100_000, metadata=_help("d: auto -- largest d of the initial log grid"))
    auto_per_decade: int = field(default=2, metadata=_help("d: auto -- grid points per decade (1, 2 or 3)"))
    refine: int = field(default=2, metadata=_help("d: auto -- bisection steps (geometric) inside the crossing bracket"))
    threshold: float = field(default=0.9, metadata=_help("d90 threshold as a fraction of the baseline"))
    baseline: float | None = field(
        default=None,
        metadata=_help("fixed 'global' baseline (e.g. 1.0 on MNIST); None: mean of the full fine-tuning runs ('local')"),
    )

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
class TrainSettings:
    """Fixed optimisation settings shared by every run of the study (see `idlab.training.TrainConfig`)."""

    steps: int | None = field(default=None, metadata=_help("optimizer steps (overrides epochs)"))
    epochs: float = field(default=1.0, metadata=_help("passes over the training set when steps is null"))
    batch_size: int = field(default=32, metadata=_help("examples per step"))
    eval_every: int | None = field(default=None, metadata=_help("evaluate every N steps (null: at the end only)"))
    eval_batch_size: int = field(default=256, metadata=_help("examples per evaluation batch"))
    optimizer: Literal["adam", "adamw", "sgd"] = field(default="adamw", metadata=_help("adam, adamw or sgd"))
    weight_decay: float = field(default=0.0, metadata=_help("weight decay"))
    schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata=_help("lr decay"))
    warmup_steps: int = field(default=0, metadata=_help("linear warmup steps"))
    grad_clip: float | None = field(default=None, metadata=_help("clip the gradient norm (null: off)"))
    until: Literal["steps", "converged"] = field(
        default="steps", metadata=_help("converged: stop by idlab.convergence's rule, steps/epochs being the cap")
    )
    patience: int | None = field(default=3, metadata=_help("evaluations without a tol gain that stop a run"))
    tol: float = field(default=0.002, metadata=_help("smallest gain of the validation metric that counts"))
    plateau_window: float = field(default=0.2, metadata=_help("plateau test: the last fraction of the steps"))


@dataclass(frozen=True)
class SlurmConfig:
    """Slurm submission through submitit (``executor=slurm``): one array task per run."""

    partition: str | None = field(default=None, metadata=_help("Slurm partition"))
    time_min: int = field(default=60, metadata=_help("time limit per run, minutes"))
    gpus_per_node: int = field(default=1, metadata=_help("GPUs per array task"))
    cpus_per_task: int = field(default=4, metadata=_help("CPUs per array task"))
    mem_gb: int = field(default=32, metadata=_help("memory per array task, GB"))
    array_parallelism: int = field(default=16, metadata=_help("array tasks running at once"))
    account: str | None = field(default=None, metadata=_help("Slurm account"))
    qos: str | None = field(default=None, metadata=_help("Slurm QOS"))
    constraint: str | None = field(default=None, metadata=_help("Slurm constraint, e.g. a100"))
    folder: str | None = field(default=None, metadata=_help("submitit log folder (default <study dir>/slurm)"))
    backend: Literal["slurm", "local", "debug"] = field(
        default="slurm", metadata=_help("slurm; local/debug = submitit's LocalExecutor/DebugExecutor (offline tests)")
    )


@dataclass(frozen=True)
class StudyConfig:
    """One study: model x task x methods x axes x seeds."""

    name: str = field(default="study", metadata=_help("study name: results go to <results_dir>/<name>/"))
    description: str = field(default="", metadata=_help("one line shown in the report"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_help("the network (name or mapping)"))
    task: TaskConfig = field(default_factory=TaskConfig, metadata=_help("the task (name or mapping)"))
    methods: tuple[Literal["full", "lora", "subspace"], ...] = field(
        default=("full", "lora", "subspace"), metadata=_help("methods to run: full, lora, subspace")
    )
    full: FullConfig = field(default_factory=FullConfig, metadata=_help("full fine-tuning settings"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_help("LoRA axes"))
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig, metadata=_help("random-subspace axes"))
    train: TrainSettings = field(default_factory=TrainSettings, metadata=_help("fixed training settings"))
    seeds: tuple[int, ...] = field(default=(0,), metadata=_help("seeds (each cell runs once per seed)"))
    score: Literal["final", "best"] = field(
        default="final", metadata=_help("performance of a run: final evaluation or best over evaluations")
    )
    results_dir: str = field(default="results", metadata=_help("results root folder"))
    executor: Literal["local", "multigpu", "slurm"] = field(
        default="local", metadata=_help("local (in-process), multigpu (one worker per GPU), slurm (submitit)")
    )
    gpus: tuple[int, ...] | None = field(default=None, metadata=_help("multigpu: GPU indices (null: all visible)"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:1 (local executor)"))
    retry_failed: bool = field(default=True, metadata=_help("rerun runs whose status is 'failed' (diverged is kept)"))
    progress: bool = field(default=False, metadata=_help("per-step tqdm bar inside each run"))
    slurm: SlurmConfig = field(default_factory=SlurmConfig, metadata=_help("Slurm settings (executor=slurm)"))

    def study_dir(self) -> Path:
        """``<results_dir>/<name>``."""
        return Path(self.results_dir) / self.name


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(where: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': {msg}")


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming key and allowed values."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, key, f"must not be null; expected {_type_name(tp)}")
        errors = []
        # try Literal alternatives first so that 'auto' beats a tuple of ints
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return _coerce(a, value, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise _fail(where, key, f"got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise _fail(where, key, f"got {value!r}; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if key.endswith("target_modules") and typing.get_origin(inner) is tuple:
            return _target_sets(value, key, where)
        if value is None:
            raise _fail(where, key, f"must not be null; expected {_type_name(tp)}")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise _fail(where, key, "must not be an empty list")
        return tuple(_coerce(inner, v, f"{key}[{i}]", where) for i, v in enumerate(items))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, key, f"got {value!r}; allowed values: true, false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, key, f"got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except (TypeError, ValueError):
                raise _fail(where, key, f"got {value!r}; expected a number") from None
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise _fail(where, key, f"got {value!r}; expected a string")
        return str(value)
    raise _fail(where, key, f"unsupported field type {tp}")  # pragma: no cover


def _target_sets(value: Any, key: str, where: str) -> tuple[tuple[str, ...], ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise _fail(where, key, "must not be an empty list")
    # a flat list of module names (not aliases) is one set
    if all(isinstance(v, str) for v in items) and not any(v in TARGET_SETS or "," in v for v in items):
        items = [list(items)]
    out = []
    for i, v in enumerate(items):
        if isinstance(v, str):
            if v in TARGET_SETS:
                out.append(TARGET_SETS[v])
            elif "," in v:
                out.append(tuple(s.strip() for s in v.split(",") if s.strip()))
            else:
                raise _fail(
                    where, f"{key}[{i}]",
                    f"unknown target set {v!r}; allowed aliases: {', '.join(TARGET_SETS)} "
                    "(or a list of module names)",
                )
        elif isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v):
            out.append(tuple(v))
        else:
            raise _fail(where, f"{key}[{i}]", f"got {v!r}; expected an alias or a list of module names")
    return tuple(out)


def _build(cls: Any, raw: Any, path: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if isinstance(raw, (str, int)) and not isinstance(raw, bool) and "name" in fields:
        raw = {"name": raw}  # `model: smollm2-135m` == `model: {name: smollm2-135m}`
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(where, path or "<top>", f"expected a mapping with keys {', '.join(fields)}, got {raw!r}")
    kwargs = {}
    for k, v in raw.items():
        full = f"{path}.{k}" if path else str(k)
        if k not in fields:
            raise _fail(where, full, f"unknown key; allowed keys{' under ' + repr(path) if path else ''}: "
                        + ", ".join(fields))
        kwargs[k] = _coerce(hints[k], v, full, where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise _fail(where, path or "<top>", str(e)) from None
    return obj


def _validate(cfg: StudyConfig, where: str) -> None:
    t = cfg.task.name
    if not (t in BUILTIN_TASKS or t.startswith(TASK_FAMILIES) or ":" in t):
        raise _fail(where, "task.name", f"got {t!r}; allowed values: {', '.join(BUILTIN_TASKS)}, "
                    "glue/<name>, text/<corpus>, or package.module:function")
    if not cfg.methods:
        raise _fail(where, "methods", f"must list at least one of {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise _fail(where, "methods", f"duplicates in {list(cfg.methods)}")
    for k, vals in (("lora.r", cfg.lora.r), ("seeds", cfg.seeds)):
        lo = 1 if k == "lora.r" else 0
        if any(v < lo for v in vals):
            raise _fail(where, k, f"got {list(vals)}; every value must be >= {lo}")
    if cfg.subspace.d != "auto" and any(d < 1 for d in cfg.subspace.d):
        raise _fail(where, "subspace.d", f"got {list(cfg.subspace.d)}; every d must be >= 1 (or d: auto)")
    if cfg.subspace.auto_per_decade not in (1, 2, 3):
        raise _fail(where, "subspace.auto_per_decade", "allowed values: 1, 2, 3")
    if not 0 < cfg.subspace.threshold <= 1:
        raise _fail(where, "subspace.threshold", f"got {cfg.subspace.threshold}; must be in (0, 1]")
    try:
        cfg.lora.alpha_for(1)
    except ValueError:
        raise _fail(where, "lora.alpha", f"got {cfg.lora.alpha!r}; allowed: '<c>r' (e.g. 2r, r) or a number") from None
    for name, lrs in (("full.lr", cfg.full.lr), ("lora.lr", cfg.lora.lr), ("subspace.lr", cfg.subspace.lr)):
        if any(not lr > 0 for lr in lrs):
            raise _fail(where, name, f"got {list(lrs)}; learning rates must be > 0")
    tr = cfg.train
    if tr.steps is not None and tr.steps < 1:
        raise _fail(where, "train.steps", f"got {tr.steps}; must be >= 1 or null")
    if tr.batch_size < 1:
        raise _fail(where, "train.batch_size", f"got {tr.batch_size}; must be >= 1")
    if tr.steps is None and tr.epochs <= 0:
        raise _fail(where, "train.epochs", f"got {tr.epochs}; must be > 0")
    from idlab.convergence import ConvergenceRule, validate_until

    try:
        ConvergenceRule(tol=tr.tol, window=tr.plateau_window, patience=tr.patience)
        validate_until(tr.until, tr.steps, tr.epochs, tr.eval_every)
    except ValueError as e:
        raise _fail(where, "train.until", str(e)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``'lora.r=[4,8]'`` -> ``('lora.r', [4, 8])`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value (e.g. train.steps=50)")
    key, _, val = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(val) if val.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: key '{key}': value {val!r} is not valid YAML ({e})") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, str) and p in ("model", "task"):
            nxt = {"name": nxt}
        if not isinstance(nxt, dict):
            nxt = {}
        node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def study_from_dict(raw: Mapping[str, Any], where: str = "<dict>") -> StudyConfig:
    """Build and validate a `StudyConfig` from a plain mapping (``where`` names the source in errors)."""
    cfg: StudyConfig = _build(StudyConfig, dict(raw), "", where)
    _validate(cfg, where)
    return cfg


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study YAML file, apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: unknown key or invalid value (message names file, key, allowed values),
            or a missing/unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for ov in overrides:
        k, v = parse_override(ov)
        _set_dotted(raw, k, v)
    where = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return study_from_dict(raw, where)


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain JSON-able data (tuples -> lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def describe_fields(cls: Any = StudyConfig, prefix: str = "") -> list[str]:
    """One line per configurable key: ``key (type, default): help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines += describe_fields(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "-"
        lines.append(f"  {key} ({_type_name(tp)}, default {to_dict(default)!r}): {f.metadata.get('help', '')}")
    return lines


__all__ = [
    "TARGET_SETS",
    "ConfigError",
    "FullConfig",
    "LoraConfig",
    "ModelConfig",
    "SlurmConfig",
    "StudyConfig",
    "SubspaceConfig",
    "TaskConfig",
    "TrainSettings",
    "describe_fields",
    "load_study",
    "parse_override",
    "study_from_dict",
    "target_set_label",
    "to_dict",
]
