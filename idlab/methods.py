"""From a resolved run config to a trained run: build, wrap, train, extract Delta W.

`prepare` turns (base model, run config) into the model to train:

- ``full``: every parameter trainable; W_0 of every 2-D ``nn.Linear`` weight is
  cloned before training and Delta W = W_ft - W_0 is extracted after.
- ``lora``: `idlab.lora.apply_lora` (a classification head goes to
  ``modules_to_save``, i.e. it is trained directly and counted); Delta W from
  `idlab.lora.lora_deltas`; the adapter is saved in PEFT format.
- ``subspace``: `idlab.subspace.SubspaceModel` (DID or SAID); the head is trained
  directly (``head: train``, counted) or projected (``head: project``), and the
  choice is recorded; Delta W = the 2-D linear entries of ``.delta()``, keyed by
  module name; theta_d (and lambda, head) saved as safetensors.

Every method trains through the one loop, `idlab.training.train`. `execute_run`
wraps it all and never raises: a failure becomes ``status: failed`` with the
traceback, a NaN/inf loss ``status: diverged``.
"""

from __future__ import annotations

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


def build_task_and_model(run: Mapping[str, Any]) -> tuple[Task, nn.Module]:
    """The task and the freshly initialised / pretrained base model of a run config.

    Model initialisation (heads, from-scratch nets) is seeded by ``run['seed']``;
    data subsets use seed 0 so that every run of a study sees the same examples.
    """
    tcfg = {**run.get("task_options", {}), "name": run["task"]}
    mcfg = {**run.get("model_options", {}), "name": run["model"]}
    tname, mname = str(tcfg["name"]), str(mcfg["name"])
    seed = int(run["seed"])
    tokenizer = None
    model: nn.Module | None = None
    if tname.startswith(("glue/", "text/")) and ":" not in mname:
        from idlab.models import load_model

        head: Literal["classification", "causal-lm"] = (
            "classification" if tname.startswith("glue/") else "causal-lm")
        num_labels = GLUE_LABELS.get(tname.split("/", 1)[1].lower(), 2)
        torch.manual_seed(seed)
        model, tokenizer = load_model(mname, task=head, num_labels=num_labels, dtype=_dtype(mcfg.get("dtype", "float32")))
    task = _build_task(tcfg, tokenizer)
    if model is None:
        torch.manual_seed(seed)
        model = _build_scratch_model(mcfg, task)
    return task, model


def _build_task(tcfg: Mapping[str, Any], tokenizer: Any) -> Task:
    name = str(tcfg["name"])
    limits = {"max_train": tcfg.get("max_train"), "max_val": tcfg.get("max_val")}
    if ":" in name:
        task = _import_object(name)()
        if not isinstance(task, Task):
            raise TypeError(f"task factory {name!r} returned {type(task).__name__}, not an idlab Task")
        return task
    if name.startswith("glue/"):
        from idlab.data.text import glue_task

        data_dir = tcfg.get("data_dir") or os.environ.get("IDLAB_GLUE_DIR") or None
        return glue_task(name.split("/", 1)[1], tokenizer, data_dir=data_dir,
                         max_length=int(tcfg.get("max_length", 128)), seed=0, **limits)
    if name.startswith("text/"):
        from idlab.data.text import text_corpus_task

        return text_corpus_task(tokenizer, source=name.split("/", 1)[1], block_size=int(tcfg.get("max_length", 128)),
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


def _build_scratch_model(mcfg: Mapping[str, Any], task: Task) -> nn.Module:
    from idlab.models import MLP, lenet, mnist_fc

    name = str(mcfg["name"])
    hidden = tuple(int(h) for h in mcfg.get("hidden", (64,)))
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


def head_module_name(model: nn.Module) -> str | None:
    """Qualified name of the classification head (``score``, ``classifier``), or None."""
    try:
        from idlab.models import classifier_head_name

        name = classifier_head_name(model)
    except Exception:
        name = None
    modules = dict(model.named_modules())
    if name and name in modules:
        return name
    for cand in ("score", "classifier"):
        if cand in modules:
            return cand
    return None


@dataclass
class Prepared:
    """A model ready for `idlab.training.train` plus what to extract from it afterwards."""

    model: nn.Module
    total_parameters: int
    info: dict[str, Any] = field(default_factory=dict)
    extract: Callable[[], dict[str, Any]] = field(default=lambda: {})
    save: Callable[[Path], None] = field(default=lambda p: None)

    def deltas(self) -> dict[str, Any]:
        """Delta W per module name (Tensor (d_out, d_in) or LowRankDelta), on the CPU."""
        out = {}
        for k, v in self.extract().items():
            out[k] = v.detach().float().cpu() if isinstance(v, Tensor) else v.to(dtype=torch.float32, device="cpu")
        return out


def prepare(model: nn.Module, run: Mapping[str, Any]) -> Prepared:
    """Turn a base model into the model to train for ``run['method']`` (full, lora, subspace)."""
    method = run["method"]
    total = sum(p.numel() for p in model.parameters())
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        w0 = {n: w.detach().clone().cpu() for n, w in linear_weights(model).items()}

        def extract_full() -> dict[str, Any]:
            return {n: w.detach().cpu() - w0[n].to(w.dtype) for n, w in linear_weights(model).items()}

        return Prepared(model, total, {"head": "train"}, extract_full)
    if method == "lora":
        from idlab.lora import apply_lora, lora_deltas, save_adapter

        head = head_module_name(model)
        targets = list(run["target_modules"])
        target: Any = "all-linear" if targets == ["all-linear"] else targets
        kwargs: dict[str, Any] = {"modules_to_save": [head]} if head else {}
        torch.manual_seed(int(run["seed"]))
        peft_model = apply_lora(model, int(run["r"]), lora_alpha=float(run["lora_alpha"]), target_modules=target,
                                lora_dropout=float(run.get("lora_dropout", 0.0)),
                                use_rslora=bool(run.get("use_rslora", False)), **kwargs)
        def save_lora(d: Path) -> None:
            save_adapter(peft_model, d / "adapter")

        return Prepared(peft_model, total, {"head": "train" if head else "none", "head_module": head},
                        lambda: dict(lora_deltas(peft_model)), save_lora)
    if method == "subspace":
        from idlab.subspace import SubspaceModel

        head = head_module_name(model) if run.get("head", "train") == "train" else None
        linear = linear_weights(model)
        opts = {"cache_state": str(run["fastfood_state"])} if "fastfood_state" in run else None
        sm = SubspaceModel(model, int(run["d"]), projection=str(run["projection"]), said=bool(run["said"]),
                           seed=int(run["seed"]), exclude=[head] if head else None, train_excluded=bool(head),
                           projection_options=opts)

        def extract_sub() -> dict[str, Any]:
            return {m: dt for m, dt in sm.delta(by_module=True).items() if m in linear}

        def save_sub(d: Path) -> None:
            from safetensors.torch import save_file

            tensors = {n: p.detach().cpu().contiguous().clone() for n, p in sm.named_parameters() if p.requires_grad}
            save_file(tensors, str(d / "subspace.safetensors"), metadata={
                "d": str(run["d"]), "projection": str(run["projection"]), "said": str(bool(run["said"])),
                "seed": str(run["seed"]), "head": str(head)})

        mode = "train" if head else ("project" if run.get("head") == "project" else "none")
        return Prepared(sm, total, {"head": mode, "head_module": head}, extract_sub, save_sub)
    raise ValueError(f"unknown method {method!r}; allowed values: full, lora, subspace")


def environment() -> dict[str, Any]:
    """Host, versions and git commit recorded with every result."""
    from idlab.runs import git_commit, package_versions

    return {"versions": package_versions(), "git_commit": git_commit(), "hostname": platform.node(),
            "python": platform.python_version(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def execute_run(run: Mapping[str, Any], rid: str, study: str, device: str = "auto",
                progress: bool = False) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
    """Build, train and extract one run. Never raises.

    Returns:
        ``(result, write_artifacts)``: the result.json content (status ok | diverged | failed)
        and a function writing the artifacts (delta.safetensors, adapter/ or
        subspace.safetensors) into a folder, or None when there are none.
    """
    from idlab.training import TrainConfig, train

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result: dict[str, Any] = {"run_id": rid, "study": study, "config": dict(run), "started_at": started,
                              **environment()}
    try:
        task, model = build_task_and_model(run)
        prep = prepare(model, run)
        tr = dict(run["train"])
        cfg = TrainConfig(lr=float(run["lr"]), seed=int(run["seed"]), device=device, progress=progress,
                          **tr)
        res = train(prep.model, task, cfg, desc=f"{rid} {run['method']}")
        status = "diverged" if res.diverged else "ok"
        result.update({
            "status": status, "error": res.error, "metrics": res.metrics, "best": res.best, "curve": res.curve,
            "steps": res.steps, "trainable_parameters": res.trainable_parameters,
            "total_parameters": prep.total_parameters, "train_time_s": res.wall_time_s,
            "peak_memory_bytes": res.peak_memory_bytes, "device": res.device, "task_info": task.describe(),
            "metric": task.metric, "higher_is_better": task.higher_is_better, "method_info": prep.info,
            "converged": res.converged, "convergence": res.convergence,
        })
        writer: Callable[[Path], None] | None = None
        if status == "ok":
            deltas = prep.deltas()

            def writer(d: Path) -> None:
                from idlab.analysis.io import save_deltas

                prep.save(d)
                save_deltas(d / "delta.safetensors", deltas, metadata={"run_id": rid, "method": run["method"]})
    except Exception as e:  # a failed run is a result, the sweep goes on
        result.update({"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(), "metrics": {}, "best": {}, "curve": []})
        writer = None
    result["wall_time_s"] = time.perf_counter() - t0
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return result, writer


__all__ = ["Prepared", "build_task_and_model", "environment", "execute_run", "head_module_name",
           "linear_weights", "prepare"]
