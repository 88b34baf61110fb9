"""From a resolved run config to a trained run: build, wrap, train, extract Delta W.

`prepare` turns (base model, run config) into the model to train:

- ``full``: every parameter trainable; W_0 of every 2-D ``nn.Linear`` weight is
  copied to the host (as loaded) before training and Delta W = W_ft - W_0 is taken in
  float32 after: exact under fp32 / tf32 / bf16-mixed (float32 master weights); under pure
  ``bf16`` precision it is the difference of the bf16-rounded weights (rounded).
- ``lora``: `idlab.lora.apply_lora` (a classification head goes to
  ``modules_to_save``, i.e. it is trained directly and counted); Delta W from
  `idlab.lora.lora_deltas`; the adapter is saved in PEFT format.
- ``subspace``: `idlab.subspace.SubspaceModel` (DID or SAID); the head is trained
  directly (``head: train``, counted) or projected (``head: project``), and the
  choice is recorded; Delta W = the 2-D linear entries of ``.delta()``, keyed by
  module name; theta_d (and lambda, head) saved as safetensors.

Every method trains through the one loop, `idlab.training.loop.train`. `execute_run`
wraps it all and never raises: a failure becomes ``status: failed`` with the
traceback, a NaN/inf loss ``status: diverged``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from idlab.config.run import RunConfig
from idlab.config.schema import ModelConfig, TaskConfig
from idlab.data.base import ClassificationTask, Task, index_inputs
from idlab.models import head_module_name

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
    if tname.startswith(("glue/", "text/")) and ":" not in mname:
        from idlab.models import load_model

        head: Literal["classification", "causal-lm"] = (
            "classification" if tname.startswith("glue/") else "causal-lm")
        num_labels = GLUE_LABELS.get(tname.split("/", 1)[1].lower(), 2)
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

        data_dir = tcfg.data_dir or os.environ.get("IDLAB_GLUE_DIR") or None
        return glue_task(name.split("/", 1)[1], tokenizer, data_dir=data_dir,
                         max_length=tcfg.max_length, seed=0, **limits)
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


def linear_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: weight}`` of every ``nn.Linear`` (2-D weights) in ``model``."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.ndim == 2}


@dataclass
class Prepared:
    """A model ready for `idlab.training.loop.train` plus what to extract from it afterwards."""

    model: nn.Module
    total_parameters: int
    info: dict[str, Any] = field(default_factory=dict)
    extract: Callable[[], dict[str, Any]] = field(default=lambda: {})
    save: Callable[[Path], None] = field(default=lambda p: None)

    def deltas(self) -> dict[str, Any]:
        """Delta W per module name (Tensor (d_out, d_in) or LowRankDelta), on the CPU."""
        out = {}
        for k, v in self.extract().items():
            out[k] = v.detach().cpu().float() if isinstance(v, Tensor) else v.to(dtype=torch.float32, device="cpu")
        return out


def projection_options(run: RunConfig) -> dict[str, Any] | None:
    """The speed/memory keywords of `idlab.subspace.projections.make_projection` for a run (the one place they are mapped).

    ``fastfood_state`` keeps its study-file name all the way to the projection; "auto" is the
    projection's own default and is not passed.
    """
    if run.projection != "fastfood" or run.fastfood_state == "auto":
        return None
    return {"fastfood_state": run.fastfood_state}


def prepare(model: nn.Module, run: RunConfig) -> Prepared:
    """Turn a base model into the model to train for ``run.method`` (full, lora, subspace)."""
    method = run.method
    total = sum(p.numel() for p in model.parameters())
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        # theta_0 on the host, as loaded (a bf16 model's copy is exact at 2 B per entry)
        w0 = {n: w.detach().to("cpu", copy=True) for n, w in linear_weights(model).items()}

        def extract_full() -> dict[str, Any]:
            # Delta W = W_ft - W_0 in float32, against W_0 rounded to the dtype W trained in: exact for
            # fp32 and bf16-mixed (fp32 master weights; a bf16 W_0 is exact in fp32); with pure bf16
            # precision it is the exact difference of the bf16-rounded weights the run trained
            return {n: w.detach().cpu().float() - w0[n].to(w.dtype).float()
                    for n, w in linear_weights(model).items()}

        return Prepared(model, total, {"head": "train"}, extract_full)
    if method == "lora":
        from idlab.lora import apply_lora, lora_deltas, save_adapter

        head = head_module_name(model)
        targets = list(run.target_modules or ())
        target: Any = "all-linear" if targets == ["all-linear"] else targets
        kwargs: dict[str, Any] = {"modules_to_save": [head]} if head else {}
        torch.manual_seed(run.seed)
        assert run.r is not None and run.lora_alpha is not None  # RunConfig checks a lora run has them
        peft_model = apply_lora(model, run.r, lora_alpha=run.lora_alpha, target_modules=target,
                                lora_dropout=run.lora_dropout, use_rslora=run.use_rslora, **kwargs)
        def save_lora(d: Path) -> None:
            save_adapter(peft_model, d / "adapter")

        return Prepared(peft_model, total, {"head": "train" if head else "none", "head_module": head},
                        lambda: dict(lora_deltas(peft_model, with_base=False)), save_lora)
    if method == "subspace":
        from idlab.subspace import SubspaceModel

        head = head_module_name(model) if run.head == "train" else None
        linear = linear_weights(model)
        from idlab.subspace.hadamard import backend

        assert run.d is not None and run.projection is not None  # RunConfig checks a subspace run has them
        sm = SubspaceModel(model, run.d, projection=run.projection, said=run.said,
                           seed=run.seed, exclude=[head] if head else None, train_excluded=bool(head),
                           projection_options=projection_options(run), layout=run.layout)

        def extract_sub() -> dict[str, Any]:
            return {m: dt for m, dt in sm.delta(by_module=True).items() if m in linear}

        def save_sub(d: Path) -> None:
            from safetensors.torch import save_file

            tensors = {n: p.detach().cpu().contiguous().clone() for n, p in sm.named_parameters() if p.requires_grad}
            save_file(tensors, str(d / "subspace.safetensors"), metadata={
                "d": str(run.d), "projection": str(run.projection), "layout": run.layout,
                "said": str(run.said), "seed": str(run.seed), "head": str(head)})

        mode = "train" if head else ("project" if run.head == "project" else "none")
        info = {"head": mode, "head_module": head, "layout": run.layout, "kernel": backend()}
        return Prepared(sm, total, info, extract_sub, save_sub)
    raise ValueError(f"unknown method {method!r}; allowed values: full, lora, subspace")


def environment() -> dict[str, Any]:
    """Host, versions and git commit recorded with every result."""
    from idlab.runs import git_commit, package_versions

    return {"versions": package_versions(), "git_commit": git_commit(), "hostname": platform.node(),
            "python": platform.python_version(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def execute_run(run: RunConfig, rid: str, study: str, device: str = "auto",
                progress: bool = False) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
    """Build, train and extract one run. Never raises.

    Returns:
        ``(result, write_artifacts)``: the result.json content (status ok | diverged | failed)
        and a function writing the artifacts (delta.safetensors, adapter/ or
        subspace.safetensors) into a folder, or None when there are none.
    """
    from idlab.training.loop import train

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {"run_id": rid, "study": study, "config": run.to_dict(), "started_at": started,
                              **environment()}
    try:
        task, model = build_task_and_model(run)
        prep = prepare(model, run)
        cfg = dataclasses.replace(run.train, device=device, progress=progress)
        res = train(prep.model, task, cfg, desc=f"{rid} {run.method}")
        status = "diverged" if res.diverged else "ok"
        result.update({
            "status": status, "error": res.error, "metrics": res.metrics, "best": res.best, "curve": res.curve,
            "steps": res.steps, "trainable_parameters": res.trainable_parameters,
            "total_parameters": prep.total_parameters, "train_time_s": res.wall_time_s,
            "peak_memory_bytes": res.peak_memory_bytes, "device": res.device, "precision": res.precision,
            "task_info": task.describe(),
            "metric": task.metric, "higher_is_better": task.higher_is_better, "method_info": prep.info,
            "converged": res.converged, "convergence": res.convergence,
        })
        writer: Callable[[Path], None] | None = None
        if status == "ok":
            deltas = prep.deltas()

            def writer(d: Path) -> None:
                from idlab.deltas.io import save_deltas

                prep.save(d)
                save_deltas(d / "delta.safetensors", deltas, metadata={"run_id": rid, "method": run.method})
    except Exception as e:  # a failed run is a result, the sweep goes on
        result.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(), "metrics": {}, "best": {}, "curve": []})
        writer = None
    result["wall_time_s"] = time.perf_counter() - t0
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result, writer


__all__ = ["Prepared", "build_task_and_model", "environment", "execute_run",
           "linear_weights", "prepare", "projection_options"]
