"""Experiment tracking (``train.log_to``, issue "Long runs beyond one device", part 4): TensorBoard
streams each evaluation's loss, learning rate, metrics, throughput and memory, named by study and
run id; a backend whose package is missing is a ConfigError naming ``pip install idlab[tracking]``
before anything is written."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from idlab.config import ConfigError, study_from_dict
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))


def raw(results: Path, log_to: list[str]) -> dict[str, object]:
    return {"name": "tracked", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
            "methods": ["lora"], "lora": {"r": [2], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
            "train": {"steps": 12, "batch_size": 32, "eval_every": 4, **({"log_to": log_to} if log_to else {})},
            "seeds": [0], "results_dir": str(results), "device": "cpu"}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed (pip install idlab[tracking])")
def test_tensorboard_streams_every_evaluation(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = study_from_dict(raw(tmp_path, ["tensorboard"]))
    untracked = study_from_dict(raw(tmp_path, []))
    assert [r for r, _ in expand(study)] == [r for r, _ in expand(untracked)]  # tracking keeps the run id
    run_sweep(study)
    (rid, _), = expand(study)
    acc = EventAccumulator(str(tmp_path / "tracked" / "tensorboard" / rid))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/examples_per_s", "memory/peak_bytes", "eval/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [4, 8, 12]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([0.02] * 3)


@pytest.mark.parametrize("backend", ["wandb", "trackio", "tensorboard"])
def test_a_missing_tracking_package_is_refused_before_anything_is_written(tmp_path: Path, backend: str) -> None:
    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed here")
    with pytest.raises(ConfigError, match=r"pip install idlab\[tracking\]"):
        run_sweep(study_from_dict(raw(tmp_path, [backend])))
    assert not (tmp_path / "tracked").exists()


def test_an_unknown_backend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_to"):
        study_from_dict(raw(tmp_path, ["mlflow"]))
