"""Generative evaluation: batched greedy decoding, answer extraction, exact match.

`greedy_generate` decodes any causal LM (a Hugging Face model, a PEFT model, a `SubspaceModel`:
it only calls the module's forward with a KV cache) on left-padded prompt batches, one token per
step, until every row has produced an EOS id or ``max_new_tokens``. `extract_answer` reads the
answer out of a text (`EXTRACTORS`): ``gsm8k`` the number after ``####``, else the last number;
``last_number`` the last number; ``text`` the whole text, stripped. Numbers are normalised
(``$`` and thousands commas dropped, ``12.0`` -> ``12``) so ``#### 1,234`` and ``1234`` match.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

Extractor = Literal["gsm8k", "last_number", "text"]
EXTRACTORS: tuple[Extractor, ...] = ("gsm8k", "last_number", "text")
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY = re.compile(_NUMBER)


def normalise_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"12.0"`` -> ``"12"``; None for a text that is not a number."""
    s = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v.is_integer() and abs(v) < 1e18 else repr(v)


def extract_answer(text: str, kind: Extractor) -> str | None:
    """The answer in ``text`` by extractor ``kind`` (module docstring); None when it finds none."""
    if kind == "text":
        s = text.strip()
        return s or None
    if kind not in EXTRACTORS:
        raise ValueError(f"extractor {kind!r} is unknown; use {', '.join(EXTRACTORS)}")
    if kind == "gsm8k":
        m = _FINAL.search(text)
        if m is not None:
            return normalise_number(m.group(1))
    found = _ANY.findall(text)
    return normalise_number(found[-1]) if found else None


def exact_match(pred: str | None, gold: str | None) -> bool:
    """Both answers were found and are equal (after `extract_answer`'s normalisation)."""
    return pred is not None and gold is not None and pred == gold


def _forward(model: nn.Module, past: tuple[str, object] | None, **kw: object) -> tuple[Tensor, tuple[str, object]]:
    """(last position's logits (B, V), (keyword, KV cache)): transformers >= 5.2x names the cache ``cache``,
    earlier ones ``past_key_values``; the keyword the output used is the one passed back."""
    if past is not None:
        kw[past[0]] = past[1]
    out = model(**kw, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1], ("cache", cache) if cache is not None else ("past_key_values", out.past_key_values)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int, eos_ids: Collection[int],
                    max_new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of token-id prompts (the new ids only, the first EOS included).

    Prompts are sorted by length and cut into batches of ``batch_size`` (left padding, explicit
    position ids so each row's positions start at 0); each batch runs one forward over the prompts and
    then one per new token with the model's KV cache, and stops once every row has emitted an id in
    ``eos_ids`` or after ``max_new_tokens``.

    Returns:
        one list of new ids per prompt, in the order of ``prompts``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"greedy_generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):  # left padding: the prompt ends at the last column
            p = list(prompts[i])
            ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p, dtype=torch.long), 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, past = _forward(model, None, input_ids=ids, attention_mask=mask, position_ids=pos)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new: list[Tensor] = []
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            new.append(nxt)
            done = done | torch.isin(nxt, eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            logits, past = _forward(model, past, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos)
        gen = torch.stack(new, dim=1).cpu()  # (B, steps)
        for j, i in enumerate(rows):
            seq = gen[j].tolist()
            hit = [k for k, t in enumerate(seq) if t in set(eos_ids)]
            out[i] = seq[: hit[0] + 1] if hit else seq
    return out


__all__ = ["EXTRACTORS", "Extractor", "exact_match", "extract_answer", "greedy_generate", "normalise_number"]
