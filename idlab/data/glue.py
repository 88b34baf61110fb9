"""GLUE classification (SST-2, MRPC, RTE, CoLA, ...).

GLUE comes from Hugging Face ``datasets`` by name (``nyu-mll/glue``; the optional extra
``idlab[hub]``) or, offline, from a folder in the standard GLUE tsv layout
(``<dir>/MRPC/train.tsv`` ...). Each task is pre-tokenised into a
`ClassificationTask` whose inputs are dicts of padded LongTensors (``input_ids``,
``attention_mask``, and ``token_type_ids`` when the tokenizer produces them, as
BERT's does). Every split is padded to its longest example, capped at ``max_length``.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from idlab.data.base import ClassificationTask


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


#: environment variable naming the offline GLUE tsv folder (used when no data_dir is given)
GLUE_DIR_ENV = "IDLAB_GLUE_DIR"


def glue_data_dir(data_dir: str | Path | None = None) -> tuple[Path | None, str]:
    """THE rule for where GLUE comes from: ``(folder, source)``.

    ``data_dir`` when given, else ``$IDLAB_GLUE_DIR`` when set (``source`` says which), else
    ``(None, "datasets")``: Hugging Face ``datasets``. The library API (`glue_task`,
    `load_glue_split`) and the sweep (a study's ``task.data_dir``) both resolve through it.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "data_dir"
    env = os.environ.get(GLUE_DIR_ENV)
    if env:
        return Path(env).expanduser(), f"${GLUE_DIR_ENV}"
    return None, "datasets"


def load_glue_split(name: str, split: Literal["train", "validation"], data_dir: str | Path | None = None) -> GlueSplit:
    """The raw examples of GLUE task ``name``'s ``split`` (``validation`` = GLUE dev).

    From ``data_dir`` (GLUE tsv layout: the GLUE root holding ``MRPC/`` etc., or the
    task's own folder), else ``$IDLAB_GLUE_DIR``, else Hugging Face ``datasets``
    (`glue_data_dir`).

    Labels follow Hugging Face's ``glue`` numbering: SST-2 1 = positive, MRPC 1 =
    paraphrase, RTE 0 = entailment / 1 = not_entailment, CoLA 1 = acceptable.
    MRPC's train split is rebuilt from ``msr_paraphrase_train.txt`` minus
    ``dev_ids.tsv`` when both are present (the standard 3,668 pairs; some copies of
    ``train.tsv`` lack a row), else read from ``train.tsv``.
    """
    key, spec = glue_spec(name)
    if split not in ("train", "validation"):
        raise ValueError(f"load_glue_split: split={split!r}; use 'train' or 'validation' (GLUE dev)")
    d, source = glue_data_dir(data_dir)
    if d is None:
        return _read_glue_hub(spec, split)
    if not d.is_dir():
        raise FileNotFoundError(f"glue_task: {source} {str(d)!r} is not a folder")
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
        data_dir: folder in the GLUE tsv layout; None: ``$IDLAB_GLUE_DIR`` when set, else
            ``nyu-mll/glue`` with ``datasets`` (`glue_data_dir`).
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
