"""From a run config to its task and base model (`build_task_and_model`): what a run trains on.

The sweep's runs, ``idlab plan`` (small from-scratch models) and the report's W_0 rebuild
(`idlab.report.deltas.base_weights`) all build through here, so they see the same model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from idlab.config.run import RunConfig
from idlab.config.schema import (
    ModelConfig,
    TaskConfig,
    instruct_options,
    is_causal_lm_task,
    is_instruct,
    is_text_task,
)
from idlab.data.base import ClassificationTask, Task, index_inputs

#: Number of labels of the GLUE classification tasks (default 2).
GLUE_LABELS = {"mnli": 3, "mnli-mm": 3, "ax": 3}


def _import_object(spec: str) -> Any:
    """``'package.module:function'`` -> the object."""
    mod, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r} ({e}); expected 'package.module:function'") from None


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_task_and_model(run: RunConfig) -> tuple[Task, nn.Module]:
    """The task and the freshly initialised / pretrained base model of a run config.

    Model initialisation (heads, from-scratch nets) is seeded by ``run.seed``;
    data subsets use seed 0 so that every run of a study sees the same examples.
    """
    tcfg, mcfg = run.task, run.model
    tname, mname = tcfg.name, mcfg.name
    seed = run.seed
    tokenizer = None
    model: nn.Module | None = None
    if is_text_task(tname) and ":" not in mname:
        from idlab.models import load_model

        head: Literal["classification", "causal-lm"] = (
            "causal-lm" if is_causal_lm_task(tname) else "classification")
        num_labels = GLUE_LABELS.get(tname.split("/", 1)[-1].lower(), 2)
        torch.manual_seed(seed)
        model, tokenizer = load_model(mname, task=head, num_labels=num_labels, dtype=_dtype(mcfg.dtype))
    task = _build_task(tcfg, tokenizer)
    if model is None:
        torch.manual_seed(seed)
        model = _build_scratch_model(mcfg, task)
    return task, model


def _build_task(tcfg: TaskConfig, tokenizer: Any) -> Task:
    name = tcfg.name
    limits = {"max_train": tcfg.max_train, "max_val": tcfg.max_val}
    if ":" in name:
        task = _import_object(name)()
        if not isinstance(task, Task):
            raise TypeError(f"task factory {name!r} returned {type(task).__name__}, not an idlab Task")
        return task
    if name.startswith("glue/"):
        from idlab.data.glue import glue_task

        # None falls back to $IDLAB_GLUE_DIR, then `datasets` (idlab.data.glue.glue_data_dir)
        return glue_task(name.split("/", 1)[1], tokenizer, data_dir=tcfg.data_dir or None,
                         max_length=tcfg.max_length, seed=0, **limits)
    if is_instruct(name):
        from idlab.data.instruct import instruct_task

        return instruct_task(name, tokenizer, max_length=tcfg.max_length, **limits, options=instruct_options(tcfg))
    if name.startswith("text/"):
        from idlab.data.corpus import text_corpus_task

        return text_corpus_task(tokenizer, source=name.split("/", 1)[1], block_size=tcfg.max_length,
                                max_blocks=limits["max_train"], seed=0)
    from idlab.data import vision

    if name == "digits":
        return _limit(vision.digits_task(flatten=True), limits)
    if name == "mnist":
        return vision.mnist_task(max_train=limits["max_train"], max_eval=limits["max_val"], flatten=True)
    if name == "toy":
        return vision.ToyTask()
    raise ValueError(f"unknown task {name!r}")


def _limit(task: ClassificationTask, limits: Mapping[str, Any]) -> ClassificationTask:
    """The first max_train / max_val examples of an in-memory classification task."""
    mt, mv = limits.get("max_train"), limits.get("max_val")
    if mt is None and mv is None:
        return task
    idx_t = torch.arange(min(mt or task.num_train, task.num_train))
    idx_v = torch.arange(min(mv or len(task.y_val), len(task.y_val)))
    return ClassificationTask(index_inputs(task.x_train, idx_t), task.y_train[idx_t],
                              index_inputs(task.x_val, idx_v), task.y_val[idx_v],
                              name=task.name, num_classes=task.num_classes, f1=task.f1)


def _build_scratch_model(mcfg: ModelConfig, task: Task) -> nn.Module:
    from idlab.models import MLP, lenet, mnist_fc

    name = mcfg.name
    hidden = mcfg.hidden
    if ":" in name:
        model = _import_object(name)(task)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    if name == "toy" or task.name == "toy":
        from idlab.data.vision import ToyModel

        return ToyModel()
    if name in ("mlp", "mnist-fc", "lenet"):
        if not isinstance(task, ClassificationTask):
            raise ValueError(f"model {name!r} needs a classification task with tensor inputs, got {task.name!r}")
        x = task.x_train
        if not isinstance(x, Tensor):
            raise ValueError(f"model {name!r} needs tensor inputs; task {task.name!r} has dict inputs")
        n_in = int(x[0].numel())
        if name == "mlp":
            return MLP((n_in, *hidden, task.num_classes))
        if name == "mnist-fc":
            return mnist_fc(hidden, task.num_classes)
        return lenet(num_classes=task.num_classes)
    raise ValueError(
        f"model {name!r} needs a text task (glue/<name> or text/<corpus>); task is {task.name!r}. "
        "Use mlp, mnist-fc or lenet for vision tasks"
    )


__all__ = ["GLUE_LABELS", "build_task_and_model"]
