"""The Task interface every training run goes through.

A Task owns its data and knows three things: how to cut a batch, the loss of a
model on a batch, and how to evaluate a model on its held-out split. The one
training loop (`idlab.training.loop.train`) needs nothing else, so full fine-tuning,
LoRA and subspace training of MLPs, CNNs and transformers share it.

Inputs are a Tensor (passed as ``model(x)``) or a dict of Tensors (passed as
``model(**x)``, the Hugging Face convention). A model's output may be a Tensor
of logits or an object with ``.logits`` (Hugging Face ``ModelOutput``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idlab.jsontypes import JsonObject

Inputs = Tensor | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]  # (inputs, targets)


def index_inputs(x: Inputs, idx: Tensor) -> Inputs:
    """Rows ``idx`` of a Tensor or of every Tensor in a dict.

    A tokenised dict with an ``attention_mask`` (n, T) is also cut to the columns its rows
    use: padding columns that every selected row masks out, on either side, are dropped
    (every (n, T) tensor of the dict alike). A split is padded to its longest example, so
    this makes a batch of short sentences cost what its own longest sentence costs; masked
    positions never change the outputs of the real tokens.
    """
    if not isinstance(x, dict):
        return x[idx]
    out = {k: v[idx] for k, v in x.items()}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[0] > 0:
        used = mask.bool().any(0).nonzero().flatten()  # columns some row attends to
        if len(used):
            lo, hi = int(used[0]), int(used[-1]) + 1
            if hi - lo < mask.shape[1]:
                shape = mask.shape
                out = {k: v[:, lo:hi] if v.dim() == 2 and v.shape == shape else v for k, v in out.items()}
    return out


def inputs_to(x: Inputs, device: torch.device | str) -> Inputs:
    """Move a Tensor or dict of Tensors to ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def num_rows(x: Inputs) -> int:
    """Number of examples (leading dimension) in a Tensor or dict of Tensors."""
    if isinstance(x, dict):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def call_model(model: nn.Module, x: Inputs) -> Tensor:
    """Run ``model`` on inputs and return its logits (Tensor or ``.logits``)."""
    out: Any = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(
            f"model returned {type(out).__name__}, which is neither a Tensor nor has .logits; "
            "wrap the model so that its forward returns logits"
        )
    return logits


class Task(ABC):
    """A training task: data splits, a loss and an evaluation.

    Attributes:
        name: short identifier recorded in results, e.g. ``"mnist"``, ``"glue/mrpc"``.
        metric: the key of ``evaluate()``'s dict that d90 / r90 are measured on.
        higher_is_better: whether a larger ``metric`` is better.
    """

    name: str = "task"
    metric: str = "accuracy"
    higher_is_better: bool = True

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Number of training examples."""

    @abstractmethod
    def train_batch(self, idx: Tensor) -> Batch:
        """The training examples at indices ``idx`` (a LongTensor on the CPU)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Scalar training loss of ``model`` on ``batch`` (already on the model's device)."""

    def loss_units(self, batch: Batch) -> int:
        """How many terms `loss` averages over on ``batch`` (default: its examples). A run on several
        processes weights each rank's mean by its share of the units, so that the averaged gradient is
        the global batch's mean (a per-token loss: the tokens)."""
        return len(batch[1])

    @abstractmethod
    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        """Metrics on the held-out split; must contain ``self.metric``. Runs under no_grad."""

    def describe(self) -> JsonObject:
        """A JSON-able description recorded with every result."""
        return {"name": self.name, "metric": self.metric, "num_train": self.num_train}

    def before_training(self, model: nn.Module) -> JsonObject:
        """Measurements of the model before its first step (the pretrained scores), kept by the loop
        (and in its checkpoints) and handed to `after_training`. Runs under no_grad. Default: none."""
        return {}

    def after_training(self, model: nn.Module, before: JsonObject) -> JsonObject:
        """The task's own record of a finished run (not diverged), given `before_training`'s: keys of
        ``result.json`` (e.g. ``exact_match``; `idlab.runs.RunResult`) and ``generations`` (rows written
        beside it). Runs under no_grad. Default: none."""
        return {}


def binary_f1(pred: Tensor, target: Tensor) -> float:
    """F1 of the positive class (label 1), the GLUE MRPC convention."""
    tp = int(((pred == 1) & (target == 1)).sum())
    fp = int(((pred == 1) & (target == 0)).sum())
    fn = int(((pred == 0) & (target == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


class ClassificationTask(Task):
    """Supervised classification held fully in memory.

    Args:
        x_train, y_train: training inputs (Tensor (N, ...) or dict of (N, ...)) and labels (N,).
        x_val, y_val: held-out inputs and labels (the split d90 is measured on).
        name: identifier for results.
        num_classes: number of labels (default: max label + 1).
        f1: also report binary F1 (MRPC).
    """

    metric = "accuracy"

    def __init__(
        self,
        x_train: Inputs,
        y_train: Tensor,
        x_val: Inputs,
        y_val: Tensor,
        name: str = "classification",
        num_classes: int | None = None,
        f1: bool = False,
    ) -> None:
        if num_rows(x_train) != len(y_train) or num_rows(x_val) != len(y_val):
            raise ValueError(
                f"task {name!r}: inputs and labels differ in length (train {num_rows(x_train)} vs "
                f"{len(y_train)}, val {num_rows(x_val)} vs {len(y_val)})"
            )
        if len(y_train) == 0 or len(y_val) == 0:
            raise ValueError(f"task {name!r}: empty split (train {len(y_train)}, val {len(y_val)})")
        self.x_train, self.y_train = x_train, y_train.long()
        self.x_val, self.y_val = x_val, y_val.long()
        self.name = name
        self.num_classes = num_classes or int(max(self.y_train.max(), self.y_val.max())) + 1
        self.f1 = f1

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    def train_batch(self, idx: Tensor) -> Batch:
        return index_inputs(self.x_train, idx), self.y_train[idx]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(call_model(model, x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device = next(model.parameters()).device
        preds, total_loss = [], 0.0
        n = len(self.y_val)
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            x = inputs_to(index_inputs(self.x_val, idx), device)
            y = self.y_val[idx].to(device)
            logits = call_model(model, x).float()
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
        pred = torch.cat(preds)
        out = {"accuracy": float((pred == self.y_val).float().mean()), "loss": total_loss / n}
        if self.f1:
            out["f1"] = binary_f1(pred, self.y_val)
        return out

    def describe(self) -> JsonObject:
        # majority_accuracy: dev accuracy of always predicting the most frequent training
        # class, the floor a model reaches without using its inputs
        majority = int(torch.bincount(self.y_train, minlength=self.num_classes).argmax())
        return {**super().describe(), "num_val": len(self.y_val), "num_classes": self.num_classes,
                "majority_accuracy": float((self.y_val == majority).float().mean())}
