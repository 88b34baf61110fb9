"""Published studies (`idlab keep`): git tracks the kept files, a large file left out is marked
``kept: false``, and a clone resumes (reruns nothing), reports and analyses without it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from idlab.cli import main
from idlab.config import study_from_dict
from idlab.report import make_report
from idlab.runs import RunStore
from idlab.runs.keep import keep_study
from idlab.runs.listing import list_runs
from idlab.runs.marks import KEEP_FILE
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand
from tests.test_artifacts import FIXTURES, _study

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "PATH": "/usr/bin:/bin:/usr/local/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          env=env, timeout=60).stdout


def _tracked(repo: Path) -> list[str]:
    """What ``git add -A`` stages in ``repo`` under the repository's own ignore files."""
    _git(repo, "add", "-A")
    return _git(repo, "ls-files").split()


@pytest.fixture()
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A tiny study (full, LoRA, subspace) swept and published with a limit that leaves out its largest
    Delta W file, inside a git repository carrying idlab's own .gitignore files."""
    monkeypatch.syspath_prepend(str(FIXTURES))
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    shutil.copy(REPO / "results" / ".gitignore", repo / "results" / ".gitignore")
    _git(repo, "init", "-q")
    study = study_from_dict(_study(repo / "results"))
    assert len(run_sweep(study, out=io.StringIO()).ok) == 3
    store = RunStore(study.study_dir())
    rids = {run.method: rid for rid, run in expand(study)}
    deltas = sorted((store.run_dir(r) / "delta.safetensors").stat().st_size for r in rids.values())
    assert deltas[-1] > deltas[-2]  # one delta is the largest: the limit leaves out that one
    big = next(m for m, r in rids.items() if (store.run_dir(r) / "delta.safetensors").stat().st_size == deltas[-1])
    summary = keep_study(study.study_dir(), max_file_mb=(deltas[-1] - 1) / 1e6)
    return {"repo": repo, "study": study, "rids": rids, "big": big, "summary": summary, "tmp": tmp_path}


def test_keep_marks_large_files_and_git_tracks_exactly_the_kept_ones(published: dict[str, Any]) -> None:
    repo, study, rids, big, summary = (published[k] for k in ("repo", "study", "rids", "big", "summary"))
    sdir = study.study_dir()
    left = f"runs/{rids[big]}/delta.safetensors"
    manifest = json.loads((sdir / KEEP_FILE).read_text())
    assert left in manifest["files"] and manifest["files"][left]["kept"] is False
    assert all(f["bytes"] > (published["summary"].max_file_mb * 1e6) for f in manifest["files"].values())
    # clutter that must stay untracked: in-flight writes, claims, checkpoints, logs, report outputs,
    # and a study nobody published
    for junk in ["runs/.tmp-x-1-ab/delta.safetensors", "runs/.trash-x/result.json", "runs/.claim-abc",
                 "runs/.ckpt-abc/state.pt", "slurm/123/log.out", "tensorboard/abc/events", "analysis/ranks.parquet"]:
        (sdir / junk).parent.mkdir(parents=True, exist_ok=True)
        (sdir / junk).write_text("x")
    for junk in ["summary.parquet", "REPORT.md", "figures/tiny/perf_vs_params.png", "analysis/tiny/ranks.parquet",
                 "unpublished/runs/abc/result.json"]:
        (repo / "results" / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / "results" / junk).write_text("x")
    tracked = _tracked(repo)
    in_study = [t for t in tracked if t.startswith("results/tiny/")]
    assert set(tracked) - set(in_study) == {".gitignore", "results/.gitignore"}
    assert f"results/tiny/{left}" not in in_study and "results/tiny/.gitignore" in in_study
    for rid in rids.values():
        assert f"results/tiny/runs/{rid}/result.json" in in_study
    assert f"results/tiny/runs/{rids['lora']}/adapter/adapter_model.safetensors" in in_study
    assert f"results/tiny/runs/{rids['subspace']}/subspace.safetensors" in in_study
    # the command's count is what git tracks
    assert summary.kept_files == len(in_study)
    assert summary.kept_bytes == sum((repo / t).stat().st_size for t in in_study)
    assert "!/tiny/" in (repo / "results" / ".gitignore").read_text().splitlines()


def _clone(published: dict[str, Any]) -> tuple[Path, Any]:
    """The tracked files only, copied into a fresh folder (what ``git clone`` gives), and the study there."""
    repo = published["repo"]
    clone = published["tmp"] / "clone"
    for rel in _tracked(repo):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, clone / rel)
    return clone, study_from_dict(_study(clone / "results"))


def test_a_clone_resumes_reports_and_notes_the_unkept_delta(
        published: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    clone, study = _clone(published)
    rid = published["rids"][published["big"]]
    store = RunStore(study.study_dir())
    assert not (store.run_dir(rid) / "delta.safetensors").exists()
    assert store.check(rid) == (store.result(rid), None) and store.is_done(rid)
    assert {r.status for r in list_runs(study.study_dir())} == {"ok"}
    out = io.StringIO()
    summary = run_sweep(study, out=out)
    assert summary.ran == 0 and len(summary.ok) == 3, out.getvalue()  # nothing retrained
    md = make_report(clone / "results")
    text = md.read_text()
    note = f"run {rid}: delta.safetensors not kept"
    assert sum(note in ln for ln in text.splitlines()) == 1 and "--remove --yes" in text
    assert (clone / "results" / "figures" / "tiny" / "perf_vs_params.png").is_file()
    import pandas as pd

    runs = pd.read_parquet(clone / "results" / "summary.parquet")
    assert rid in set(runs["run_id"]) and len(runs) == 3  # its point is drawn
    capsys.readouterr()
    assert main(["analyze", str(study.study_dir()), "--out", str(published["tmp"] / "tables")]) == 0
    printed = capsys.readouterr().out
    assert sum(note in ln for ln in printed.splitlines()) == 1
    # keep on the clone: the absent file stays left out whatever the limit
    again = keep_study(study.study_dir(), max_file_mb=100)
    assert [f.path for f in again.left_out] == [f.path for f in published["summary"].left_out]
    assert all("absent here" in f.why for f in again.left_out) and store.is_done(rid)


def test_a_missing_file_without_the_mark_is_still_a_broken_run(published: dict[str, Any]) -> None:
    _clone_dir, study = _clone(published)
    store = RunStore(study.study_dir())
    rids, big = published["rids"], published["big"]
    lora = store.run_dir(rids["lora"]) / "adapter" / "adapter_model.safetensors"
    lora.unlink()  # a kept file lost: no mark excuses it
    _, problem = store.check(rids["lora"])
    assert problem == "adapter/adapter_model.safetensors is missing"
    # a mark for another checksum (an older run) does not excuse the file either
    keep = study.study_dir() / KEEP_FILE
    original = keep.read_text()
    manifest = json.loads(original)
    key = f"runs/{rids[big]}/delta.safetensors"
    manifest["files"][key]["sha256"] = "0" * 64
    keep.write_text(json.dumps(manifest))
    assert store.check(rids[big])[1] == "delta.safetensors is missing"
    keep.write_text("{not json")
    problem = store.check(rids[big])[1] or ""
    assert "is missing, and" in problem and "not a keep manifest" in problem and "git checkout" in problem
    assert main(["keep", str(study.study_dir())]) == 2  # refuses to overwrite a broken manifest
    keep.write_text(original)
    out = io.StringIO()
    summary = run_sweep(study, out=out)
    assert summary.ran == 1 and len(summary.ok) == 3
    assert f"run {rids['lora']} is pending again: adapter/adapter_model.safetensors is missing" in out.getvalue()


def test_leave_out_patterns_and_the_study_budget(published: dict[str, Any]) -> None:
    repo, study, rids = published["repo"], published["study"], published["rids"]
    sdir = study.study_dir()
    before = (sdir / KEEP_FILE).read_text()
    with pytest.raises(ValueError, match=r"over --max-study-mb .*nothing written.*--leave-out 'adapter/\*'"):
        keep_study(sdir, max_study_mb=0.001)
    assert (sdir / KEEP_FILE).read_text() == before
    summary = keep_study(sdir, leave_out=["adapter/*"])
    adapter = f"runs/{rids['lora']}/adapter/adapter_model.safetensors"
    assert adapter in {f.path for f in summary.left_out}
    assert f"results/tiny/{adapter}" not in _tracked(repo)
    assert main(["keep", str(sdir), "--max-file-mb", "0"]) == 2
