"""Restoring a finished run's model from its folder, and ``idlab eval`` through lm-evaluation-harness.

The runs: a tiny Llama (30,522-token vocabulary, the offline MiniLM WordPiece tokenizer) on random
token blocks, LoRA, IA3 (the PEFT family), SAID (Fastfood, blocks layout) and full fine-tuning, 4 steps each. The lm-eval
tasks: two local task definitions over ../shared/data/gsm8k/test.jsonl (a loglikelihood task and a
generate_until task with 4 new tokens), --limit 2.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from idlab.config import study_from_dict
from idlab.runs import iter_results

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install 'idlab[eval]')")
needs_gsm8k = pytest.mark.skipif(not GSM8K.is_file(), reason=f"{GSM8K} is absent")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """{method: (run folder, logits of the trained model on a fixed batch)}."""
    from idlab.sweep.driver import run_sweep
    from idlab.training import loop

    root = tmp_path_factory.mktemp("results")
    trained: dict[str, torch.nn.Module] = {}
    real = loop.train

    def capture(model: torch.nn.Module, *a: Any, **k: Any) -> Any:
        out = real(model, *a, **k)
        trained[str(k.get("desc", "")).split()[-1]] = model
        return out

    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(FIXTURES))
    mp.setattr(loop, "train", capture)
    raw = {"name": "evalhook", "model": {"name": "idlab_fixture_tasks:tiny_llama_wordpiece_model"},
           "task": "idlab_fixture_tasks:random_lm", "methods": ["full", "lora", "peft", "subspace"],
           "full": {"lr": [1e-3]}, "lora": {"r": [2], "target_modules": ["qv"], "lr": [1e-2]},
           "peft": [{"method": "ia3", "lr": [1e-2]}], "subspace": {"d": [64], "said": [True], "lr": [1e-2]},
           "train": {"steps": 4, "batch_size": 8, "eval_every": 2}, "seeds": [0], "results_dir": str(root),
           "device": "cpu"}
    summary = run_sweep(study_from_dict(raw))
    assert len(summary.ok) == 4
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for path, res in iter_results(root):
        m = trained[res.config["method"]]
        m.eval()
        with torch.no_grad():
            out[str(res.config["method"])] = (path.parent, m(input_ids=x).logits, x, m)
    yield out
    mp.undo()


@pytest.mark.parametrize("method", ["lora", "subspace", "peft", "full"])
def test_restored_model_gives_the_trained_logits(runs: dict[str, Any], method: str) -> None:
    from idlab.models import linear_weights
    from idlab.sweep.restore import restore_run

    folder, logits, x, trained = runs[method]
    if method == "full":  # the folder holds Delta W of the linear weights only: those come back, and a warning
        with pytest.warns(UserWarning, match="linear weights only"):
            restored = restore_run(folder)
        want = linear_weights(trained)
        for n, w in linear_weights(restored.model).items():
            torch.testing.assert_close(w, want[n], rtol=0, atol=1e-6)  # W_0 + (W - W_0) in float32
        return
    restored = restore_run(folder)
    with torch.no_grad():
        got = restored.model(input_ids=x).logits
        merged = restored.merged()(input_ids=x).logits
    assert torch.equal(got, logits)  # the same tensors loaded into the same wrapper: bit for bit
    torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-5)  # adapters / theta_d merged into W


def test_a_run_that_is_not_finished_is_refused(runs: dict[str, Any], tmp_path: Path) -> None:
    from idlab.sweep.restore import check_run_dir

    with pytest.raises(ValueError, match="not a run folder"):
        check_run_dir(tmp_path)
    folder = runs["lora"][0]
    bad = tmp_path / "failed"
    bad.mkdir()
    raw = json.loads((folder / "result.json").read_text())
    (bad / "result.json").write_text(json.dumps({**raw, "status": "failed", "artifacts": []}))
    with pytest.raises(ValueError, match="status 'failed'"):
        check_run_dir(bad)


TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
{body}
metadata:
  version: 1.0
"""
LL = """output_type: loglikelihood
doc_to_target: " {{answer.split('####')[-1].strip()}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true"""
GEN = """output_type: generate_until
doc_to_target: "{{answer.split('####')[-1].strip()}}"
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true"""


def _task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    for name, body in (("gsm8k_local_ll", LL), ("gsm8k_local_gen", GEN)):
        (d / f"{name}.yaml").write_text(TASKS.format(name=name, data=GSM8K, body=body))
    return d


@needs_lm_eval
@needs_gsm8k
def test_idlab_eval_scores_a_run_on_local_tasks_and_resumes(runs: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.cli import main
    from idlab.runs.evals import EVAL_FILE, read_evals

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _task_dir(tmp_path)
    folder = runs["lora"][0]
    args = ["eval", str(folder), "--tasks", "gsm8k_local_ll,gsm8k_local_gen", "--limit", "2",
            "--include-path", str(tasks), "--no-builtin-tasks", "--tokenizer", "minilm-l6"]
    assert main(args) == 0
    got = read_evals(folder)
    assert read_evals(folder, pretrained=True) == {}  # only with --pretrained
    assert main([*args, "--pretrained"]) == 0  # the run's tasks are done: only the pretrained model is scored
    pre = read_evals(folder, pretrained=True)
    assert set(pre) == set(got) and pre["gsm8k_local_ll"].n_samples == 2
    assert read_evals(folder) == got  # the run's own scores untouched
    assert set(got) == {"gsm8k_local_ll", "gsm8k_local_gen"}
    assert got["gsm8k_local_ll"].limit == 2 and got["gsm8k_local_ll"].n_samples == 2
    assert got["gsm8k_local_ll"].metrics["acc,none"] in (0.0, 0.5, 1.0)
    assert got["gsm8k_local_gen"].metrics["exact_match,none"] == 0.0  # 4 tokens of a random model
    assert got["gsm8k_local_gen"].lm_eval_version == "0.4.13"
    # resumable: a second call scores nothing; a task removed from eval.json is the only one scored again
    stamp = got["gsm8k_local_gen"].evaluated_at
    raw = json.loads((folder / EVAL_FILE).read_text())
    del raw["tasks"]["gsm8k_local_ll"]
    (folder / EVAL_FILE).write_text(json.dumps(raw))
    assert main(args) == 0
    again = read_evals(folder)
    assert set(again) == set(got) and again["gsm8k_local_gen"].evaluated_at == stamp


@needs_lm_eval
def test_bad_task_names_and_run_folders_are_refused_before_anything_runs(runs: dict[str, Any], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from idlab.cli import main

    tasks = _task_dir(tmp_path)
    folder = runs["subspace"][0]
    base = ["--include-path", str(tasks), "--no-builtin-tasks", "--tokenizer", "minilm-l6"]
    assert main(["eval", str(folder), "--tasks", "gsm8k_local_l", *base]) == 2
    err = capsys.readouterr().err
    assert "no task 'gsm8k_local_l'" in err and "gsm8k_local_ll" in err
    assert main(["eval", str(folder), str(tmp_path), "--tasks", "gsm8k_local_ll", *base]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert not (folder / "eval.json").exists()


@needs_lm_eval
@needs_gsm8k
def test_a_study_lists_eval_tasks_and_the_sweep_scores_its_runs(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval: {tasks: [...]}`` in a study: `idlab sweep` checks the names before anything is written, scores
    every run that finished ok after training, and a second sweep scores nothing again."""
    from idlab.config import ConfigError
    from idlab.runs.evals import read_evals
    from idlab.sweep.driver import run_sweep

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(FIXTURES))
    tasks = _task_dir(tmp_path)
    raw = {"name": "evalblock", "model": {"name": "idlab_fixture_tasks:tiny_llama_wordpiece_model"},
           "task": "idlab_fixture_tasks:random_lm", "methods": ["lora"],
           "lora": {"r": [2], "target_modules": ["qv"], "lr": [1e-2]},
           "train": {"steps": 2, "batch_size": 8, "eval_every": 2}, "seeds": [0], "device": "cpu",
           "results_dir": str(tmp_path / "res"),
           "eval": {"tasks": ["gsm8k_local_ll"], "limit": 2, "include_path": str(tasks), "builtin_tasks": False,
                    "tokenizer": "minilm-l6"}}
    with pytest.raises(ConfigError, match=r"eval.tasks.*gsm8k_local_l'.*close: gsm8k_local_ll"):
        run_sweep(study_from_dict({**raw, "eval": {**raw["eval"], "tasks": ["gsm8k_local_l"]}}))
    assert not (tmp_path / "res").exists()  # refused before anything was written
    summary = run_sweep(study_from_dict(raw))
    (rid,) = summary.ok
    run_dir = tmp_path / "res" / "evalblock" / "runs" / rid
    scores = read_evals(run_dir)
    assert set(scores) == {"gsm8k_local_ll"} and scores["gsm8k_local_ll"].n_samples == 2
    stamp = scores["gsm8k_local_ll"].evaluated_at
    run_sweep(study_from_dict(raw))  # nothing to train, nothing to score again
    assert read_evals(run_dir)["gsm8k_local_ll"].evaluated_at == stamp
    plain = study_from_dict({k: v for k, v in raw.items() if k != "eval"})
    from idlab.sweep.grid import expand

    assert [r for r, _ in expand(plain)] == [rid]  # the eval block does not change the run id
