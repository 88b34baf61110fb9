"""Instruction tasks, data side (issue 30 items 1-2): response-only labels, chat / plain templates,
answer extraction and exact match, greedy generation, the gsm8k preset, the content-hash cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlab.data import chat
from idlab.data.cache import cached_tensors
from idlab.data.generate import exact_match, extract_answer, greedy_generate, normalise_number
from idlab.data.instruct import InstructOptions, instruct_task, load_instruct_data
from idlab.data.instruct_source import PRESETS, InstructDataError, shared_data_dir
from idlab.models.tiny import tiny_llama
from tests.instruct_fixtures import tokenizer, write_data

GSM8K = shared_data_dir("gsm8k")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLAB_CACHE", str(tmp_path / "cache"))


def test_labels_mask_exactly_the_prompt_tokens() -> None:
    tok = tokenizer()
    head, resp = chat.render(tok, "what is 2 plus 3 ?", "the answer is 5", None, "model")
    assert head == "<|im_start|>user\nwhat is 2 plus 3 ?<|im_end|>\n<|im_start|>assistant\n"
    assert resp == "the answer is 5<|im_end|>\n"
    ids, labels, dropped = chat.encode(tok, [head], [resp], 64, "model")
    v = tok.get_vocab()
    prompt = [v["<|im_start|>"], v["user"], v["what"], v["is"], v["2"], v["plus"], v["3"], v["?"], v["<|im_end|>"],
              v["<|im_start|>"], v["assistant"]]
    response = [v["the"], v["answer"], v["is"], v["5"], v["<|im_end|>"]]
    assert ids == [prompt + response] and dropped == 0
    assert labels == [[-100] * len(prompt) + response]
    # truncated into the response: kept, cut; truncated inside the prompt: dropped
    ids, labels, dropped = chat.encode(tok, [head, head], [resp, resp], len(prompt) + 2, "model")
    assert labels == [[-100] * len(prompt) + response[:2]] * 2 and dropped == 0
    assert chat.encode(tok, [head], [resp], len(prompt), "model")[2] == 1
    padded = chat.pad_examples([[5, 6, 7], [8]], [[-100, 6, 7], [-100]], pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    packed = chat.pack_examples([[5, 6, 7], [8, 9]], [[-100, 6, 7], [-100, 9]], block=4, pad_id=0)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8], [9, 0, 0, 0]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100], [9, -100, -100, -100]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_templates_plain_auto_and_model() -> None:
    with_t, without = tokenizer(), tokenizer(chat_template=False)
    assert chat.resolve_template(with_t, "auto") == "model" and chat.resolve_template(without, "auto") == "plain"
    assert chat.resolve_template(with_t, "plain") == "plain"
    with pytest.raises(chat.ChatTemplateError, match=r"task\.chat_template=auto"):
        chat.resolve_template(without, "model")
    head, resp = chat.render(without, "what is 1 ?", "1", "be brief", "plain")
    assert head == "be brief\n\n### Instruction:\nwhat is 1 ?\n\n### Response:\n" and resp == "1</s>"
    sys_head, _ = chat.render(with_t, "what is 1 ?", None, "be brief", "model")
    assert sys_head.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    _, labels, _ = chat.encode(without, [head], [resp], 64, "plain")
    assert labels[0][-1] == without.eos_token_id and sum(x != -100 for x in labels[0]) == 2


@pytest.mark.parametrize(("text", "kind", "want"), [
    ("so 1,000 + 234 = 1,234\n#### 1,234", "gsm8k", "1234"),
    ("#### $18", "gsm8k", "18"),
    ("#### -3.50", "gsm8k", "-3.5"),
    ("She has 3 apples, then 12.0 in all.", "gsm8k", "12"),
    ("The answer is $1,250.", "last_number", "1250"),
    ("no number here", "gsm8k", None),
    ("", "last_number", None),
    ("  Paris \n", "text", "Paris"),
])
def test_extraction_known_answers(text: str, kind: str, want: str | None) -> None:
    assert extract_answer(text, kind) == want  # type: ignore[arg-type]


def test_exact_match_and_normalisation() -> None:
    assert exact_match(extract_answer("#### 1,234", "gsm8k"), extract_answer("it is 1234", "gsm8k"))
    assert not exact_match(None, None) and not exact_match("3", None) and not exact_match("3", "4")
    assert normalise_number("$7.00") == "7" and normalise_number("abc") is None


def test_greedy_generation_matches_one_by_one_and_stops_at_eos() -> None:
    model = tiny_llama(seed=3)
    prompts = [[1, 7, 8, 9, 10, 11], [1, 20], [1, 30, 31, 32]]
    batched = greedy_generate(model, prompts, pad_id=0, eos_ids={2}, max_new_tokens=6, batch_size=3)
    alone = [greedy_generate(model, [p], pad_id=0, eos_ids={2}, max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(1 <= len(g) <= 6 for g in batched)
    with torch.no_grad():  # the first new token is the argmax after the prompt
        assert batched[0][0] == int(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())
    eos = batched[1][0]  # make the first token generated an end token: generation stops there
    assert greedy_generate(model, [prompts[1]], pad_id=0, eos_ids={eos}, max_new_tokens=6) == [[eos]]


def test_instruct_task_from_a_local_folder(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    tok = tokenizer()
    task = instruct_task(f"instruct/{data}", tok, max_length=32,
                         options=InstructOptions(generate_subset=3, extractor="gsm8k"))
    assert task.num_train == 24 and task.metric == "neg_loss" and task.higher_is_better
    x, y = task.train_batch(torch.arange(4))
    assert isinstance(x, dict) and x["input_ids"].shape == y.shape
    first = (y[0] != -100).nonzero().flatten()
    assert tok.decode(x["input_ids"][0, first]).startswith("the answer is")
    lines = (data / "test.jsonl").read_text().splitlines()
    gold = [extract_answer(json.loads(line)["response"], "gsm8k") for line in lines]
    assert len(task.gen_ids) == 3 and task.gen_gold == [gold[i] for i in task.gen_ids]
    model = tiny_llama(seed=0)
    loss = float(task.loss(model, (x, y)).detach())
    assert 0 < loss < 20 and task.evaluate(model)["loss"] > 0
    packed = instruct_task(f"instruct/{data}", tok, max_length=32, options=InstructOptions(packing=True))
    assert packed.train["input_ids"].shape[1] == 32
    assert int((packed.train["labels"] != -100).sum()) == int((task.train["labels"] != -100).sum())


def test_data_cache_hit_and_content_change(tmp_path: Path) -> None:
    calls = []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(3)}

    assert torch.equal(cached_tensors("t", {"a": 1}, build)["x"], torch.arange(3))
    cached_tensors("t", {"a": 1}, build)
    cached_tensors("t", {"a": 2}, build)
    assert len(calls) == 2
    data = write_data(tmp_path / "d")
    first = instruct_task(f"instruct/{data}", tokenizer(), max_length=32)
    write_data(tmp_path / "d", n_train=20)  # other content: a new entry
    assert instruct_task(f"instruct/{data}", tokenizer(), max_length=32).num_train == 20 != first.num_train


def test_bad_fields_extractor_and_subset(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", fields=("q", "a"))
    with pytest.raises(InstructDataError, match=r"no field .prompt.*its fields: q, a.*task\.prompt_field") as e:
        load_instruct_data(f"instruct/{data}", InstructOptions())
    assert e.value.key == "task.prompt_field"
    ok = InstructOptions(prompt_field="q", response_field="a")
    assert len(load_instruct_data(f"instruct/{data}", ok).train) == 24
    with pytest.raises(InstructDataError, match="got 9, more than the 8 examples") as e:
        load_instruct_data(f"instruct/{data}", InstructOptions(prompt_field="q", response_field="a", generate_subset=9))
    assert e.value.key == "task.generate_subset"
    (data / "test.jsonl").write_text(json.dumps({"q": "what is 1 ?", "a": "one"}) + "\n")
    with pytest.raises(InstructDataError, match="finds no answer in any gold") as e:
        load_instruct_data(f"instruct/{data}", InstructOptions(prompt_field="q", response_field="a",
                                                               extractor="gsm8k", generate_subset=1))
    assert e.value.key == "task.extractor"


@pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason=f"GSM8K not found at {GSM8K}")
def test_gsm8k_preset_reads_the_shared_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IDLAB_GSM8K_DIR", raising=False)
    d = load_instruct_data("gsm8k", InstructOptions())
    assert (len(d.train), len(d.eval)) == (7473, 1319) and d.how == "../shared/data"
    assert (d.prompt, d.response, d.extractor) == ("question", "answer", "gsm8k") == (
        PRESETS["gsm8k"].prompt_field, PRESETS["gsm8k"].response_field, "gsm8k")
    assert d.eval[0]["question"].startswith("Janet") and extract_answer(d.eval[0]["answer"], "gsm8k") == "18"
    assert all(extract_answer(r["answer"], "gsm8k") is not None for r in d.eval)
    small = write_data(tmp_path / "g", fields=("question", "answer"))  # a folder the user names
    monkeypatch.setenv("IDLAB_GSM8K_DIR", str(small))
    assert len(load_instruct_data("gsm8k", InstructOptions()).train) == 24
    assert load_instruct_data("gsm8k", InstructOptions(data_dir=str(GSM8K)), max_val=5).how == "task.data_dir"


def test_the_pretrained_scores_survive_a_resume(tmp_path: Path) -> None:
    from idlab.training.checkpoint import CheckpointSpec
    from idlab.training.loop import TrainConfig, train

    data = write_data(tmp_path / "data")
    task = instruct_task(f"instruct/{data}", tokenizer(), max_length=32,
                         options=InstructOptions(generate_subset=2, max_new_tokens=3, extractor="gsm8k",
                                                 forgetting_blocks=2))
    calls = []
    measure = task.before_training
    task.before_training = lambda m: calls.append(1) or measure(m)  # type: ignore[method-assign]
    spec = CheckpointSpec(tmp_path / "ckpt", "r", every=2)
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=4, progress=False, device="cpu")
    first = train(tiny_llama(seed=0), task, cfg, checkpoint=spec)  # leaves its step-2 checkpoint
    resumed = train(tiny_llama(seed=0), task, cfg, checkpoint=spec)
    assert calls == [1] and resumed.resumed_from == 2
    for key in ("exact_match_before", "general_loss_before", "exact_match", "general_loss_after"):
        assert resumed.task_record[key] == first.task_record[key], key
    assert first.task_record["general_loss_after"] != first.task_record["general_loss_before"]


@pytest.mark.parametrize("projection", ["fastfood", "dense"])
def test_generation_through_a_subspace_wrapper(projection: str) -> None:
    from idlab.subspace.model import SubspaceModel

    prompts = [[1, 7, 8, 9], [1, 20]]
    plain = greedy_generate(tiny_llama(seed=0), prompts, pad_id=0, eos_ids={2}, max_new_tokens=4)
    sub = SubspaceModel(tiny_llama(seed=0), dim=8, projection=projection, seed=0)  # theta_d = 0: the same model
    assert greedy_generate(sub, prompts, pad_id=0, eos_ids={2}, max_new_tokens=4) == plain


def test_named_formats_alpaca_and_messages(tmp_path: Path) -> None:
    """task.format: alpaca (instruction, input, output) and messages (a chat ending with the assistant's
    response) become prompt / response / system; the loss covers exactly the response's tokens."""
    from idlab.data.instruct_source import InstructDataError, from_format

    assert from_format({"instruction": "what is 2 plus 3 ?", "input": "be brief", "output": "5"}, "alpaca", "r") == \
        {"prompt": "what is 2 plus 3 ?\n\nbe brief", "response": "5", "system": ""}
    chat_row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 ?"},
                             {"role": "assistant", "content": "1"}, {"role": "user", "content": "what is 2 plus 3 ?"},
                             {"role": "assistant", "content": "the answer is 5"}]}
    assert from_format(chat_row, "messages", "r") == {
        "prompt": "user: what is 1 ?\n\nassistant: 1\n\nwhat is 2 plus 3 ?", "response": "the answer is 5",
        "system": "be brief"}
    with pytest.raises(InstructDataError, match="no text field 'output'"):
        from_format({"instruction": "x"}, "alpaca", "record 0")
    with pytest.raises(InstructDataError, match="ending with a user turn and the assistant's response"):
        from_format({"messages": [{"role": "user", "content": "x"}]}, "messages", "record 0")
    tok = tokenizer()
    for fmt, rows in (("alpaca", [{"instruction": f"what is {i} plus 1 ?", "input": "", "output": f"the answer is {i + 1}"}
                                  for i in range(6)]),
                      ("messages", [{"messages": [{"role": "user", "content": f"what is {i} plus 1 ?"},
                                                  {"role": "assistant", "content": f"the answer is {i + 1}"}]}
                                    for i in range(6)])):
        d = tmp_path / fmt
        d.mkdir()
        for split in ("train", "test"):
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = instruct_task(f"instruct/{d}", tok, max_length=32, options=InstructOptions(format=fmt))
        x, y = task.train_batch(torch.arange(2))
        kept = (y[0] != -100).nonzero().flatten()
        assert tok.decode(x["input_ids"][0, kept]).startswith("the answer is"), fmt
        with pytest.raises(InstructDataError, match=r"task\.format"):
            instruct_task(f"instruct/{d}", tok, max_length=32, options=InstructOptions(format=fmt, prompt_field="q"))
