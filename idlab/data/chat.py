"""Prompt/response examples as token ids with the loss on the response only.

`render` turns one example into ``(prompt text, response text)`` with the tokenizer's own chat
template (``tokenizer.apply_chat_template``: the system and user turns, then the generation prompt;
the response text is what the template adds for the assistant turn, its end-of-turn tokens included)
or, where the tokenizer has none (or ``chat_template: plain``), `PLAIN_PROMPT` with the EOS token
after the response. `encode` tokenises prompts and responses apart and joins them, so the prompt's
tokens are exactly the first ``n_prompt`` ids whatever the tokenizer merges at the boundary, and
labels them -100 (ignored by the loss). `pad_examples` and `pack_examples` make the (N, T) tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

TemplateMode = Literal["auto", "model", "plain"]
#: a template as resolved: the tokenizer's own or the plain one
Template = Literal["model", "plain"]
TEMPLATE_MODES: tuple[TemplateMode, ...] = ("auto", "model", "plain")
#: the label of a position the loss ignores (prompt tokens, padding)
IGNORE = -100
#: prompt layout for a tokenizer without a chat template (``{system}`` block only when given)
PLAIN_SYSTEM = "{system}\n\n"
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


class Tokenizer(Protocol):
    """What the instruction tasks use of a Hugging Face tokenizer (``chat_template`` is read with getattr)."""

    eos_token: str | None
    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: list[str], *, add_special_tokens: bool = ...) -> Mapping[str, list[list[int]]]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = ...,
                            tokenize: bool = ...) -> str: ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


class ChatTemplateError(ValueError):
    """``chat_template: model`` with a tokenizer that has no chat template."""


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """The tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer: Tokenizer, mode: TemplateMode) -> Template:
    """``model`` or ``plain``: ``auto`` is the model's template where it has one.

    Raises:
        ChatTemplateError: ``mode == "model"`` and the tokenizer has no chat template.
    """
    if mode not in TEMPLATE_MODES:
        raise ValueError(f"chat_template={mode!r}; use {', '.join(TEMPLATE_MODES)}")
    if mode == "plain" or (mode == "auto" and not has_chat_template(tokenizer)):
        return "plain"
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ChatTemplateError(f"chat_template: model was asked for, but the tokenizer of {name!r} has no chat "
                                "template; set task.chat_template=auto (the plain template where there is none) "
                                "or plain, or use a model whose tokenizer has one (an Instruct / chat model)")
    return "model"


def render(tokenizer: Tokenizer, prompt: str, response: str | None, system: str | None = None,
           template: Template = "model") -> tuple[str, str]:
    """``(prompt text, response text)`` of one example (module docstring); ``response`` None: ``""``.

    With the model's template the prompt text ends with the generation prompt (``<|im_start|>assistant\\n``
    for SmolLM2) and the response text is the rest of the rendered conversation (``4<|im_end|>\\n``).
    """
    if template == "plain":
        head = (PLAIN_SYSTEM.format(system=system) if system else "") + PLAIN_PROMPT.format(prompt=prompt)
        return head, "" if response is None else response + (tokenizer.eos_token or "")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if response is None:
        return head, ""
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the conversation without its generation prompt as a prefix; "
                         "use task.chat_template=plain for this model")
    return head, full[len(head):]


def encode(tokenizer: Tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
           template: Template) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids and labels of each example, truncated to ``max_length`` tokens.

    Prompts are tokenised with the tokenizer's special tokens for the plain template (its BOS where it
    adds one) and without them for a chat template (which writes its own); responses never add any.

    Returns:
        ``(ids, labels, dropped)``: per kept example ids (T_i <= max_length) and labels (ids with the
        prompt's positions set to `IGNORE`); ``dropped`` counts examples whose prompt leaves no
        response token within ``max_length`` (they are left out).
    """
    p_ids = tokenizer(list(prompts), add_special_tokens=template == "plain")["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    ids, labels, dropped = [], [], 0
    for p, r in zip(p_ids, r_ids):
        seq = (list(p) + list(r))[:max_length]
        if len(p) >= len(seq):
            dropped += 1
            continue
        ids.append(seq)
        labels.append([IGNORE] * len(p) + seq[len(p):])
    return ids, labels, dropped


def pad_examples(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded LongTensors (N, T), T the longest example: input_ids, attention_mask, labels."""
    n, t = len(ids), max(len(s) for s in ids)
    out = {"input_ids": torch.full((n, t), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(n, t, dtype=torch.long), "labels": torch.full((n, t), IGNORE, dtype=torch.long)}
    for i, (s, lab) in enumerate(zip(ids, labels)):
        out["input_ids"][i, : len(s)] = torch.tensor(s)
        out["attention_mask"][i, : len(s)] = 1
        out["labels"][i, : len(s)] = torch.tensor(lab)
    return out


def pack_examples(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], block: int,
                  pad_id: int) -> dict[str, Tensor]:
    """Examples concatenated in order and cut into blocks of ``block`` tokens: (N, block) tensors.

    Every label keeps its value (prompt tokens stay `IGNORE`); attention spans the whole block (an
    example may attend to the one before it, the usual packing). The last block is padded (mask 0,
    label `IGNORE`).
    """
    flat_ids = [t for s in ids for t in s]
    flat_lab = [t for s in labels for t in s]
    n = -(-len(flat_ids) // block)
    pad = n * block - len(flat_ids)
    return {"input_ids": torch.tensor(flat_ids + [pad_id] * pad).view(n, block),
            "attention_mask": torch.tensor([1] * len(flat_ids) + [0] * pad).view(n, block),
            "labels": torch.tensor(flat_lab + [IGNORE] * pad).view(n, block)}


__all__ = ["IGNORE", "PLAIN_PROMPT", "TEMPLATE_MODES", "ChatTemplateError", "Template", "TemplateMode", "Tokenizer",
           "encode",
           "has_chat_template", "pack_examples", "pad_examples", "render", "resolve_template"]
