"""Causal-LM fine-tuning on a text corpus cut into fixed-length blocks (`LMTask`, `text_corpus_task`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idlab.data.base import Batch, Task, call_model
from idlab.jsontypes import JsonObject

LMMetric = Literal["neg_loss", "loss", "perplexity"]


class LMTask(Task):
    """Causal-LM fine-tuning on fixed-length token blocks.

    Each example is a block of ``block_size`` token ids; the model predicts token t+1
    from tokens <= t. Loss = mean token negative log-likelihood over the block's
    block_size - 1 predictions: L = -(1/(N(T-1))) sum_{n,t} log p(x_{n,t+1} | x_{n,<=t}).

    ``evaluate`` returns ``loss`` (mean token NLL over all validation blocks, nats),
    ``perplexity`` = exp(loss) and ``neg_loss`` = -loss. The tracked ``metric`` is
    ``neg_loss`` by default (higher is better, so "best" and d90-style thresholds read
    the same way as accuracy); choose ``metric="perplexity"`` or ``"loss"`` for a
    lower-is-better metric (``higher_is_better`` follows).

    Args:
        train_blocks, val_blocks: LongTensors (N, block_size).
        name: identifier for results.
        metric: which evaluation key is tracked.
        eval_tokens_per_forward: cap on tokens per evaluation forward pass (logits are
            (B, T, vocab) floats: 2,048 tokens x 49,152 vocab = 400 MB in float32).
    """

    def __init__(
        self,
        train_blocks: Tensor,
        val_blocks: Tensor,
        name: str = "lm",
        metric: LMMetric = "neg_loss",
        eval_tokens_per_forward: int = 2048,
    ) -> None:
        for what, b in (("train_blocks", train_blocks), ("val_blocks", val_blocks)):
            if b.ndim != 2 or b.shape[0] == 0 or b.shape[1] < 2:
                raise ValueError(f"LMTask {name!r}: {what} must be (N >= 1, block_size >= 2), got {tuple(b.shape)}")
        if metric not in ("neg_loss", "loss", "perplexity"):
            raise ValueError(f"LMTask: metric={metric!r}; use 'neg_loss', 'loss' or 'perplexity'")
        self.train_blocks, self.val_blocks = train_blocks.long(), val_blocks.long()
        self.name = name
        self.metric = metric
        self.higher_is_better = metric == "neg_loss"
        self.eval_tokens_per_forward = eval_tokens_per_forward

    @property
    def block_size(self) -> int:
        return int(self.train_blocks.shape[1])

    @property
    def num_train(self) -> int:
        return int(self.train_blocks.shape[0])

    def train_batch(self, idx: Tensor) -> Batch:
        ids = self.train_blocks[idx]
        return {"input_ids": ids}, ids

    @staticmethod
    def _nll_sum(logits: Tensor, ids: Tensor) -> Tensor:
        """Summed NLL of ids[:, 1:] under logits[:, :-1]; logits (B, T, V), ids (B, T).

        The targets are shifted instead of the logits (last position ignored), so the
        (B, T, V) logits are never copied.
        """
        v = logits.shape[-1]
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)  # (B, T), -100 = ignored
        return F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, ids = batch
        logits = call_model(model, x)
        return self._nll_sum(logits, ids) / (ids.shape[0] * (ids.shape[1] - 1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device = next(model.parameters()).device
        micro = max(1, min(batch_size, self.eval_tokens_per_forward // self.block_size))
        total, count = 0.0, 0
        n = self.val_blocks.shape[0]
        for s in range(0, n, micro):
            ids = self.val_blocks[s : s + micro].to(device)
            total += float(self._nll_sum(call_model(model, {"input_ids": ids}), ids))
            count += ids.shape[0] * (ids.shape[1] - 1)
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "neg_loss": -loss}

    def describe(self) -> JsonObject:
        return {**super().describe(), "num_val": int(self.val_blocks.shape[0]), "block_size": self.block_size}


def pydoc_corpus() -> list[str]:
    """The Python language reference topics shipped with CPython (``pydoc_data.topics``).

    79 documents, ~465,000 characters of real English technical prose (Python 3.11),
    present in every standard CPython install and so always available offline,
    stable for a given Python version, and freely licensed (PSF). Sorted by topic.
    """
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def text_corpus_task(
    tokenizer: Any,
    source: str | Path | Sequence[str] = "pydoc",
    block_size: int = 128,
    val_fraction: float = 0.1,
    max_blocks: int | None = None,
    seed: int = 0,
    metric: LMMetric = "neg_loss",
) -> LMTask:
    """An `LMTask` from a text corpus cut into non-overlapping ``block_size`` token blocks.

    Documents are tokenised one by one (no special tokens), joined with the EOS token,
    concatenated and cut into blocks (the remainder is dropped). The blocks are
    shuffled by ``seed``; the first ``max_blocks`` (all if None) are kept, of which a
    ``val_fraction`` share (at least 1) is the validation split. Blocks never overlap,
    so no token appears in both splits.

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: ``"pydoc"`` (default: `pydoc_corpus`, the Python reference shipped with
            CPython -- real prose available offline), a path to a UTF-8 text file (one
            document), or a sequence of document strings.
        block_size: tokens per example.
        val_fraction: share of blocks held out, in (0, 1).
        max_blocks: cap on blocks kept (train + validation).
        seed: shuffling seed.
        metric: tracked metric (see `LMTask`).
    """
    if block_size < 2:
        raise ValueError(f"text_corpus_task: block_size must be >= 2, got {block_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"text_corpus_task: val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(source, str) and source == "pydoc":
        docs, name = pydoc_corpus(), "lm/pydoc"
    elif isinstance(source, (str, Path)):
        p = Path(source).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"text_corpus_task: source {str(source)!r} is neither 'pydoc' nor a text file")
        docs, name = [p.read_text(encoding="utf-8")], f"lm/{p.stem}"
    else:
        docs, name = list(source), "lm/custom"
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    n_blocks = len(ids) // block_size
    if n_blocks < 2:
        raise ValueError(f"text_corpus_task: corpus has {len(ids)} tokens, fewer than 2 blocks of {block_size}")
    blocks = torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    if max_blocks is not None:
        if max_blocks < 2:
            raise ValueError(f"text_corpus_task: max_blocks must be >= 2 or None, got {max_blocks}")
        perm = perm[:max_blocks]
    n_val = max(1, round(val_fraction * len(perm)))
    if n_val >= len(perm):
        raise ValueError(f"text_corpus_task: {len(perm)} blocks leave nothing to train on with val_fraction={val_fraction}")
    return LMTask(blocks[perm[n_val:]], blocks[perm[:n_val]], name=name, metric=metric)


__all__ = ["LMTask", "pydoc_corpus", "text_corpus_task"]
