"""experiments/li2018.py end to end at smoke size: resumable run folders, summary, figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mnist")  # the offline MNIST package (make install adds it)


def test_li2018_quick_dense_search_writes_summary_and_resumes(tmp_path: Path) -> None:
    from experiments import li2018

    argv = ["--quick", "--models", "lenet", "--projections", "dense", "--seeds", "0,1",
            "--d-start", "lenet=32", "--d-max", "128", "--rtol", "0.5", "--dense-cache-mb", "64", "--out", str(tmp_path)]
    li2018.main(argv)
    out = tmp_path / "quick"
    summary = json.loads((out / "lenet_dense.json").read_text())
    assert summary["projection"] == "dense" and summary["D"] == 44_426
    loc = summary["local"]
    assert loc["baseline_kind"] == "local" and len(loc["baseline_runs"]) == 2
    runs = sorted((out / "runs").glob("*/result.json"))  # one run folder each (idlab.runs.RunStore)
    assert len(runs) == summary["n_training_runs"]
    assert (out / "li2018.png").is_file()
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in runs}
    li2018.main(argv)  # every run is already there: nothing retrains
    assert {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*/result.json"))} == stamps
