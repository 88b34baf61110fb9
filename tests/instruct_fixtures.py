"""A tiny Llama folder with a word-level tokenizer and a chat template, and small prompt/response data,
for the instruction-task tests (tests/test_instruct*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idlab.models.tiny import tiny_llama

#: a ChatML-like template (the shape of SmolLM2's) over the tiny vocabulary
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["what", "is", "plus", "the", "answer", "####", "be", "brief", "Instruction", "Response", "###", ":", "?"]


def tokenizer(chat_template: bool = True) -> Any:
    """Word-level: <pad>=0, <s>=1, </s>=2 (EOS), <|im_start|>=3, <|im_end|>=4, words, numbers 0..99."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["user", "assistant", "system"]
                                        + [str(n) for n in range(100)])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>", bos_token="<s>",
                                  pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tok.chat_template = TEMPLATE
    return tok


def llama_dir(folder: Path, chat_template: bool = True) -> Path:
    """A tiny Llama (vocabulary 128) and `tokenizer` saved into ``folder`` (a model name for load_model)."""
    tok = tokenizer(chat_template)
    assert len(tok) <= 128
    tiny_llama(seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_data(folder: Path, n_train: int = 24, n_test: int = 8, fields: tuple[str, str] = ("prompt", "response"),
               ) -> Path:
    """``train.jsonl`` / ``test.jsonl`` of "what is a plus b ?" -> "the answer is c #### c"."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 50)):
        rows = [{fields[0]: f"what is {(i + off) % 40} plus {i % 7} ?",
                 fields[1]: f"the answer is {(i + off) % 40 + i % 7} #### {(i + off) % 40 + i % 7}"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
