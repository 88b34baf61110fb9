"""A study folder holds one experiment (issue "A study folder holds one experiment", part 1).

The first sweep records the study's settings (model, task, train, target, score; not the grid,
seeds or executor) in ``<study>/settings.json``; a sweep with other settings is refused before
anything is written unless ``--allow-mixed``; the report never pools runs of different settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from idlab.cli import main
from idlab.config import study_from_dict
from idlab.config.settings import study_settings
from idlab.errors import ConfigError
from idlab.report import load_results, make_report
from idlab.sweep.driver import run_sweep
from tests.test_sweep import FIXTURES, tiny_study


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def _study(tmp: Path, **over: Any) -> Any:
    return study_from_dict(tiny_study(tmp, **{"methods": ["full"], "seeds": [0], **over}))


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: (mtime, sha256)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _recorded(study_dir: Path) -> list[dict[str, Any]]:
    sets: list[dict[str, Any]] = json.loads((study_dir / "settings.json").read_text())["settings"]
    return sets


def test_settings_are_everything_but_the_grid_seeds_and_where_runs_execute(tmp_path: Path) -> None:
    s = study_settings(_study(tmp_path, methods=["full", "lora"], seeds=[0, 1, 2], executor="local"))
    assert s["model.name"] == "mlp" and s["model.hidden"] == [16] and s["task.name"] == "idlab_fixture_tasks:blobs"
    assert s["train.steps"] == 15 and s["train.optimizer"] == "adam" and s["train.precision"] == "auto"
    assert s["target.threshold"] == 0.9 and s["score"] == "final"
    for key in ("name", "description", "methods", "seeds", "executor", "device", "gpus", "progress",
                "retry_failed", "results_dir", "train.lr", "train.seed", "train.device", "train.progress"):
        assert key not in s
    assert not any(k.split(".")[0] in ("slurm", "full", "lora", "subspace") for k in s)


def test_a_sweep_with_other_settings_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run_sweep(_study(tmp_path))
    study_dir = tmp_path / "tiny"
    (rec,) = _recorded(study_dir)
    assert rec == study_settings(_study(tmp_path)) and rec["model.hidden"] == [16]
    before = _snapshot(study_dir)
    with pytest.raises(ConfigError) as e:
        run_sweep(_study(tmp_path, model={"name": "mlp", "hidden": [4]},
                         train={"steps": 10, "batch_size": 32, "eval_every": 5, "optimizer": "adam"}))
    msg = str(e.value)
    assert "model.hidden: [16] in the folder, [4] in this sweep" in msg
    assert "train.steps: 15 in the folder, 10 in this sweep" in msg
    assert "name=" in msg and "--allow-mixed" in msg
    assert _snapshot(study_dir) == before  # nothing written: no run, no study.json, no settings.json


def test_new_seeds_grid_values_methods_and_learning_rates_are_allowed(tmp_path: Path) -> None:
    run_sweep(_study(tmp_path, methods=["lora"], lora={"r": [1], "target_modules": [["net.0", "net.2"]],
                                                       "lr": [0.02]}))
    more = _study(tmp_path, methods=["lora"], seeds=[0, 1], description="more", retry_failed=False,
                  lora={"r": [1, 3], "target_modules": [["net.0", "net.2"]], "lr": [0.02, 0.05]})
    summary = run_sweep(more)
    assert summary.total == 8 and summary.ran == 7 and not summary.missing
    assert len(_recorded(tmp_path / "tiny")) == 1


def test_allow_mixed_through_the_cli_and_the_report_keeps_the_groups_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_study(tmp_path / "results", methods=["full"], seeds=[0, 1])))
    assert main(["sweep", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["sweep", str(cfg), "model.hidden=[4]"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden: [16] in the folder, [4] in this sweep" in err and "--allow-mixed" in err
    assert main(["sweep", str(cfg), "model.hidden=[4]", "--allow-mixed"]) == 0
    study_dir = tmp_path / "results" / "tiny"
    assert [s["model.hidden"] for s in _recorded(study_dir)] == [[16], [4]]
    assert main(["sweep", str(cfg), "model.hidden=[4]"]) == 0  # its settings are recorded now: a resume is fine

    md = make_report(tmp_path / "results", out_dir=tmp_path / "report", analysis=False, formats=("png",))
    cells = pd.read_parquet(tmp_path / "report" / "cells.parquet")
    assert len(cells) == 2  # one full fine-tuning cell per setting group, not one cell of 4 seeds
    assert sorted(cells["setting_model.hidden"]) == ["[16]", "[4]"]
    assert list(cells["n_seeds"]) == [2, 2] and list(cells["seeds"]) == ["0,1", "0,1"]
    text = md.read_text()
    assert "**This study holds 2 setting groups" in text
    assert "**mlp** (hidden=[16]) and **mlp** (hidden=[4])" in text
    assert text.count("Baseline ") == 2 and "(g1: model.hidden=[16])" in text and "(g2: model.hidden=[4])" in text
    for hidden in ("[16]", "[4]"):  # each group's baseline is its own cell's mean
        mean = float(cells.loc[cells["setting_model.hidden"] == hidden, "mean"].iloc[0])
        assert f"Baseline {mean:.4f} (local: full FT mean of 2 seed(s))" in text


def test_summary_has_a_column_per_setting(tmp_path: Path) -> None:
    run_sweep(_study(tmp_path, task={"name": "idlab_fixture_tasks:blobs", "max_train": 96}))
    make_report(tmp_path, out_dir=tmp_path / "report", analysis=False, formats=("png",))
    for df in (load_results(tmp_path), pd.read_parquet(tmp_path / "report" / "summary.parquet")):
        row = df.iloc[0]
        assert row["setting_model.name"] == "mlp" and row["setting_model.hidden"] == "[16]"
        assert row["setting_model.dtype"] == "float32" and row["setting_task.max_train"] == 96
        assert row["setting_task.name"] == "idlab_fixture_tasks:blobs" and row["setting_train.steps"] == 15
        assert row["setting_train.optimizer"] == "adam" and row["setting_train.batch_size"] == 32
        assert "setting_train.lr" not in df and "setting_train.seed" not in df


def test_an_old_folder_without_a_settings_file_is_checked_from_its_runs(tmp_path: Path) -> None:
    run_sweep(_study(tmp_path))
    study_dir = tmp_path / "tiny"
    (study_dir / "settings.json").unlink()  # a folder written before settings.json
    (study_dir / "study.json").unlink()
    before = _snapshot(study_dir)
    with pytest.raises(ConfigError) as e:
        run_sweep(_study(tmp_path, model={"name": "mlp", "hidden": [4]}))
    assert "read from the runs it holds" in str(e.value) and "model.hidden: [16] in the folder, [4]" in str(e.value)
    assert _snapshot(study_dir) == before
    run_sweep(_study(tmp_path, seeds=[0, 1]))  # the same settings: allowed, and the record is written
    assert _recorded(study_dir) == [study_settings(_study(tmp_path))]
