"""`RunConfig`: the typed, frozen config of one run (what `idlab.sweep.expand` produces).

One run = one method at one point of its axes, one learning rate, one seed. Every
consumer reads typed fields (``run.axes.d``, ``run.train.lr``); the option names are the study
file's names all the way to the projection (``subspace.fastfood_state`` is
``SubspaceAxes.fastfood_state``).

Serialisation (`RunConfig.to_dict`, hashed by `idlab.runs.run_id`; the ``config`` of every
``result.json``) keeps the layout run ids have always been computed from::

    {"model": name, "model_options": {hidden, dtype}, "task": name,
     "task_options": {max_length, max_train, max_val, data_dir}, "train": {...},
     "method": ..., "seed": ..., "lr": ..., **axes.to_dict()}

where the method's `idlab.methods.Axes` give their own keys (LoRA: r, target_modules,
target_set, lora_alpha, use_rslora, lora_dropout; subspace: projection, said, head, d, and
for Fastfood layout / fastfood_state when not at their pre-layout values).

Compatibility defaults (so that every existing run id stays valid): the ``train`` mapping
always holds the ten `LEGACY_TRAIN_KEYS`; any other `idlab.training.loop.TrainConfig` field
(``betas``, ``eval_at_start``, and fields added later) enters it only when it differs from
its default; ``lr`` and ``seed`` are top-level keys; ``device``, ``progress`` and the
`idlab.config.schema.EXECUTION_TRAIN_FIELDS` (checkpoints, distributed strategy, tracking: where and
how, not what) never enter it. Model and task options follow the same rule with
`LEGACY_MODEL_KEYS` / `LEGACY_TASK_KEYS`. The axes keep their own rules (`Axes.to_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

from idlab import methods
from idlab.config.schema import EXECUTION_TRAIN_FIELDS, ModelConfig, TaskConfig, TrainConfig
from idlab.jsontypes import JsonObject, JsonValue, as_float, as_int
from idlab.methods import Axes

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

LEGACY_TRAIN_KEYS = ("steps", "epochs", "batch_size", "eval_every", "eval_batch_size", "optimizer",
                     "weight_decay", "schedule", "warmup_steps", "grad_clip")
LEGACY_MODEL_KEYS = ("hidden", "dtype")
LEGACY_TASK_KEYS = ("max_length", "max_train", "max_val", "data_dir")
#: TrainConfig fields that never enter the run id (top-level keys, or how rather than what)
_TRAIN_OUTSIDE = ("lr", "seed", "device", "progress", *EXECUTION_TRAIN_FIELDS)


def _plain(v: object) -> JsonValue:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return cast(JsonValue, v)  # the config dataclasses hold JSON scalars and tuples of them


def _options(obj: DataclassInstance, legacy: tuple[str, ...], skip: tuple[str, ...] = ("name",)) -> JsonObject:
    """A config dataclass as a dict: the legacy keys always, other fields only when not at their default."""
    out: JsonObject = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if f.name in legacy or v != default:
            out[f.name] = _plain(v)
    return out


def _from_options(cls: type[C], values: object, **extra: object) -> C:
    """Build a config dataclass from a stored mapping (lists -> tuples; unknown keys are an error)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"RunConfig: {cls.__name__} options must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"RunConfig: unknown {cls.__name__} keys {unknown}; allowed: {sorted(names)}")

    def tup(v: object) -> object:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: tup(v) for k, v in values.items()}, **extra)


def parts_from_dict(cfg: Mapping[str, object]) -> tuple[ModelConfig, TaskConfig, TrainConfig]:
    """The model, task and train configs of a stored run config (defaults filled in); the method and
    its axes are not read, so a run of a method no longer registered parses too."""
    model = _from_options(ModelConfig, cfg.get("model_options") or {}, name=cfg["model"])
    task = _from_options(TaskConfig, cfg.get("task_options") or {}, name=cfg["task"])
    train = _from_options(TrainConfig, cfg.get("train") or {}, lr=as_float(cfg["lr"]), seed=as_int(cfg["seed"]))
    return model, task, train


@dataclass(frozen=True)
class RunConfig:
    """One run: a method at one point of its axes, the model, the task, the training settings.

    Attributes:
        method: a registered method name (`idlab.methods.names`).
        model, task: the study's model and task configs.
        train: `idlab.training.TrainConfig` of this run (``train.lr``, ``train.seed`` are the run's).
        axes: the method's own axes (`idlab.methods.Axes` subclass of that method: rank and
            target set for LoRA, d / projection / SAID for a subspace run, none for full).
    """

    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    axes: Axes = field(default_factory=Axes)

    def __post_init__(self) -> None:
        m = methods.get(self.method)  # ValueError naming the registered methods
        if type(self.axes) is Axes and m.axes_type is not Axes:  # the default: the method's empty axes
            try:
                object.__setattr__(self, "axes", m.axes_type())
            except TypeError:
                raise ValueError(f"RunConfig: a {self.method} run needs its axes ({m.axes_type.__name__})") from None
        if type(self.axes) is not m.axes_type:
            raise ValueError(f"RunConfig: method {self.method!r} takes {m.axes_type.__name__} axes, "
                             f"got {type(self.axes).__name__}")

    @property
    def seed(self) -> int:
        """The run's seed (``train.seed``)."""
        return self.train.seed

    @property
    def lr(self) -> float:
        """The run's learning rate (``train.lr``)."""
        return self.train.lr

    def to_dict(self) -> JsonObject:
        """The JSON-able layout hashed into the run id (module docstring)."""
        return {
            "model": self.model.name, "model_options": _options(self.model, LEGACY_MODEL_KEYS),
            "task": self.task.name, "task_options": _options(self.task, LEGACY_TASK_KEYS),
            "train": _options(self.train, LEGACY_TRAIN_KEYS, _TRAIN_OUTSIDE),
            "method": self.method, "seed": self.seed, "lr": self.lr, **self.axes.to_dict(),
        }

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> RunConfig:
        """Parse the ``config`` of a result.json / study.json (the inverse of `to_dict`)."""
        model, task, train = parts_from_dict(cfg)
        return cls(method=str(cfg["method"]), model=model, task=task, train=train, axes=methods.axes_from_config(cfg))

    def label(self) -> str:
        """A short human label: ``lora r=4 qv lr=0.001 seed=0``."""
        extra = self.axes.label()
        return f"{self.method}{' ' + extra if extra else ''} lr={self.lr:g} seed={self.seed}"


__all__ = ["LEGACY_MODEL_KEYS", "LEGACY_TASK_KEYS", "LEGACY_TRAIN_KEYS", "RunConfig", "parts_from_dict"]
