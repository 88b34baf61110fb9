"""A run is done only when its files are whole: manifest in result.json, reruns, report skips."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from idlab.config import study_from_dict
from idlab.report import make_report
from idlab.runs import ARTIFACTS_KEY, RunStore, artifact_problem, file_sha256, safetensors_problem
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _study(root: Path) -> dict[str, Any]:
    return {"name": "tiny", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
            "methods": ["full", "lora", "subspace"], "full": {"lr": [0.01]},
            "lora": {"r": [2], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
            "subspace": {"d": [8], "projection": ["dense"], "head": "project", "lr": [0.05]},
            "train": {"steps": 10, "batch_size": 32, "eval_every": 5, "optimizer": "adam"},
            "seeds": [0], "results_dir": str(root), "device": "cpu"}


@pytest.fixture()
def swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    monkeypatch.syspath_prepend(str(FIXTURES))
    study = study_from_dict(_study(tmp_path))
    assert len(run_sweep(study, out=io.StringIO()).ok) == 3
    return tmp_path, study


def test_result_json_lists_every_file_with_size_and_sha256(swept: tuple[Path, Any]) -> None:
    _root, study = swept
    store = RunStore(study.study_dir())
    for rid, run in expand(study):
        res = store.result(rid)
        assert res is not None
        listed = {e["path"]: e for e in res.to_dict()[ARTIFACTS_KEY]}
        d = store.run_dir(rid)
        files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"result.json"}
        assert set(listed) == files and "delta.safetensors" in files
        for name, e in listed.items():
            assert e["bytes"] == (d / name).stat().st_size and e["sha256"] == file_sha256(d / name)
            # every file of a run, subspace.safetensors included, has the same permissions
            assert stat.S_IMODE((d / name).stat().st_mode) == stat.S_IMODE((d / "result.json").stat().st_mode)
        assert ("subspace.safetensors" in files) == (run.method == "subspace")
        assert artifact_problem(d, res) is None and store.is_done(rid)


def test_a_truncated_delta_is_rerun_and_the_sweep_says_why(swept: tuple[Path, Any]) -> None:
    _root, study = swept
    store = RunStore(study.study_dir())
    rid = next(rid for rid, run in expand(study) if run.method == "lora")
    delta = store.run_dir(rid) / "delta.safetensors"
    size = delta.stat().st_size
    with open(delta, "r+b") as f:
        f.truncate(size // 2)
    assert not store.is_done(rid)
    _, problem = store.check(rid)
    assert problem is not None and "delta.safetensors" in problem and str(size // 2) in problem
    out = io.StringIO()
    summary = run_sweep(study, out=out)
    assert summary.ran == 1 and len(summary.ok) == 3
    assert f"run {rid} is pending again: delta.safetensors has {size // 2} bytes" in out.getvalue()
    assert delta.stat().st_size == size and store.is_done(rid)


def test_a_corrupt_byte_of_the_same_size_is_caught_by_the_checksum(swept: tuple[Path, Any]) -> None:
    _root, study = swept
    store = RunStore(study.study_dir())
    rid = next(rid for rid, run in expand(study) if run.method == "subspace")
    f = store.run_dir(rid) / "subspace.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    _, problem = store.check(rid)
    assert problem == "subspace.safetensors: sha256 differs from result.json (corrupt)"


def test_report_skips_a_broken_run_with_one_warning_and_still_writes(
        swept: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, study = swept
    store = RunStore(study.study_dir())
    rid = next(rid for rid, run in expand(study) if run.method == "lora")
    delta = store.run_dir(rid) / "delta.safetensors"
    with open(delta, "r+b") as f:
        f.truncate(100)
    md = make_report(root, tmp_path / "out")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "skipping run" in ln]
    assert len(lines) == 1 and rid in lines[0] and str(delta) in lines[0]
    text = md.read_text()
    assert md.is_file() and f"missing `{rid}`" in text  # named as missing, the rest reported


def test_results_from_before_the_manifest_are_checked_for_whole_safetensors(swept: tuple[Path, Any]) -> None:
    _root, study = swept
    store = RunStore(study.study_dir())
    rid = next(rid for rid, run in expand(study) if run.method == "full")
    d = store.run_dir(rid)
    res = json.loads((d / "result.json").read_text())
    legacy = {k: v for k, v in res.items() if k != ARTIFACTS_KEY}
    assert artifact_problem(d, legacy) is None
    assert safetensors_problem(d / "delta.safetensors") is None
    size = (d / "delta.safetensors").stat().st_size
    with open(d / "delta.safetensors", "r+b") as f:
        f.truncate(size - 1)
    assert "truncated" in (artifact_problem(d, legacy) or "")


def test_analyze_skips_a_broken_run_with_one_warning(swept: tuple[Path, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`idlab analyze` reads run folders through the same check: a truncated delta is named, not loaded."""
    from idlab.analysis.export import analyze_runs

    _root, study = swept
    store = RunStore(study.study_dir())
    rid = next(rid for rid, run in expand(study) if run.method == "lora")
    delta = store.run_dir(rid) / "delta.safetensors"
    with open(delta, "r+b") as f:
        f.truncate(100)
    tables = analyze_runs([study.study_dir()], tmp_path / "tables", pairs="none")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "skipping run" in ln]
    assert len(lines) == 1 and rid in lines[0] and "delta.safetensors" in lines[0]
    assert rid not in set(tables["ranks"]["run_id"]) and len(tables["ranks"]) > 0
