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


def test_an_unknown_backend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_to"):
        study_from_dict(raw(tmp_path, ["mlflow"]))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None or importlib.util.find_spec("trackio") is None,
                    reason="wandb / trackio are not installed (pip install idlab[tracking])")
def test_wandb_offline_and_trackio_stream_every_evaluation(tmp_path: Path) -> None:
    """Both through their own APIs in a real `idlab sweep` (a subprocess, so that each library reads its
    environment at import): wandb in offline mode writes its run file under the study folder, trackio
    its local SQLite database under TRACKIO_DIR; both hold the three evaluations, named by run id."""
    import json
    import sqlite3
    import subprocess
    import sys

    import yaml

    cfg = tmp_path / "tracked.yaml"
    cfg.write_text(yaml.safe_dump(raw(tmp_path / "res", ["wandb", "trackio"])))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    out = subprocess.run([sys.executable, "-m", "idlab.cli", "sweep", str(cfg)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    (rid, _), = expand(study_from_dict(raw(tmp_path / "res", [])))
    (wb,) = (tmp_path / "res" / "tracked" / "tensorboard" / "wandb").glob(f"offline-run-*-{rid}/run-{rid}.wandb")
    data = wb.read_bytes()  # protobuf records: a logged key is stored as its UTF-8 name in every history row
    assert data.count(b"eval/accuracy") >= 3 and data.count(b"train/loss") >= 3 and rid.encode() in data
    with sqlite3.connect(tmp_path / "trackio" / "tracked.db") as db:
        rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    assert [(name, step) for name, step, _ in rows] == [(rid, 4), (rid, 8), (rid, 12)]
    first = json.loads(rows[0][2])
    assert {"train/loss", "train/lr", "train/examples_per_s", "memory/peak_bytes", "eval/accuracy"} <= set(first)
    assert first["train/lr"] == pytest.approx(0.02)


@pytest.mark.parametrize("backend", ["wandb", "trackio", "tensorboard"])
def test_a_tracking_package_that_will_not_import_is_refused(tmp_path: Path, backend: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend whose package is missing (its spec hidden here, so the case runs where it is installed) is a
    ConfigError naming the extra, before anything is written."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backend else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install idlab\[tracking\]"):
        run_sweep(study_from_dict(raw(tmp_path, [backend])))
    assert not (tmp_path / "tracked").exists()
