"""`RunConfig`: the typed, frozen config of one run (what `idlab.sweep.expand` produces).

One run = one method at one point of its axes, one learning rate, one seed. Every
consumer reads typed fields (``run.d``, ``run.said``, ``run.train.lr``); the option names
are the study file's names all the way to the projection (``subspace.fastfood_state`` is
``RunConfig.fastfood_state``, passed on by `idlab.methods.projection_options`).

Serialisation (`RunConfig.to_dict`, hashed by `idlab.runs.run_id`; the ``config`` of every
``result.json``) keeps the layout run ids have always been computed from::

    {"model": name, "model_options": {hidden, dtype}, "task": name,
     "task_options": {max_length, max_train, max_val, data_dir}, "train": {...},
     "method": ..., "seed": ..., "lr": ...,
     lora:     "r", "target_modules", "target_set", "lora_alpha", "use_rslora", "lora_dropout"
     subspace: "projection", "said", "head", "d"
               (Fastfood: + "layout" when not "global", + "fastfood_state" when not "auto"/"all")}

Compatibility defaults (so that every existing run id stays valid): the ``train`` mapping
always holds the ten `LEGACY_TRAIN_KEYS`; any other `idlab.training.loop.TrainConfig` field
(``betas``, ``eval_at_start``, and fields added later) enters it only when it differs from
its default; ``lr`` and ``seed`` are top-level keys; ``device`` and ``progress`` (where and
how, not what) never enter it. Model and task options follow the same rule with
`LEGACY_MODEL_KEYS` / `LEGACY_TASK_KEYS`. ``fastfood_state`` enters only for a Fastfood
projection and when not "auto" or "all" (it changes speed and memory, never P). ``layout``
changes P: it enters for a Fastfood projection unless "global", the layout of every run
made before layouts existed (a stored config without it is a global one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from idlab.config.schema import ModelConfig, TaskConfig, TrainConfig, target_set_label

LEGACY_TRAIN_KEYS = ("steps", "epochs", "batch_size", "eval_every", "eval_batch_size", "optimizer",
                     "weight_decay", "schedule", "warmup_steps", "grad_clip")
LEGACY_MODEL_KEYS = ("hidden", "dtype")
LEGACY_TASK_KEYS = ("max_length", "max_train", "max_val", "data_dir")
#: TrainConfig fields that never enter the run id (top-level keys, or how rather than what)
_TRAIN_OUTSIDE = ("lr", "seed", "device", "progress")


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def _options(obj: Any, legacy: tuple[str, ...], skip: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """A config dataclass as a dict: the legacy keys always, other fields only when not at their default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.name in legacy or v != default:
            out[f.name] = _plain(v)
    return out


def _from_options(cls: Any, values: Mapping[str, Any], **extra: Any) -> Any:
    """Build a config dataclass from a stored mapping (lists -> tuples; unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"RunConfig: unknown {cls.__name__} keys {unknown}; allowed: {sorted(names)}")

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: tup(v) for k, v in values.items()}, **extra)


@dataclass(frozen=True)
class RunConfig:
    """One run: method and its axes, model, task, training settings (lr and seed filled in).

    Attributes:
        method: "full", "lora" or "subspace".
        model, task: the study's model and task configs.
        train: `idlab.training.loop.TrainConfig` of this run (``train.lr``, ``train.seed`` are the run's).
        r, target_modules, lora_alpha, use_rslora, lora_dropout: LoRA axes (method "lora").
        d, projection, said, head: subspace axes (method "subspace").
        layout, fastfood_state: Fastfood only: the layout of P ("blocks" or Li's "global") and what
            the projection keeps between calls ("auto": "none" for blocks, "all" for global).
    """

    method: Literal["full", "lora", "subspace"]
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    r: int | None = None
    target_modules: tuple[str, ...] | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    lora_dropout: float = 0.0
    d: int | None = None
    projection: Literal["dense", "sparse", "fastfood"] | None = None
    said: bool = False
    head: Literal["train", "project"] = "train"
    layout: Literal["blocks", "global"] = "global"
    fastfood_state: Literal["auto", "all", "index", "none"] = "auto"

    def __post_init__(self) -> None:
        if self.method == "lora" and (self.r is None or not self.target_modules or self.lora_alpha is None):
            raise ValueError("RunConfig: a lora run needs r, target_modules and lora_alpha")
        if self.method == "subspace" and (self.d is None or self.projection is None):
            raise ValueError("RunConfig: a subspace run needs d and projection")
        if self.method not in ("full", "lora", "subspace"):
            raise ValueError(f"RunConfig: unknown method {self.method!r}; allowed values: full, lora, subspace")

    @property
    def seed(self) -> int:
        """The run's seed (``train.seed``)."""
        return self.train.seed

    @property
    def lr(self) -> float:
        """The run's learning rate (``train.lr``)."""
        return self.train.lr

    @property
    def target_set(self) -> str | None:
        """Short label of the LoRA target modules (`target_set_label`)."""
        return target_set_label(self.target_modules) if self.target_modules else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able layout hashed into the run id (module docstring)."""
        out: dict[str, Any] = {
            "model": self.model.name, "model_options": _options(self.model, LEGACY_MODEL_KEYS),
            "task": self.task.name, "task_options": _options(self.task, LEGACY_TASK_KEYS),
            "train": _options(self.train, LEGACY_TRAIN_KEYS, _TRAIN_OUTSIDE),
            "method": self.method, "seed": self.seed, "lr": self.lr,
        }
        if self.method == "lora":
            out.update({"r": self.r, "target_modules": list(self.target_modules or ()), "target_set": self.target_set,
                        "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                        "lora_dropout": self.lora_dropout})
        elif self.method == "subspace":
            out.update({"projection": self.projection, "said": self.said, "head": self.head, "d": self.d})
            if self.projection == "fastfood" and self.layout != "global":
                out["layout"] = self.layout
            if self.projection == "fastfood" and self.fastfood_state not in ("auto", "all"):
                out["fastfood_state"] = self.fastfood_state
        return out

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """Parse the ``config`` of a result.json / study.json (the inverse of `to_dict`)."""
        model = _from_options(ModelConfig, cfg.get("model_options") or {}, name=cfg["model"])
        task = _from_options(TaskConfig, cfg.get("task_options") or {}, name=cfg["task"])
        train = _from_options(TrainConfig, cfg.get("train") or {}, lr=float(cfg["lr"]), seed=int(cfg["seed"]))
        method = cfg["method"]
        kw: dict[str, Any] = {}
        if method == "lora":
            kw = {"r": int(cfg["r"]), "target_modules": tuple(cfg["target_modules"]),
                  "lora_alpha": float(cfg["lora_alpha"]), "use_rslora": bool(cfg.get("use_rslora", False)),
                  "lora_dropout": float(cfg.get("lora_dropout", 0.0))}
        elif method == "subspace":
            kw = {"d": int(cfg["d"]), "projection": cfg["projection"], "said": bool(cfg["said"]),
                  "head": cfg.get("head", "train"), "layout": cfg.get("layout", "global"),
                  "fastfood_state": cfg.get("fastfood_state", "auto")}
        return cls(method=method, model=model, task=task, train=train, **kw)

    def label(self) -> str:
        """A short human label: ``lora r=4 qv lr=0.001 seed=0``."""
        extra = ""
        if self.method == "lora":
            extra = f" r={self.r} {self.target_set}"
        elif self.method == "subspace":
            extra = f" d={self.d} {self.projection}{' said' if self.said else ''}"
        return f"{self.method}{extra} lr={self.lr:g} seed={self.seed}"


__all__ = ["LEGACY_MODEL_KEYS", "LEGACY_TASK_KEYS", "LEGACY_TRAIN_KEYS", "RunConfig"]
