"""Refused before the first run (issue "A study folder holds one experiment", part 3): what the config
and the model's shapes tell, checked once per study; each exits 2 (ConfigError) naming the value and the
fix, and writes nothing (no study folder, no study.json)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from idlab.config import ConfigError, study_from_dict
from idlab.sweep.driver import run_sweep

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def _study(results: Path, **over: Any) -> dict[str, Any]:
    """An MLP 8-16-3 on blobs: D = 8*16 + 16 + 16*3 + 3 = 195 parameters in m = 4 tensors."""
    raw: dict[str, Any] = {
        "name": "refuse", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
        "methods": ["subspace"], "subspace": {"d": [8], "projection": ["fastfood"], "head": "project"},
        "lora": {"r": [1], "target_modules": [["net.0", "net.2"]]},
        "train": {"steps": 2, "batch_size": 8, "eval_every": 1}, "seeds": [0],
        "results_dir": str(results), "device": "cpu",
    }
    raw.update(over)
    return raw


def _refused(raw: dict[str, Any], results: Path, *needles: str) -> str:
    """run_sweep raises ConfigError naming every needle, and nothing is written under ``results``."""
    with pytest.raises(ConfigError) as e:
        run_sweep(study_from_dict(raw))
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert not results.exists(), sorted(results.rglob("*"))
    return msg


def test_subspace_d_above_the_model_parameter_count(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _refused(_study(res, subspace={"d": [8, 1000], "projection": ["dense"], "head": "project"}), res,
             "subspace.d", "[1000]", "D = 195", "use d <= 195", "subspace.d=[8]")


def test_subspace_d_auto_above_the_model_parameter_count(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _refused(_study(res, subspace={"d": "auto", "auto_max": 1000, "head": "project"}), res,
             "subspace.auto_max", "auto_max=1000", "D = 195", "subspace.auto_max=195")


def test_subspace_d_counts_without_a_directly_trained_head(tmp_path: Path) -> None:
    """head: train keeps the classifier out of P: D is the encoder's parameters only."""
    res = tmp_path / "results"
    model = {"name": "idlab_fixture_tasks:tiny_bert_model"}
    msg = _refused(_study(res, model=model, subspace={"d": [10**6], "head": "train"}), res, "subspace.d", "[1000000]")
    from idlab.models import tiny_bert

    bert = tiny_bert(num_labels=3)
    D = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("classifier."))
    assert f"D = {D:,}" in msg and "head trains directly" in msg


def test_said_needs_d_above_the_number_of_projected_tensors(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _refused(_study(res, subspace={"d": [3, 8], "said": [False, True], "head": "project"}), res,
             "subspace.d", "[3, 8]", "SAID", "m = 4", "d = [3]", "use d >= 5", "subspace.said=[false]")


def test_lora_target_modules_naming_no_module_lists_the_real_names(tmp_path: Path) -> None:
    res = tmp_path / "results"
    msg = _refused(_study(res, methods=["lora"], lora={"r": [1], "target_modules": ["qv"]}), res,
                   "lora.target_modules", "['q_proj', 'v_proj']", "['net.0', 'net.2']")
    assert "[]" not in msg


def test_lora_target_modules_on_bert_lists_query_and_value(tmp_path: Path) -> None:
    res = tmp_path / "results"
    model = {"name": "idlab_fixture_tasks:tiny_bert_model"}
    _refused(_study(res, model=model, methods=["lora"], lora={"r": [1], "target_modules": ["qv"]}), res,
             "lora.target_modules", "'q_proj'", "'query'", "'key'", "'value'", "'classifier'")


def test_lora_rank_above_a_target_layer(tmp_path: Path) -> None:
    res = tmp_path / "results"
    _refused(_study(res, methods=["lora"], lora={"r": [2, 4], "target_modules": [["net.0", "net.2"]]}), res,
             "lora.r", "[4]", "'net.2'", "min(16, 3)", "use r <= 3")


def test_encoder_on_a_causal_lm_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = tmp_path / "results"
    _refused(_study(res, model={"name": "minilm-l6"}, task="text/pydoc", methods=["full"]), res,
             "model.name", "'minilm-l6'", "bert encoder", "text/pydoc", "smollm2-135m", "glue/")


def test_decoder_on_a_causal_lm_task_passes_the_type_check(tmp_path: Path) -> None:
    from idlab.models import tiny_bert, tiny_llama
    from idlab.sweep.checks import check_model_task

    for name, model in (("llama", tiny_llama()), ("bert", tiny_bert())):
        model.config.save_pretrained(tmp_path / name)
    check_model_task(study_from_dict(_study(tmp_path, model={"name": str(tmp_path / "llama")}, task="text/pydoc")))
    with pytest.raises(ConfigError, match="bert encoder"):
        check_model_task(study_from_dict(_study(tmp_path, model={"name": str(tmp_path / "bert")}, task="text/pydoc")))


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE (tests run with it set), an empty Hugging Face cache."""
    import huggingface_hub.constants as c

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_hub_is_refused_in_seconds(tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub at a closed local port (no network involved): one try, then a refusal naming the ways out."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    res = tmp_path / "results"
    t0 = time.perf_counter()
    _refused(_study(res, model={"name": "idlab-test/no-such-model"}, task="text/pydoc", methods=["full"]), res,
             "model.name", "'idlab-test/no-such-model'", "cannot be reached", "HF_HUB_OFFLINE=1", "smollm2-135m",
             "minilm-l6", "local folder")
    assert time.perf_counter() - t0 < 15


def test_silent_hub_times_out(tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that accepts the connection and never answers: refused after the timeout, not a minute later."""
    import huggingface_hub.constants as c

    from idlab.sweep.checks import check_hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        study = study_from_dict(_study(tmp_path, model={"name": "idlab-test/no-such-model"}, task="text/pydoc"))
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=r"cannot be reached.*1 s timeout"):
            check_hub(study, timeout=1.0)
        assert time.perf_counter() - t0 < 10


def test_slurm_without_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    res = tmp_path / "results"
    _refused(_study(res, executor="slurm"), res, "executor", "sbatch", "PATH", "slurm.backend=local",
             "module load slurm")
    fake = empty / "sbatch"  # with sbatch on PATH the check passes
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    from idlab.sweep.executors import preflight

    assert "executor slurm" in preflight(study_from_dict(_study(res, executor="slurm")))
    assert not res.exists()


def test_idlab_sweep_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``idlab sweep smoke subspace.d=[100000]``: exit 2, the message names D = 2,410; nothing written."""
    from idlab.cli import main

    monkeypatch.chdir(REPO)
    res = tmp_path / "results"
    assert main(["sweep", "smoke", "subspace.d=[100000]", f"results_dir={res}"]) == 2
    err = capsys.readouterr().err
    assert "subspace.d" in err and "[100000]" in err and "D = 2,410" in err and "subspace.d=[2410]" in err
    assert not res.exists() and os.path.isdir(REPO / "experiments")


def test_idlab_plan_refuses_as_the_sweep_does(tmp_path: Path) -> None:
    from idlab.sweep.plan import plan_runs

    with pytest.raises(ConfigError, match=r"subspace\.d.*D = 195"):
        plan_runs(study_from_dict(_study(tmp_path, subspace={"d": [1000], "head": "project"})))


def test_said_with_d_auto_needs_one_grid_point_above_m(tmp_path: Path) -> None:
    """d: auto spans decades: SAID points at d <= m fail and are reported (DID keeps them) while one lies
    above m (gpu_study: m = 272, grid from 100); a grid entirely at or below m is refused."""
    from idlab.sweep.checks import check_model_shapes, study_model

    ok = study_from_dict(_study(tmp_path, subspace={"d": "auto", "auto_min": 1, "auto_max": 100, "said": [False, True],
                                                    "head": "project"}))
    check_model_shapes(ok, study_model(ok))
    res = tmp_path / "results"
    _refused(_study(res, subspace={"d": "auto", "auto_min": 1, "auto_max": 3, "auto_per_decade": 1,
                                   "said": [True], "head": "project"}), res,
             "subspace.auto_min", "auto_min=1", "m = 4", "use d >= 5")
