"""Instruction tuning: prompt/response data, loss on the response tokens only (`InstructTask`,
`instruct_task`), generative evaluation at the end of a run, and forgetting.

A task is a preset (``gsm8k``) or ``instruct/<source>`` (`idlab.data.instruct_source`: a Hugging Face
dataset name, a local .jsonl/.json/.parquet file or folder) with a field mapping. Each example is
rendered with the tokenizer's chat template (`idlab.data.chat`), tokenised, its prompt tokens
labelled -100, optionally packed, and the tokenised set cached by content hash (`idlab.data.cache`).

The response loss is ``loss``, the mean negative log-likelihood per response token on the eval split
(nats, lower is better); the tracked metric is ``neg_loss`` = -loss, higher is better, as for the corpus
task (`idlab.data.corpus.LMTask`), so "best" and the crossing rules read it like an accuracy
(``target.rule: improvement`` for a fraction of full fine-tuning's gain over the pretrained model;
``perplexity`` beside it). Around training, the loop
calls `InstructTask.before_training` and `InstructTask.after_training`, which add to the run's row:

- ``exact_match`` (and ``exact_match_before``, the pretrained model's): greedy generation
  (`idlab.data.generate`) on a fixed, seeded subset of ``generate_subset`` eval prompts, answers
  extracted by the task's extractor and compared with the gold answers; the texts go to
  ``generations.jsonl`` beside result.json (`GENERATIONS_FILE`);
- ``general_loss_before`` / ``general_loss_after``: next-token loss on held-out blocks of a general
  corpus (``forgetting_corpus``, the pydoc corpus by default), the forgetting measure.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idlab.data import chat
from idlab.data.base import Batch, Task, call_model, index_inputs
from idlab.data.cache import cached_tensors, content_hash, tokenizer_fingerprint
from idlab.data.corpus import LMTask, text_corpus_task
from idlab.data.generate import Extractor, exact_match, extract_answer, greedy_generate
from idlab.data.instruct_source import PRESETS, InstructDataError, load_split, task_source
from idlab.jsontypes import JsonObject, JsonValue

#: the generated texts of a run, one JSON object per line, beside result.json
GENERATIONS_FILE = "generations.jsonl"
#: tokens per block of the forgetting corpus
FORGETTING_BLOCK = 128


@dataclass(frozen=True)
class InstructOptions:
    """The options of an instruction task (the ``task:`` keys of a study file, same names)."""

    data_dir: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    prompt_field: str | None = None
    response_field: str | None = None
    system_field: str | None = None
    format: str = "fields"
    chat_template: chat.TemplateMode = "auto"
    packing: bool = False
    extractor: Extractor | None = None
    generate_subset: int = 0
    max_new_tokens: int = 256
    generate_batch_size: int = 16
    generate_every: int = 0
    generate_before: bool = True
    generate_seed: int = 0
    forgetting_corpus: str | None = "pydoc"
    forgetting_blocks: int = 32


@dataclass
class InstructData:
    """The raw records of a task as configured: both splits (mapped fields only) and what was resolved."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    prompt: str
    response: str
    system: str | None
    extractor: Extractor
    source: str
    how: str


def _subset(n: int, k: int | None, seed: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def load_instruct_data(name: str, opts: InstructOptions, max_train: int | None = None,
                       max_val: int | None = None) -> InstructData:
    """Both splits of task ``name`` restricted to ``max_train`` / ``max_val`` (seeded, seed 0), checked.

    Raises:
        InstructDataError: a missing split or field (`load_split`), an extractor that finds no answer
            in any gold response of the eval split, or a generation subset larger than the eval split.
    """
    preset = PRESETS.get(name)
    source, hub_config, how = task_source(name, opts.data_dir)
    config = opts.dataset_config or hub_config
    if opts.format != "fields" and (opts.prompt_field or opts.response_field or opts.system_field):
        raise InstructDataError("task.format", f"got {opts.format!r}, whose records name their own parts; drop "
                                "task.prompt_field / response_field / system_field (or use task.format=fields)")
    named = opts.format != "fields"
    prompt = "prompt" if named else opts.prompt_field or (preset.prompt_field if preset else "prompt")
    response = "response" if named else opts.response_field or (preset.response_field if preset else "response")
    system = "system" if named else opts.system_field
    extractor: Extractor = opts.extractor or (preset.extractor if preset else "text")  # type: ignore[assignment]
    fields = [("task.prompt_field", prompt), ("task.response_field", response)]
    if system:
        fields.append(("task.system_field", system))
    train = load_split(source, opts.train_split, config, fields, "task.train_split", opts.format)
    ev = load_split(source, opts.eval_split, config, fields, "task.eval_split", opts.format)
    train = [train[i] for i in _subset(len(train), max_train, 0)]
    ev = [ev[i] for i in _subset(len(ev), max_val, 1)]
    if opts.generate_subset > len(ev):
        raise InstructDataError("task.generate_subset", f"got {opts.generate_subset}, more than the {len(ev)} "
                                f"examples of the eval split {opts.eval_split!r}{' (task.max_val)' if max_val else ''}; "
                                f"set task.generate_subset to at most {len(ev)}")
    if opts.generate_subset > 0 and not any(extract_answer(r[response], extractor) is not None for r in ev):
        raise InstructDataError("task.extractor", f"got {extractor!r}, which finds no answer in any gold "
                                f"{response!r} of the eval split {opts.eval_split!r} (first: "
                                f"{ev[0][response][:80]!r}); use task.extractor=text (the whole response) or "
                                "last_number, or map task.response_field to the field holding the answer")
    return InstructData(train, ev, prompt, response, system, extractor, source, how)


def _encode_split(tokenizer: chat.Tokenizer, rows: list[dict[str, str]], d: InstructData, template: chat.Template,
                  max_length: int, split: str) -> dict[str, Tensor]:
    """One split's examples, ragged: flat int32 ``<split>_ids`` / ``<split>_labels``, ``<split>_lens`` (N,),
    ``<split>_dropped`` (1,) (what the cache keeps: a few bytes per token, not N x max_length)."""
    texts = [chat.render(tokenizer, r[d.prompt], r[d.response], r.get(d.system) if d.system else None, template)
             for r in rows]
    ids, labels, dropped = chat.encode(tokenizer, [t[0] for t in texts], [t[1] for t in texts], max_length, template)
    if not ids:
        raise InstructDataError("task.max_length", f"got {max_length}: every prompt is at least that long, so no "
                                "response token is left to train on; raise task.max_length")
    return {f"{split}_ids": torch.tensor([t for s in ids for t in s], dtype=torch.int32),
            f"{split}_labels": torch.tensor([t for s in labels for t in s], dtype=torch.int32),
            f"{split}_lens": torch.tensor([len(s) for s in ids], dtype=torch.int32),
            f"{split}_dropped": torch.tensor([dropped])}


def _tensors(t: dict[str, Tensor], split: str, pad: int, pack: int | None) -> dict[str, Tensor]:
    """The (N, T) tensors of a cached ragged split (`_encode_split`): padded, or packed into ``pack`` tokens."""
    lens = t[f"{split}_lens"].tolist()
    ids = [s.tolist() for s in torch.split(t[f"{split}_ids"], lens)]
    labels = [s.tolist() for s in torch.split(t[f"{split}_labels"], lens)]
    return chat.pack_examples(ids, labels, pack, pad) if pack else chat.pad_examples(ids, labels, pad)


def _nll_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """(summed NLL of labels[:, 1:] under logits[:, :-1], number of scored tokens); -100 ignored."""
    targets = F.pad(labels[:, 1:], (0, 1), value=chat.IGNORE)
    v = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), ignore_index=chat.IGNORE,
                          reduction="sum")
    return nll, int((targets != chat.IGNORE).sum())


class InstructTask(Task):
    """Instruction tuning with the loss on the response tokens (module docstring).

    Args:
        train, val: tensors (N, T) ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and pad).
        tokenizer: decodes generations.
        gen_ids, gen_prompts, gen_gold: the generation subset: eval indices, prompt token ids, gold answers.
        extractor, options: the answer extractor and the task options (generation, forgetting).
        general: held-out blocks (N, 128) of the forgetting corpus, or None.
        info: recorded by `describe`.
    """

    metric = "neg_loss"
    higher_is_better = True

    def __init__(self, train: dict[str, Tensor], val: dict[str, Tensor], tokenizer: chat.Tokenizer, gen_ids: list[int],
                 gen_prompts: list[list[int]], gen_gold: list[str | None], extractor: Extractor,
                 options: InstructOptions, general: Tensor | None = None, name: str = "instruct",
                 info: JsonObject | None = None, eval_tokens_per_forward: int = 2048) -> None:
        self.train, self.val, self.tokenizer, self.name = train, val, tokenizer, name
        self.gen_ids, self.gen_prompts, self.gen_gold = gen_ids, gen_prompts, gen_gold
        self.extractor, self.options, self.info = extractor, options, dict(info or {})
        self.general = LMTask(general, general, name="general") if general is not None else None
        self.eval_tokens_per_forward = eval_tokens_per_forward
        self._evaluations = 0
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_ids = eos | ({tokenizer.pad_token_id} if not eos and tokenizer.pad_token_id is not None else set())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def num_train(self) -> int:
        return int(self.train["input_ids"].shape[0])

    def train_batch(self, idx: Tensor) -> Batch:
        x = index_inputs({"input_ids": self.train["input_ids"], "attention_mask": self.train["attention_mask"]}, idx)
        width = x["input_ids"].shape[1] if isinstance(x, dict) else 0  # right padding: columns 0..width-1 kept
        return x, self.train["labels"][idx][:, :width]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, labels = batch
        nll, count = _nll_sum(call_model(model, x), labels)
        return nll / max(count, 1)

    def loss_units(self, batch: Batch) -> int:
        """The response tokens `loss` averages over (labels[:, 1:] that are not -100)."""
        return int((batch[1][:, 1:] != chat.IGNORE).sum())

    @torch.no_grad()
    def response_loss(self, model: nn.Module, batch_size: int = 256) -> float:
        """Mean NLL per response token of the eval split (nats); examples batched longest first, each
        batch at most ``eval_tokens_per_forward`` tokens wide x long."""
        device = next(model.parameters()).device
        lens = self.val["attention_mask"].sum(1)
        order = torch.argsort(lens, descending=True, stable=True)
        n, s = len(order), 0
        total, count = 0.0, 0
        while s < n:
            micro = max(1, min(batch_size, self.eval_tokens_per_forward // max(int(lens[order[s]]), 1)))
            idx = order[s : s + micro]
            s += micro
            x = index_inputs({"input_ids": self.val["input_ids"], "attention_mask": self.val["attention_mask"]}, idx)
            assert isinstance(x, dict)
            labels = self.val["labels"][idx][:, : x["input_ids"].shape[1]].to(device)
            nll, c = _nll_sum(call_model(model, {k: v.to(device) for k, v in x.items()}), labels)
            total, count = total + float(nll), count + c
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        loss = self.response_loss(model, batch_size)
        out = {"loss": loss, "neg_loss": -loss, "perplexity": math.exp(min(loss, 700.0))}
        self._evaluations += 1
        every = self.options.generate_every
        if every and self.gen_ids and self._evaluations % every == 0:
            out["exact_match"] = float(self.generate(model)[0])
        return out

    @torch.no_grad()
    def generate(self, model: nn.Module) -> tuple[float, list[JsonObject], float]:
        """(exact match, one row per subset prompt, seconds) of greedy generation on the subset."""
        t0 = time.perf_counter()
        o = self.options
        new = greedy_generate(model, self.gen_prompts, pad_id=self.pad_id, eos_ids=self.eos_ids,
                              max_new_tokens=o.max_new_tokens, batch_size=o.generate_batch_size)
        rows: list[JsonObject] = []
        for i, ids, gold in zip(self.gen_ids, new, self.gen_gold):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            pred = extract_answer(text, self.extractor)
            rows.append({"id": i, "generation": text, "answer": pred, "gold": gold,
                         "correct": exact_match(pred, gold), "new_tokens": len(ids)})
        em = sum(bool(r["correct"]) for r in rows) / max(len(rows), 1)
        return em, rows, time.perf_counter() - t0

    def general_loss(self, model: nn.Module) -> float | None:
        """Next-token loss on the held-out general-corpus blocks (None without a corpus)."""
        return None if self.general is None else self.general.evaluate(model)["loss"]

    def before_training(self, model: nn.Module) -> JsonObject:
        out: JsonObject = {"general_loss_before": self.general_loss(model)}
        if self.gen_ids and self.options.generate_before:
            em, rows, secs = self.generate(model)
            out.update({"exact_match_before": em, "generation_before_s": secs,
                        "rows_before": [{k: r[k] for k in ("generation", "answer", "correct")} for r in rows]})
        return out

    def after_training(self, model: nn.Module, before: JsonObject) -> JsonObject:
        out: JsonObject = {}
        if self.general is not None:
            out.update({"general_loss_before": before.get("general_loss_before"),
                        "general_loss_after": self.general_loss(model)})
        if not self.gen_ids:
            return out
        em, rows, secs = self.generate(model)
        prior = before.get("rows_before")
        if isinstance(prior, list) and len(prior) == len(rows):
            for r, p in zip(rows, prior):
                if isinstance(p, dict):
                    r.update({f"{k}_before": v for k, v in p.items()})
        o = self.options
        detail: JsonObject = {"n": len(rows), "correct": sum(bool(r["correct"]) for r in rows),
                              "extractor": self.extractor, "max_new_tokens": o.max_new_tokens,
                              "batch_size": o.generate_batch_size, "seed": o.generate_seed, "seconds": secs,
                              "new_tokens": sum(int(str(r["new_tokens"])) for r in rows), "file": GENERATIONS_FILE}
        if "exact_match_before" in before:
            out["exact_match_before"] = before["exact_match_before"]
            detail["seconds_before"] = before.get("generation_before_s")
        out.update({"exact_match": em, "generation": detail, "generations": list(rows)})
        return out

    def describe(self) -> JsonObject:
        return {**super().describe(), "num_val": int(self.val["input_ids"].shape[0]), **self.info}


def write_generations(path: str | Path, rows: list[JsonValue]) -> None:
    """The generation rows as JSON lines (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _general_blocks(tokenizer: chat.Tokenizer, corpus: str, n: int) -> Tensor:
    """The first ``n`` held-out blocks (validation blocks, seed 0) of a corpus (cached)."""
    def build() -> dict[str, Tensor]:
        return {"blocks": text_corpus_task(tokenizer, source=corpus, block_size=FORGETTING_BLOCK, seed=0).val_blocks}

    blocks = cached_tensors("corpus", {"tokenizer": tokenizer_fingerprint(tokenizer), "corpus": corpus,
                                       "mtime": Path(corpus).stat().st_mtime if Path(corpus).is_file() else None,
                                       "block": FORGETTING_BLOCK}, build)["blocks"]
    return blocks[:n]


def instruct_task(name: str, tokenizer: chat.Tokenizer, max_length: int = 512, max_train: int | None = None,
                  max_val: int | None = None, options: InstructOptions | None = None) -> InstructTask:
    """An `InstructTask` for preset or ``instruct/<source>`` task ``name`` (module docstring).

    Args:
        name: ``gsm8k`` or ``instruct/<Hugging Face dataset | file | folder>``.
        tokenizer: the model's tokenizer (with a pad token: `idlab.models.load_model` sets one).
        max_length: tokens per example (longer ones are cut; packing: tokens per block).
        max_train, max_val: keep a seeded subset of that many examples of each split.
        options: the other task keys (`InstructOptions`; None: the defaults).

    Raises:
        InstructDataError / chat.ChatTemplateError: bad input (see `load_instruct_data`, `chat.resolve_template`).
    """
    opts = options or InstructOptions()
    template = chat.resolve_template(tokenizer, opts.chat_template)
    d = load_instruct_data(name, opts, max_train, max_val)

    def build() -> dict[str, Tensor]:
        return {**_encode_split(tokenizer, d.train, d, template, max_length, "train"),
                **_encode_split(tokenizer, d.eval, d, template, max_length, "val")}

    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "template": template, "max_length": max_length,
           "data": content_hash([d.train, d.eval, d.prompt, d.response, d.system])}
    t = cached_tensors("instruct", key, build)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = _tensors(t, "train", pad, max_length if opts.packing else None)
    val = _tensors(t, "val", pad, None)
    gen_ids = _subset(len(d.eval), opts.generate_subset, opts.generate_seed) if opts.generate_subset else []
    heads = [chat.render(tokenizer, d.eval[i][d.prompt], None, d.eval[i].get(d.system) if d.system else None,
                         template)[0] for i in gen_ids]
    prompts = [list(p) for p in tokenizer(heads, add_special_tokens=template == "plain")["input_ids"]] if heads else []
    gold = [extract_answer(d.eval[i][d.response], d.extractor) for i in gen_ids]
    general = _general_blocks(tokenizer, opts.forgetting_corpus, opts.forgetting_blocks) \
        if opts.forgetting_corpus and opts.forgetting_blocks > 0 else None
    info: JsonObject = {"source": d.source, "source_from": d.how, "template": template, "packing": opts.packing,
                        "fields": {"prompt": d.prompt, "response": d.response, "system": d.system},
                        "extractor": d.extractor, "dropped_too_long": [int(t["train_dropped"]), int(t["val_dropped"])],
                        "response_tokens_train": int((train["labels"] != chat.IGNORE).sum()),
                        "response_tokens_val": int((val["labels"] != chat.IGNORE).sum()),
                        "generate_subset": len(gen_ids), "forgetting_corpus": opts.forgetting_corpus,
                        "forgetting_blocks": 0 if general is None else int(general.shape[0])}
    return InstructTask(train, val, tokenizer, gen_ids, prompts, gold, d.extractor, opts, general, name=name,
                        info=info)


__all__ = ["FORGETTING_BLOCK", "GENERATIONS_FILE", "InstructData", "InstructOptions", "InstructTask",
           "instruct_task", "load_instruct_data", "write_generations"]
