"""Text tasks: GLUE classification (SST-2, MRPC, RTE, CoLA) and causal-LM fine-tuning.

GLUE comes from Hugging Face ``datasets`` by name (``nyu-mll/glue``; the optional extra
``idlab[hub]``) or, offline, from a folder in the standard GLUE tsv layout
(``<dir>/MRPC/train.tsv`` ...). Each task is pre-tokenised into a
`ClassificationTask` whose inputs are dicts of padded LongTensors (``input_ids``,
``attention_mask``, and ``token_type_ids`` when the tokenizer produces them, as
BERT's does). Every split is padded to its longest example, capped at ``max_length``.

`LMTask` fine-tunes a causal LM on a text corpus cut into fixed-length blocks.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idlab.data.base import Batch, ClassificationTask, Task, call_model

# --------------------------------------------------------------------------------------
# GLUE
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task lives: tsv folder, Hugging Face config and columns, metric."""

    folder: str  # folder in the GLUE tsv layout
    hf_config: str  # config of the ``nyu-mll/glue`` dataset
    text_a: str  # column of the first sentence (Hugging Face names)
    text_b: str | None  # column of the second sentence, if a pair task
    f1: bool  # report binary F1 too (MRPC)


GLUE_TASKS: dict[str, GlueSpec] = {
    "sst2": GlueSpec("SST-2", "sst2", "sentence", None, False),
    "mrpc": GlueSpec("MRPC", "mrpc", "sentence1", "sentence2", True),
    "rte": GlueSpec("RTE", "rte", "sentence1", "sentence2", False),
    "cola": GlueSpec("CoLA", "cola", "sentence", None, False),
}

#: Joins the two sentences of a pair for tokenizers without a separator token (decoders).
PAIR_SEPARATOR = "\n"

#: RTE's string labels, numbered as in Hugging Face ``glue/rte`` (0 = entailment).
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@dataclass
class GlueSplit:
    """Raw examples of one split: first sentences, second sentences (pair tasks) and labels."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> GlueSplit:
        return GlueSplit(
            [self.text_a[i] for i in idx],
            None if self.text_b is None else [self.text_b[i] for i in idx],
            [self.labels[i] for i in idx],
        )


def glue_spec(name: str) -> tuple[str, GlueSpec]:
    """Canonical key (``sst2``, ``mrpc``, ``rte``, ``cola``) and spec of a GLUE task name.

    Accepts ``"SST-2"``, ``"sst2"``, ``"glue/mrpc"`` etc., case-insensitively.
    """
    key = name.lower().removeprefix("glue/").replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"glue_task: unknown GLUE task {name!r}; supported: "
                         f"{', '.join(s.folder for s in GLUE_TASKS.values())}")
    return key, GLUE_TASKS[key]


def _read_tsv(path: Path, header: bool = True) -> tuple[list[str], list[list[str]]]:
    """Rows of a GLUE tsv (UTF-8, optional BOM, no quoting) as (header, rows)."""
    if not path.exists():
        raise FileNotFoundError(f"GLUE file {str(path)!r} is missing; pass data_dir= the folder "
                                "holding SST-2/, MRPC/, RTE/, CoLA/ in the GLUE tsv layout")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if header:
        return rows[0], rows[1:]
    return [], rows


def _columns(path: Path, head: list[str], rows: list[list[str]], names: Sequence[str]) -> list[list[str]]:
    try:
        cols = [head.index(n) for n in names]
    except ValueError:
        raise ValueError(f"{str(path)!r}: expected columns {list(names)}, found header {head}") from None
    out = []
    for lineno, r in enumerate(rows, start=2):
        if len(r) < len(head):
            raise ValueError(f"{str(path)!r} line {lineno}: {len(r)} fields, header has {len(head)}")
        out.append([r[c] for c in cols])
    return out


def _mrpc_train_from_msr(folder: Path) -> GlueSplit | None:
    """The standard 3,668-pair MRPC train split: msr_paraphrase_train.txt minus dev_ids.tsv."""
    msr, dev_ids = folder / "msr_paraphrase_train.txt", folder / "dev_ids.tsv"
    if not (msr.exists() and dev_ids.exists()):
        return None
    _, id_rows = _read_tsv(dev_ids, header=False)
    dev = {(r[0].strip(), r[1].strip()) for r in id_rows}
    head, rows = _read_tsv(msr)
    cols = _columns(msr, head, rows, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"])
    keep = [c for c in cols if (c[1], c[2]) not in dev]
    return GlueSplit([c[3] for c in keep], [c[4] for c in keep], [int(c[0]) for c in keep])


def _read_glue_dir(key: str, spec: GlueSpec, data_dir: Path, split: str) -> GlueSplit:
    folder = data_dir / spec.folder if (data_dir / spec.folder).is_dir() else data_dir
    fname = {"train": "train.tsv", "validation": "dev.tsv"}[split]
    path = folder / fname
    if key == "mrpc":
        if split == "train":
            rebuilt = _mrpc_train_from_msr(folder)
            if rebuilt is not None:
                return rebuilt
        head, rows = _read_tsv(path)
        c = _columns(path, head, rows, ["Quality", "#1 String", "#2 String"])
        return GlueSplit([r[1] for r in c], [r[2] for r in c], [int(r[0]) for r in c])
    if key == "sst2":
        head, rows = _read_tsv(path)
        c = _columns(path, head, rows, ["sentence", "label"])
        return GlueSplit([r[0].strip() for r in c], None, [int(r[1]) for r in c])
    if key == "rte":
        head, rows = _read_tsv(path)
        c = _columns(path, head, rows, ["sentence1", "sentence2", "label"])
        bad = {r[2] for r in c} - set(RTE_LABELS)
        if bad:
            raise ValueError(f"{str(path)!r}: unexpected RTE labels {sorted(bad)}; expected {list(RTE_LABELS)}")
        return GlueSplit([r[0] for r in c], [r[1] for r in c], [RTE_LABELS[r[2]] for r in c])
    # CoLA: no header; columns source, label, original label (or blank), sentence
    _, rows = _read_tsv(path, header=False)
    for lineno, r in enumerate(rows, start=1):
        if len(r) != 4:
            raise ValueError(f"{str(path)!r} line {lineno}: CoLA rows have 4 fields, got {len(r)}")
    return GlueSplit([r[3] for r in rows], None, [int(r[1]) for r in rows])


def _read_glue_hub(spec: GlueSpec, split: str) -> GlueSplit:
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(
            "glue_task without data_dir loads GLUE with Hugging Face `datasets`, which is not "
            "installed; `pip install 'idlab[hub]'`, or pass data_dir= a folder in the GLUE tsv layout"
        ) from None
    ds = load_dataset("nyu-mll/glue", spec.hf_config, split=split)
    return GlueSplit(
        list(ds[spec.text_a]),
        None if spec.text_b is None else list(ds[spec.text_b]),
        [int(v) for v in ds["label"]],
    )


def load_glue_split(name: str, split: Literal["train", "validation"], data_dir: str | Path | None = None) -> GlueSplit:
    """The raw examples of GLUE task ``name``'s ``split`` (``validation`` = GLUE dev).

    From ``data_dir`` (GLUE tsv layout: the GLUE root holding ``MRPC/`` etc., or the
    task's own folder) or, when ``data_dir`` is None, from Hugging Face ``datasets``.

    Labels follow Hugging Face's ``glue`` numbering: SST-2 1 = positive, MRPC 1 =
    paraphrase, RTE 0 = entailment / 1 = not_entailment, CoLA 1 = acceptable.
    MRPC's train split is rebuilt from ``msr_paraphrase_train.txt`` minus
    ``dev_ids.tsv`` when both are present (the standard 3,668 pairs; some copies of
    ``train.tsv`` lack a row), else read from ``train.tsv``.
    """
    key, spec = glue_spec(name)
    if split not in ("train", "validation"):
        raise ValueError(f"load_glue_split: split={split!r}; use 'train' or 'validation' (GLUE dev)")
    if data_dir is None:
        return _read_glue_hub(spec, split)
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"glue_task: data_dir {str(d)!r} is not a folder")
    return _read_glue_dir(key, spec, d, split)


def _subset_indices(n: int, k: int | None, seed: int) -> list[int] | None:
    if k is None or k >= n:
        return None
    if k <= 0:
        raise ValueError(f"glue_task: max_train / max_val must be >= 1 or None, got {k}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(perm.tolist())


def tokenize_pairs(
    tokenizer: Any, text_a: list[str], text_b: list[str] | None, max_length: int
) -> dict[str, Tensor]:
    """Tokenise (pairs of) sentences, pad to the longest (at most ``max_length``).

    Pairs use the tokenizer's own pair encoding when it has a separator token (BERT:
    ``[CLS] a [SEP] b [SEP]``, RoBERTa alike); decoder tokenizers without one (Llama,
    SmolLM2) would glue the two texts together, so there each pair is encoded as the
    single text ``a + PAIR_SEPARATOR + b`` (a newline).

    Returns LongTensors (N, L): ``input_ids``, ``attention_mask`` and, if the tokenizer
    makes them (BERT), ``token_type_ids``.
    """
    if tokenizer.pad_token is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (load_model does: EOS for Llama)")
    if text_b is not None and getattr(tokenizer, "sep_token", None) is None:
        text_a, text_b = [a + PAIR_SEPARATOR + b for a, b in zip(text_a, text_b)], None
    enc = tokenizer(
        text_a, text_b, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
    )
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return {k: enc[k].long() for k in keys}


def glue_task(
    name: str,
    tokenizer: Any,
    data_dir: str | Path | None = None,
    max_length: int = 128,
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> ClassificationTask:
    """A GLUE classification task (SST-2, MRPC, RTE, CoLA), pre-tokenised.

    Args:
        name: ``"sst2"``/``"SST-2"``, ``"mrpc"``, ``"rte"``, ``"cola"`` (``glue/`` prefix ok).
        tokenizer: a Hugging Face tokenizer with a pad token (`idlab.models.load_model`'s).
            Pair tasks (MRPC, RTE) use its pair encoding, or for decoder tokenizers with
            no separator token ``sentence1 + "\\n" + sentence2`` (see `tokenize_pairs`).
        data_dir: folder in the GLUE tsv layout; None loads ``nyu-mll/glue`` with ``datasets``.
        max_length: truncation length; each split is padded to its longest example.
        max_train, max_val: keep a random subset of that many examples, chosen by
            ``seed`` (deterministic; indices kept in file order).
        seed: seed of the subsets.

    Returns:
        ``ClassificationTask`` named ``glue/<key>`` with dict inputs of shape (N, L);
        metric accuracy (GLUE dev), MRPC also binary F1; 2 classes.
    """
    key, spec = glue_spec(name)
    if max_length < 2:
        raise ValueError(f"glue_task: max_length must be >= 2, got {max_length}")
    train = load_glue_split(key, "train", data_dir)
    val = load_glue_split(key, "validation", data_dir)
    ti = _subset_indices(len(train), max_train, seed)
    vi = _subset_indices(len(val), max_val, seed + 1)
    if ti is not None:
        train = train.subset(ti)
    if vi is not None:
        val = val.subset(vi)
    x_train = tokenize_pairs(tokenizer, train.text_a, train.text_b, max_length)
    x_val = tokenize_pairs(tokenizer, val.text_a, val.text_b, max_length)
    return ClassificationTask(
        x_train,
        torch.tensor(train.labels),
        x_val,
        torch.tensor(val.labels),
        name=f"glue/{key}",
        num_classes=2,
        f1=spec.f1,
    )


# --------------------------------------------------------------------------------------
# Causal language modelling
# --------------------------------------------------------------------------------------

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

    def describe(self) -> dict[str, Any]:
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


__all__ = [
    "GLUE_TASKS",
    "PAIR_SEPARATOR",
    "GlueSplit",
    "LMTask",
    "glue_spec",
    "glue_task",
    "load_glue_split",
    "pydoc_corpus",
    "text_corpus_task",
    "tokenize_pairs",
]
