"""Small random Hugging Face models for tests (`tiny_llama`, `tiny_bert`).
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    num_labels: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """A tiny random Llama (same module names as Llama-2: ``q_proj`` ... ``down_proj``) for tests.

    Returns ``LlamaForCausalLM``, or ``LlamaForSequenceClassification`` with a ``score``
    head of ``num_labels`` outputs (pad_token_id 0) when ``num_labels`` is given.
    Deterministic in ``seed``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    if num_labels is None:
        return LlamaForCausalLM(cfg).eval()
    cfg.num_labels = num_labels
    return LlamaForSequenceClassification(cfg).eval()


def tiny_bert(
    vocab_size: int = 128,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 64,
    num_labels: int = 2,
    seed: int = 0,
) -> nn.Module:
    """A tiny random ``BertForSequenceClassification`` (head ``classifier``) for tests."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
    )
    cfg.num_labels = num_labels
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()
