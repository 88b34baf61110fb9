"""Study configuration schema: the frozen dataclasses a study YAML file fills.

A study file (``experiments/configs/*.yaml``; read by `idlab.config.loader`) declares one model, one task, the
methods to compare, each with its own block of axes and learning rates (the block's schema is the
method's ``settings_type``, `idlab.methods`: e.g. ``lora:`` ranks and target sets, ``subspace:``
d, projection, SAID), the crossing target (``target:``), the training settings
(`idlab.training.loop.TrainConfig`, the same dataclass the training loop takes) and the seeds.

Every field carries a help string (``field(metadata={"help": ...})``);
`describe_fields` prints them (``idlab sweep --help-config``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from idlab.d90 import TARGET_RULES, TargetRule
from idlab.data.chat import TemplateMode
from idlab.data.generate import Extractor
from idlab.data.instruct import InstructOptions
from idlab.data.instruct_source import PRESETS, is_instruct_task
from idlab.errors import ConfigError
from idlab.options import doc
from idlab.training.loop import TrainConfig

#: TrainConfig fields set per run, not in a study's ``train`` block: the key to use instead
PER_RUN_TRAIN_FIELDS: dict[str, str] = {
    "lr": "<method>.lr, e.g. lora.lr (one list per method)",
    "seed": "seeds (the study's list of seeds)",
    "device": "device (top level)",
    "progress": "progress (top level)",
}

#: TrainConfig fields that say how a run executes, not what it computes: in no run id (`idlab.config.run`)
#: and no study setting (`idlab.config.settings`), like device and progress
EXECUTION_TRAIN_FIELDS = ("checkpoint_every", "checkpoint_every_min", "keep_checkpoints", "distributed", "log_to")

BUILTIN_TASKS = ("digits", "mnist", "toy")
TASK_FAMILIES = ("glue/", "text/", "instruct/")
#: task presets by name: instruction data with its fields and answer extractor (`idlab.data.instruct_source`)
TASK_PRESETS = tuple(PRESETS)


def is_instruct(task: str) -> bool:
    """An instruction-tuning task: a preset (gsm8k) or ``instruct/<source>``."""
    return is_instruct_task(task)


def is_text_task(task: str) -> bool:
    """A task on a pretrained language model: glue/, text/, instruct/ or a preset."""
    return task.startswith(TASK_FAMILIES) or task in PRESETS


def instruct_options(task: TaskConfig) -> InstructOptions:
    """The instruction-task keys of ``task`` (`idlab.data.instruct.InstructOptions`, same names)."""
    return InstructOptions(**{f.name: getattr(task, f.name) for f in dataclasses.fields(InstructOptions)})


def is_causal_lm_task(task: str) -> bool:
    """A task trained by next-token loss on a causal LM (``text/``, instruction tasks)."""
    return task.startswith("text/") or is_instruct_task(task)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to fine-tune (or train from scratch)."""

    name: str = field(
        default="mlp",
        metadata=doc(
            "model: mlp | mnist-fc | lenet (from scratch), an offline alias (smollm2-135m, minilm-l6), "
            "a Hugging Face name or folder, or 'package.module:function' returning an nn.Module"
        ),
    )
    hidden: tuple[int, ...] = field(
        default=(64,), metadata=doc("hidden sizes for model=mlp / mnist-fc (input and output come from the task)")
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata=doc("parameter dtype for pretrained models")
    )


@dataclass(frozen=True)
class TaskConfig:
    """The data, loss and metric."""

    name: str = field(
        default="digits",
        metadata=doc(
            "task: digits | mnist | toy | glue/<mrpc|sst2|rte|cola|...> | text/<corpus> | gsm8k | "
            "instruct/<Hugging Face dataset, .jsonl/.json/.parquet file or folder> | "
            "'package.module:function' returning an idlab Task"
        ),
    )
    max_length: int = field(default=128, metadata=doc("tokens per example (text tasks)"))
    max_train: int | None = field(default=None, metadata=doc("keep at most this many training examples"))
    max_val: int | None = field(default=None, metadata=doc("keep at most this many validation examples"))
    data_dir: str | None = field(
        default=None, metadata=doc("folder in the GLUE tsv layout (glue/* tasks; None: $IDLAB_GLUE_DIR if set, else "
                                   "Hugging Face datasets), or of a preset's split files (gsm8k: train.jsonl, "
                                   "test.jsonl; None: $IDLAB_GSM8K_DIR, else ../shared/data/gsm8k, else the hub)")
    )
    # ---- instruction tasks (gsm8k, instruct/<source>): idlab.data.instruct.InstructOptions, same names
    dataset_config: str | None = field(default=None, metadata=doc("Hugging Face dataset config (gsm8k: main)"))
    train_split: str = field(default="train", metadata=doc("instruction tasks: the training split"))
    eval_split: str = field(default="test", metadata=doc("instruction tasks: the split evaluated and generated on"))
    prompt_field: str | None = field(
        default=None, metadata=doc("field holding the prompt (None: the preset's, gsm8k question; else 'prompt')"))
    response_field: str | None = field(
        default=None, metadata=doc("field holding the response (None: the preset's, gsm8k answer; else 'response')"))
    system_field: str | None = field(default=None, metadata=doc("field holding a system message (None: none)"))
    format: Literal["fields", "alpaca", "messages"] = field(
        default="fields", metadata=doc("instruction records: fields (prompt_field / response_field / system_field), "
                                       "alpaca (instruction, input, output) or messages (role / content turns, the "
                                       "last the assistant's response)"))
    chat_template: TemplateMode = field(
        default="auto", metadata=doc("auto: the tokenizer's chat template, a plain one where it has none; model: "
                                     "the tokenizer's (refused when it has none); plain: ### Instruction / Response"))
    packing: bool = field(default=False, metadata=doc("pack training examples into blocks of max_length tokens"))
    extractor: Extractor | None = field(
        default=None, metadata=doc("answer extractor for exact match: gsm8k (after ####, else the last number), "
                                   "last_number, text (None: the preset's, else text)"))
    generate_subset: int = field(
        default=0, metadata=doc("eval prompts (a fixed, seeded subset) answered by greedy generation at the end of "
                                "the run for exact match; 0: no generation"))
    max_new_tokens: int = field(default=256, metadata=doc("generation: new tokens at most (stops at EOS)"))
    generate_batch_size: int = field(default=16, metadata=doc("generation: prompts per batch (left padded)"))
    generate_every: int = field(
        default=0, metadata=doc("also generate at every N-th evaluation (exact_match in the curve); 0: at the end only"))
    generate_before: bool = field(default=True, metadata=doc("also score the pretrained model (exact_match_before)"))
    generate_seed: int = field(default=0, metadata=doc("seed of the generation subset"))
    forgetting_corpus: str | None = field(
        default="pydoc", metadata=doc("instruction tasks: general corpus whose next-token loss is recorded before "
                                      "and after training (pydoc or a text file; null: off)"))
    forgetting_blocks: int = field(default=32, metadata=doc("held-out blocks of 128 tokens of the forgetting corpus"))

    def __post_init__(self) -> None:
        for key in ("generate_subset", "generate_every", "forgetting_blocks"):
            if getattr(self, key) < 0:
                raise ValueError(f"task.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("max_new_tokens", "generate_batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"task.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class TargetConfig:
    """The target of every crossing (d90, r90, p90): by ``rule``, ``threshold`` x the baseline score
    ("fraction") or ``threshold`` x its gain over the pretrained score ("improvement")."""

    threshold: float = field(default=0.9, metadata=doc("crossing threshold as a fraction of the baseline (0.9: d90)"))
    baseline: float | None = field(
        default=None,
        metadata=doc("fixed 'global' baseline (e.g. 1.0 on MNIST); None: the mean of the full fine-tuning runs "
                       "at their selected learning rate ('local')"),
    )
    rule: TargetRule = field(
        default="fraction",
        metadata=doc("threshold rule: fraction (Li et al.: target = threshold x baseline; a score in [0, 1] such as "
                       "accuracy or exact match) | improvement (target = pretrained + threshold x (baseline - "
                       "pretrained): that fraction of full fine-tuning's gain over the pretrained model; a loss, "
                       "tracked as neg_loss: L_pre - 0.9 (L_pre - L_full)); docs/SCIENCE.md section 6"),
    )
    pretrained: float | None = field(
        default=None,
        metadata=doc("the pretrained model's score for rule improvement (in the tracked metric's units, e.g. "
                       "neg_loss); None: the step-0 evaluation of the full fine-tuning runs (train.eval_at_start)"),
    )


def _registered() -> tuple[str, ...]:
    from idlab import methods

    return tuple(n for n in methods.names() if methods.get(n).listed_by_default)


def target_of(study: Mapping[str, Any]) -> TargetConfig:
    """The crossing target recorded in a study.json's ``study`` mapping.

    Studies written before the ``target:`` block kept ``threshold`` and ``baseline`` in a method's
    block; they are read from there.
    """
    block = study.get("target")
    if not isinstance(block, Mapping):
        block = next((b for b in study.values() if isinstance(b, Mapping) and "threshold" in b), {})
    base, pre = block.get("baseline"), block.get("pretrained")
    rule = str(block.get("rule", "fraction"))
    if rule not in TARGET_RULES:
        raise ConfigError(f"study.json: target.rule {rule!r}; rules: {', '.join(TARGET_RULES)}")
    return TargetConfig(threshold=float(block.get("threshold", 0.9)), baseline=None if base is None else float(base),
                        rule=cast(TargetRule, rule), pretrained=None if pre is None else float(pre))


@dataclass(frozen=True)
class SlurmConfig:
    """Slurm submission through submitit (``executor=slurm``): one array task per run."""

    partition: str | None = field(default=None, metadata=doc("Slurm partition"))
    time_min: int = field(default=60, metadata=doc("time limit per run, minutes"))
    gpus_per_node: int | None = field(
        default=None, metadata=doc("GPUs per array task (null: by device: cpu none, cuda one, auto one where the "
                                   "partition has GPU nodes)"))
    gres: str | None = field(default=None, metadata=doc("generic resources instead of gpus_per_node, e.g. gpu:a100:1"))
    cpus_per_task: int | None = field(
        default=None, metadata=doc("CPUs per array task (null: 4, or the partition's largest node if smaller)"))
    mem_gb: int | None = field(
        default=None, metadata=doc("host memory per array task, GB (null: the largest run's figure from idlab plan)")
    )
    array_parallelism: int = field(default=16, metadata=doc("array tasks running at once"))
    account: str | None = field(default=None, metadata=doc("Slurm account"))
    qos: str | None = field(default=None, metadata=doc("Slurm QOS"))
    constraint: str | None = field(default=None, metadata=doc("Slurm constraint, e.g. a100"))
    setup: tuple[str, ...] = field(default=(), metadata=doc("shell lines run before each task, e.g. module load cuda"))
    additional_parameters: Mapping[str, Any] = field(
        default_factory=dict, metadata=doc("any further sbatch option, e.g. {mail-type: END}"))
    stuck_timeout_min: float = field(
        default=10, metadata=doc("cancel a job pending this long for a reason that never clears (PartitionConfig, ...)"))
    folder: str | None = field(default=None, metadata=doc("submitit log folder (default <study dir>/slurm)"))
    backend: Literal["slurm", "local", "debug"] = field(
        default="slurm", metadata=doc("slurm; local/debug = submitit's LocalExecutor/DebugExecutor (offline tests)")
    )


@dataclass(frozen=True)
class EvalConfig:
    """lm-evaluation-harness tasks scored after training (``idlab eval`` on every run that finished ok)."""

    tasks: tuple[str, ...] = field(default=(), metadata=doc("lm-eval task names scored after training (empty: none)"))
    limit: int | None = field(default=None, metadata=doc("score the first N documents of each task (null: all)"))
    include_path: str | None = field(default=None, metadata=doc("a folder of lm-eval task YAML files (local tasks)"))
    builtin_tasks: bool = field(default=True, metadata=doc("index lm-eval's built-in tasks too (false: only "
                                                           "include_path's)"))
    tokenizer: str | None = field(default=None, metadata=doc("tokenizer for a model without its own (a factory model)"))
    batch_size: int = field(default=8, metadata=doc("lm-eval batch size"))
    pretrained: bool = field(default=False, metadata=doc("also score the pretrained model each run started from "
                                                         "(forgetting on these tasks = after - before)"))


@dataclass(frozen=True)
class StudyConfig:
    """One study: model x task x methods x axes x seeds."""

    name: str = field(default="study", metadata=doc("study name: results go to <results_dir>/<name>/"))
    description: str = field(default="", metadata=doc("one line shown in the report"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc("the network (name or mapping)"))
    task: TaskConfig = field(default_factory=TaskConfig, metadata=doc("the task (name or mapping)"))
    methods: tuple[str, ...] = field(
        default_factory=lambda: _registered(),
        metadata=doc("methods to run (registered: idlab.methods.names(); default: those listed by default, not the "
                     "ones whose block must be written); each reads the block of its name"))
    target: TargetConfig = field(default_factory=TargetConfig, metadata=doc("the crossing target (d90, r90, p90)"))
    train: TrainConfig = field(
        default_factory=TrainConfig,
        metadata=doc("training settings shared by every run (idlab.training.loop.TrainConfig); lr comes from "
                       "<method>.lr and seed from seeds, per run"),
    )
    seeds: tuple[int, ...] = field(default=(0,), metadata=doc("seeds (each cell runs once per seed)"))
    score: Literal["final", "best", "exact_match"] = field(
        default="final", metadata=doc("performance of a run: final evaluation or best over evaluations of the "
                                      "tracked metric, or exact_match (instruction tasks: the end-of-run greedy "
                                      "exact match on task.generate_subset problems; d90 / r90 on it)")
    )
    results_dir: str = field(default="results", metadata=doc("results root folder"))
    executor: Literal["local", "multigpu", "slurm", "torchrun"] = field(
        default="local", metadata=doc("local (in-process), multigpu (one worker per GPU), slurm (submitit), "
                                      "torchrun (each run on nproc_per_node processes: train.distributed)")
    )
    nproc_per_node: int = field(
        default=1, metadata=doc("processes per run (train.distributed): executor torchrun starts them on this host, "
                                "executor slurm asks for that many tasks on one node (GPUs on CUDA, one each; any "
                                "number on the CPU, gloo)"))
    gpus: tuple[int, ...] | None = field(default=None, metadata=doc("multigpu: GPU indices (null: all visible)"))
    device: str = field(default="auto", metadata=doc("auto, cpu, cuda, cuda:1 (local executor)"))
    retry_failed: bool = field(default=True, metadata=doc("rerun runs whose status is 'failed' (diverged is kept)"))
    progress: bool = field(default=False, metadata=doc("per-step tqdm bar inside each run"))
    slurm: SlurmConfig = field(default_factory=SlurmConfig, metadata=doc("Slurm settings (executor=slurm)"))
    eval: EvalConfig = field(default_factory=EvalConfig,
                             metadata=doc("lm-eval tasks `idlab sweep` scores after training (idlab eval)"))
    method_settings: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "each method's block, by method name", "internal": True})

    def __getattr__(self, name: str) -> Any:
        """``study.lora`` is ``study.settings("lora")`` for every registered method."""
        if name.startswith("_") or name == "method_settings":
            raise AttributeError(name)
        from idlab import methods

        if name in methods.names():
            return self.settings(name)
        raise AttributeError(f"'StudyConfig' has no attribute {name!r}")

    def settings(self, method: str) -> Any:
        """The study block of ``method`` (its ``settings_type``; the defaults when the file has none)."""
        if method in self.method_settings:
            return self.method_settings[method]
        from idlab import methods

        return methods.get(method).default_settings()

    def study_dir(self) -> Path:
        """``<results_dir>/<name>``."""
        return Path(self.results_dir) / self.name


__all__ = [
    "BUILTIN_TASKS",
    "EXECUTION_TRAIN_FIELDS",
    "PER_RUN_TRAIN_FIELDS",
    "TASK_FAMILIES",
    "TASK_PRESETS",
    "ConfigError",
    "ModelConfig",
    "SlurmConfig",
    "StudyConfig",
    "TargetConfig",
    "TaskConfig",
    "TrainConfig",
    "instruct_options",
    "is_causal_lm_task",
    "is_instruct",
    "is_text_task",
    "target_of",
]
