"""Study configuration schema: the frozen dataclasses a study YAML file fills.

A study file (``experiments/configs/*.yaml``; read by `idlab.config.loader`) declares one model, one task, the
methods to compare and their scientific axes (LoRA rank and target sets,
subspace dimension, projection, SAID), the nuisance settings (learning rate per
method, optionally a short list searched per cell), the training settings
(`idlab.training.loop.TrainConfig`, the same dataclass the training loop takes) and the seeds.

Every field carries a help string (``field(metadata={"help": ...})``);
`describe_fields` prints them (``idlab sweep --help-config``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from idlab.errors import ConfigError
from idlab.training.loop import TrainConfig


def _help(text: str) -> dict[str, str]:
    return {"help": text}




#: TrainConfig fields set per run, not in a study's ``train`` block: the key to use instead
PER_RUN_TRAIN_FIELDS: dict[str, str] = {
    "lr": "full.lr / lora.lr / subspace.lr (one list per method)",
    "seed": "seeds (the study's list of seeds)",
    "device": "device (top level)",
    "progress": "progress (top level)",
}


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
    layout: Literal["blocks", "global"] = field(
        default="blocks",
        metadata=_help(
            "Fastfood layout: 'blocks' (stacked hashed blocks, streamed per tensor, near-zero state) or 'global' "
            "(Li et al.'s single block over next_pow2(D)); see docs/ENGINE.md"
        ),
    )
    fastfood_state: Literal["auto", "all", "index", "none"] = field(
        default="auto",
        metadata=_help(
            "what a Fastfood projection keeps between calls (same P, same results): 'auto' ('none' for blocks, 'all' "
            "for global); global: 'all' (4 bytes per padded coordinate, fastest), 'index' (2 bytes; G redrawn each "
            "call), 'none' (slowest); blocks: 'none' only"
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
class SlurmConfig:
    """Slurm submission through submitit (``executor=slurm``): one array task per run."""

    partition: str | None = field(default=None, metadata=_help("Slurm partition"))
    time_min: int = field(default=60, metadata=_help("time limit per run, minutes"))
    gpus_per_node: int = field(default=1, metadata=_help("GPUs per array task"))
    cpus_per_task: int = field(default=4, metadata=_help("CPUs per array task"))
    mem_gb: int | None = field(
        default=None, metadata=_help("host memory per array task, GB (null: the largest run's figure from idlab plan)")
    )
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
    train: TrainConfig = field(
        default_factory=TrainConfig,
        metadata=_help("training settings shared by every run (idlab.training.loop.TrainConfig); lr comes from "
                       "full.lr / lora.lr / subspace.lr and seed from seeds, per run"),
    )
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


__all__ = [
    "BUILTIN_TASKS",
    "METHODS",
    "PER_RUN_TRAIN_FIELDS",
    "PROJECTIONS",
    "TARGET_SETS",
    "TASK_FAMILIES",
    "ConfigError",
    "FullConfig",
    "LoraConfig",
    "ModelConfig",
    "SlurmConfig",
    "StudyConfig",
    "SubspaceConfig",
    "TaskConfig",
    "TrainConfig",
    "target_set_label",
]
