"""Housekeeping (issue "A study folder holds one experiment", part 4): `idlab runs` lists and removes
runs, `idlab report` refuses a missing folder, unwritable folders are one line (exit 2), the C++
kernel's first build is announced and kept out of a run's time, the API honours $IDLAB_GLUE_DIR,
`find_d90` prints progress."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from idlab.cli import main
from idlab.config import study_from_dict
from idlab.errors import NotWritableError
from idlab.runs import RunResult, RunStore
from idlab.runs.claims import claim_path
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def tiny(results: Path, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "tiny", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
        "methods": ["full", "lora", "subspace"], "full": {"lr": [0.01]},
        "lora": {"r": [1, 3], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
        "subspace": {"d": [8], "projection": ["dense"], "head": "project", "lr": [0.05]},
        "train": {"steps": 5, "batch_size": 32, "eval_every": 5, "optimizer": "adam"},
        "seeds": [0], "results_dir": str(results), "device": "cpu",
    }
    raw.update(over)
    return raw


def fake_study(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A study folder with an ok, a diverged, a failed run, a live and a stale claim (no training)."""
    study = study_from_dict(tiny(tmp_path))
    runs = expand(study)
    store = RunStore(study.study_dir())
    (full, cf), (lora1, c1), (lora3, c3), (sub, _cs) = runs
    store.write(full, RunResult(run_id=full, status="ok", config=cf.to_dict(), wall_time_s=1.5,
                                metrics={"accuracy": 0.9}))
    store.write(lora1, RunResult(run_id=lora1, status="failed", config=c1.to_dict(), wall_time_s=0.2,
                                 error="RuntimeError: boom\nsecond line"))
    store.write(lora3, RunResult(run_id=lora3, status="diverged", config=c3.to_dict(), wall_time_s=0.3,
                                 error="loss is nan"))
    (store.study_dir / "study.json").write_text(json.dumps({"runs": {rid: c.to_dict() for rid, c in runs}}))
    claim_path(store.runs_dir, sub).write_text(json.dumps(
        {"run_id": sub, "host": socket.gethostname(), "pid": os.getpid(), "started_at": "now", "token": "t"}))
    claim_path(store.runs_dir, "feedfeedfeed").write_text(json.dumps(
        {"run_id": "feedfeedfeed", "host": "elsewhere", "pid": 1, "started_at": "then", "token": "u"}))
    old = time.time() - 100_000
    os.utime(claim_path(store.runs_dir, "feedfeedfeed"), (old, old))
    return store.study_dir, {"ok": full, "failed": lora1, "diverged": lora3, "claimed": sub}


def test_idlab_runs_lists_filters_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study_dir, ids = fake_study(tmp_path)
    assert main(["runs", str(study_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run_id", "status", "method", "cell", "lr", "seed", "wall", "error"]
    row = next(ln for ln in lines if ln.startswith(ids["failed"]))
    assert "failed" in row and "r=1" in row and "RuntimeError: boom" in row and "second line" not in row
    assert "1.5s" in next(ln for ln in lines if ln.startswith(ids["ok"]))
    assert "claimed by host" in next(ln for ln in lines if ln.startswith(ids["claimed"]))
    assert "stale" in next(ln for ln in lines if ln.startswith("feedfeedfeed"))
    assert "5 run(s): 1 ok, 1 diverged, 1 failed, 1 claimed, 1 stale" in out
    assert main(["runs", str(study_dir), "--status", "failed,diverged", "--json"]) == 0
    df = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert sorted(df["status"]) == ["diverged", "failed"] and set(df["method"]) == {"lora"}
    assert {"run_id", "status", "method", "cell", "seed", "wall_time_s", "error"} <= set(df.columns)
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_idlab_runs_removes_failed_after_confirmation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    study_dir, ids = fake_study(tmp_path)
    runs = study_dir / "runs"
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["runs", str(study_dir), "--remove"]) == 1  # declined: nothing removed
    assert (runs / ids["failed"]).is_dir()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["runs", str(study_dir), "--remove"]) == 0  # default selection: the failed runs
    assert not (runs / ids["failed"]).exists() and (runs / ids["diverged"]).is_dir() and (runs / ids["ok"]).is_dir()
    assert not any(p.name.startswith(".trash-") for p in runs.iterdir())
    # by run id (prefix), without asking; a live claim is never removed, a stale one is
    assert main(["runs", str(study_dir), ids["diverged"][:6], ids["claimed"], "feedfeed", "--remove", "--yes"]) == 0
    captured = capsys.readouterr()
    assert "removed 2 run(s)" in captured.out and f"kept {ids['claimed']}" in captured.err
    assert not (runs / ids["diverged"]).exists() and not claim_path(runs, "feedfeedfeed").exists()
    assert claim_path(runs, ids["claimed"]).is_file() and (runs / ids["ok"]).is_dir()


def test_report_on_a_missing_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_results_here"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert not missing.exists()


def test_unwritable_folders_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    raw = tiny(blocker / "results", methods=["full"])
    with pytest.raises(NotWritableError, match="results_dir="):
        run_sweep(study_from_dict(raw))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker / "results" / "tiny") in err and "Traceback" not in err
    (tmp_path / "results").mkdir()
    assert main(["report", str(tmp_path / "results"), "--out", str(blocker / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker / "report") in err and "--out" in err
    if os.geteuid() != 0:  # root writes anywhere: the permission case only bites other users
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(NotWritableError, match="not writable"):
            run_sweep(study_from_dict(tiny(ro, methods=["full"])))


def test_kernel_build_is_announced_once_and_not_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The first build (~30 s) runs in `Method.warm_up` before the run's clock, announced on stderr."""
    from idlab.subspace import _kernels, hadamard
    from idlab.sweep.execute import execute_run

    real_build = _kernels.build

    def slow_build() -> Any:
        time.sleep(1.5)
        return real_build()

    monkeypatch.setattr(hadamard, "_resolved", None)
    monkeypatch.setattr(hadamard, "_requested", None)
    monkeypatch.setattr(hadamard, "_module", None)
    monkeypatch.setattr(_kernels, "is_cached", lambda: False)
    monkeypatch.setattr(_kernels, "build", slow_build)
    study = study_from_dict(tiny(tmp_path, methods=["subspace"]))
    (rid, cfg), = expand(study)
    t0 = time.perf_counter()
    res, _ = execute_run(cfg, rid, "tiny", device="cpu")
    elapsed = time.perf_counter() - t0
    assert res.status == "ok", res.error
    assert res.wall_time_s is not None and res.wall_time_s <= elapsed - 1.4  # the build is not in it
    execute_run(cfg, rid, "tiny", device="cpu")  # built: no second notice
    err = capsys.readouterr().err
    assert err.count("building the idlab C++ kernel (once, ~30 s; cached in") == 1


def test_api_honours_idlab_glue_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.data.glue import glue_data_dir, load_glue_split

    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "dev.tsv").write_text("sentence\tlabel\ngood film \t1\nbad film \t0\n")
    monkeypatch.setenv("IDLAB_GLUE_DIR", str(tmp_path / "glue"))
    split = load_glue_split("sst2", "validation")  # no data_dir: $IDLAB_GLUE_DIR, not `datasets`
    assert split.text_a == ["good film", "bad film"] and split.labels == [1, 0]
    assert glue_data_dir(None) == (tmp_path / "glue", "$IDLAB_GLUE_DIR")
    assert glue_data_dir(tmp_path) == (tmp_path, "data_dir")  # an explicit folder wins
    monkeypatch.setenv("IDLAB_GLUE_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$IDLAB_GLUE_DIR"):
        load_glue_split("sst2", "validation")
    monkeypatch.delenv("IDLAB_GLUE_DIR")
    assert glue_data_dir(None) == (None, "datasets")


def test_find_d90_prints_one_line_per_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    from idlab import find_d90

    res = find_d90(lambda d, seed: min(1.0, d / 100), baseline=1.0, seeds=(0, 1), d_start=16, d_max=256)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("find_d90:")]
    assert len(lines) == res.n_evaluations > 0
    assert lines[0].startswith("find_d90: d=16, seed=0, score=0.1600 (1 of 2 at this d")
    find_d90(lambda d, seed: min(1.0, d / 100), baseline=1.0, seeds=(0,), d_start=16, progress=False)
    assert "find_d90:" not in capsys.readouterr().err
