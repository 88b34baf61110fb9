"""Instruction tasks through the real sweep (issue 30 items 1, 2, 5): a tiny-Llama run writes exact match
before / after, the forgetting losses and generations.jsonl; bad input is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from idlab.config import ConfigError, study_from_dict
from idlab.runs import RunResult, iter_results
from idlab.sweep.driver import run_sweep
from tests.instruct_fixtures import llama_dir, write_data


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLAB_CACHE", str(tmp_path / "cache"))


def _study(tmp_path: Path, model: Path, data: Path, **task: Any) -> dict[str, Any]:
    return {
        "name": "instruct", "model": str(model), "methods": ["full"], "full": {"lr": [1e-3]},
        "task": {"name": f"instruct/{data}", "max_length": 48, "generate_subset": 4, "max_new_tokens": 5,
                 "generate_batch_size": 3, "extractor": "gsm8k", "forgetting_blocks": 4, **task},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 2}, "seeds": [0],
        "results_dir": str(tmp_path / "results"), "device": "cpu",
    }


def test_tiny_llama_run_records_exact_match_forgetting_and_generations(tmp_path: Path) -> None:
    model, data = llama_dir(tmp_path / "llama"), write_data(tmp_path / "data")
    summary = run_sweep(study_from_dict(_study(tmp_path, model, data, generate_every=1)))
    assert len(summary.ok) == 1, summary.failed
    ((_, res),) = list(iter_results(tmp_path / "results" / "instruct"))
    assert res.metric == "neg_loss" and res.higher_is_better and res.score() is not None
    assert res.exact_match is not None and res.exact_match_before is not None and 0 <= res.exact_match <= 1
    assert res.general_loss_before is not None and res.general_loss_after is not None
    assert res.forgetting == pytest.approx(res.general_loss_after - res.general_loss_before)
    assert res.generation is not None and res.generation["n"] == 4 and res.generation["file"] == "generations.jsonl"
    assert "exact_match" in res.curve[0]  # generate_every=1: at the evaluation of step 2 too
    assert res.task_info["template"] == "model" and res.task_info["generate_subset"] == 4
    run_dir = tmp_path / "results" / "instruct" / "runs" / res.run_id
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"id", "generation", "answer", "gold", "correct", "generation_before"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 4 == res.exact_match
    assert "generations.jsonl" in {a.path for a in res.artifacts or ()}
    again = RunResult.from_dict(json.loads((run_dir / "result.json").read_text()))
    assert again.to_dict() == res.to_dict()


def test_gsm8k_preset_run_from_a_named_folder(tmp_path: Path) -> None:
    model, data = llama_dir(tmp_path / "llama"), write_data(tmp_path / "gsm8k", fields=("question", "answer"))
    raw = _study(tmp_path, model, data, generate_before=False, forgetting_corpus=None, packing=True)
    raw["task"] = {**raw["task"], "name": "gsm8k", "data_dir": str(data)}
    del raw["task"]["extractor"]  # the preset's: gsm8k
    summary = run_sweep(study_from_dict(raw))
    assert len(summary.ok) == 1, summary.failed
    ((_, res),) = list(iter_results(tmp_path / "results" / "instruct"))
    assert res.task_info["source_from"] == "task.data_dir" and res.task_info["extractor"] == "gsm8k"
    assert res.exact_match is not None and res.exact_match_before is None and res.general_loss_after is None


def test_old_result_rows_read_unchanged() -> None:
    old = {"run_id": "x", "status": "ok", "metrics": {"accuracy": 0.5}, "config": {}}
    r = RunResult.from_dict(old)
    assert r.exact_match is None and r.generation is None and r.forgetting is None and r.to_dict() == old


def _refused(raw: dict[str, Any], results: Path, *needles: str) -> None:
    with pytest.raises(ConfigError) as e:
        run_sweep(study_from_dict(raw))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not results.exists()


def test_bad_input_refused_before_anything_is_written(tmp_path: Path) -> None:
    model, data = llama_dir(tmp_path / "llama"), write_data(tmp_path / "data")
    res = tmp_path / "results"
    _refused(_study(tmp_path, model, data, prompt_field="question"), res, "task.prompt_field", "'question'",
             "its fields: prompt, response")
    _refused(_study(tmp_path, model, data, generate_subset=9), res, "task.generate_subset", "got 9", "at most 8")
    bad = write_data(tmp_path / "words")
    (bad / "test.jsonl").write_text(json.dumps({"prompt": "what is 1 ?", "response": "one"}) + "\n")
    _refused(_study(tmp_path, model, bad, generate_subset=1), res, "task.extractor", "finds no answer")
    plain = llama_dir(tmp_path / "plain", chat_template=False)
    _refused(_study(tmp_path, plain, data, chat_template="model"), res, "task.chat_template", "no chat template",
             "task.chat_template=auto")
    _refused(_study(tmp_path, model, data, eval_split="dev"), res, "task.eval_split", "dev.jsonl")
    _refused(_study(tmp_path, model, data, forgetting_corpus=str(tmp_path / "none.txt")), res,
             "task.forgetting_corpus", "none.txt")
    hub = _study(tmp_path, model, data)
    hub["task"]["name"] = "instruct/idlab-test/no-such-dataset"  # offline in the tests (conftest)
    _refused(hub, res, "task.name", "'idlab-test/no-such-dataset'", "could not be loaded")
    glue = _study(tmp_path, model, data)
    glue["task"] = {"name": "text/pydoc", "generate_subset": 2}
    _refused(glue, res, "task.generate_subset", "instruction tasks only")


def test_two_processes_give_the_one_process_numbers_on_a_per_token_loss(tmp_path: Path) -> None:
    """The response loss is a mean per token and the responses differ in length, so each rank's mean is
    weighted by its share of the batch's response tokens (`Task.loss_units`), not of its examples: a
    2-process run (torchrun, gloo, DDP) gives the 1-process loss curve."""
    import importlib.util

    import torch

    if importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    model, data = llama_dir(tmp_path / "llama"), tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 16), ("test", 4)):  # responses of 2 to 9 words
        rows = [{"prompt": f"what is {i} plus {i % 5} ?", "response": " ".join(["be"] * (1 + i % 7) + [str(i)])}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"generate_subset": 0, "forgetting_corpus": None, "extractor": "text"}
    curves = {}
    for name, over in (("one", {}), ("two", {"executor": "torchrun", "nproc_per_node": 2})):
        raw = {**_study(tmp_path / name, model, data, **task), "methods": ["lora"],
               "lora": {"r": [2], "target_modules": ["qv"], "lr": [1e-2]}, **over}
        raw["train"] = {**raw["train"], "steps": 4, "distributed": "ddp" if over else "none"}
        summary = run_sweep(study_from_dict(raw))
        assert len(summary.ok) == 1, summary.failed
        ((_, res),) = list(iter_results(tmp_path / name / "results" / "instruct"))
        curves[name] = [c["train_loss"] for c in res.curve]
    assert len(curves["one"]) == len(curves["two"]) >= 2
    assert max(abs(a - b) for a, b in zip(curves["one"], curves["two"])) < 1e-5, curves
