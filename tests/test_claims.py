"""Run claims (issue "A study folder holds one experiment", part 2): two sweeps of one study at
once train every run exactly once; a claim whose owner is gone is taken over; live claims survive
`RunStore.clean_stale`; a run claimed elsewhere is pending, not failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from idlab.config import study_from_dict
from idlab.runs import RunStore
from idlab.runs.claims import (
    CLAIMED,
    Claim,
    ClaimInfo,
    acquire,
    claim_path,
    read_claim,
    stale_reason,
)
from idlab.sweep.driver import run_sweep
from idlab.sweep.execute import run_one
from idlab.sweep.grid import expand

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))


def counted_study(results: Path, seeds: list[int], **over: Any) -> dict[str, Any]:
    """tests/test_sweep.py's tiny study on the counting fixture task (full and LoRA runs)."""
    raw: dict[str, Any] = {
        "name": "tiny", "model": {"name": "mlp", "hidden": [16]},
        "task": "idlab_fixture_tasks:counted_blobs", "methods": ["full", "lora"],
        "full": {"lr": [0.01]}, "lora": {"r": [2], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
        "train": {"steps": 10, "batch_size": 32, "eval_every": 5, "optimizer": "adam"},
        "seeds": seeds, "results_dir": str(results), "device": "cpu",
    }
    raw.update(over)
    return raw


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def plant_claim(runs: Path, rid: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    path = claim_path(runs, rid)
    path.write_text(json.dumps({"run_id": rid, "host": host, "pid": pid, "started_at": "2024-01-01T00:00:00+00:00",
                                "token": "planted"}))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_a_claim_is_exclusive_and_released(tmp_path: Path) -> None:
    first = acquire(tmp_path, "abc", heartbeat_s=0)
    assert isinstance(first, Claim) and first.path.is_file()
    info = read_claim(first.path)
    assert info is not None and info.pid == os.getpid() and info.host and info.started_at
    second = acquire(tmp_path, "abc", heartbeat_s=0)  # this process is alive: the claim is live
    assert isinstance(second, ClaimInfo) and second.token == first.info.token
    first.release()
    assert not first.path.exists()
    again = acquire(tmp_path, "abc", heartbeat_s=0)
    assert isinstance(again, Claim)
    again.release()


def test_heartbeat_refreshes_the_claim(tmp_path: Path) -> None:
    claim = acquire(tmp_path, "hb", heartbeat_s=0.05)
    assert isinstance(claim, Claim)
    old = time.time() - 1000
    os.utime(claim.path, (old, old))
    time.sleep(0.5)
    assert claim.path.stat().st_mtime > old + 900
    claim.release()


def test_stale_claims_are_taken_over_with_a_notice(tmp_path: Path) -> None:
    import socket

    here = socket.gethostname()
    lines: list[str] = []
    plant_claim(tmp_path, "dead", here, dead_pid())
    got = acquire(tmp_path, "dead", lines.append, heartbeat_s=0)
    assert isinstance(got, Claim) and got.info.pid == os.getpid()
    assert len(lines) == 1 and "taking over run dead" in lines[0] and "is not running" in lines[0]
    got.release()
    # another host: live while its heartbeat is recent, taken over once older than the timeout
    plant_claim(tmp_path, "far", "some-other-node", 1, age_s=10)
    held = acquire(tmp_path, "far", lines.append, heartbeat_s=0, timeout_s=600)
    assert isinstance(held, ClaimInfo) and held.host == "some-other-node"
    plant_claim(tmp_path, "far2", "some-other-node", 1, age_s=3600)
    took = acquire(tmp_path, "far2", lines.append, heartbeat_s=0, timeout_s=600)
    assert isinstance(took, Claim) and "no heartbeat from host some-other-node" in lines[-1]
    took.release()
    # a claim file that never got its content is live for a grace period, then stale
    (tmp_path / ".claim-empty").write_text("")
    info = read_claim(tmp_path / ".claim-empty")
    assert info is not None and stale_reason(info) is None
    assert stale_reason(info, now=time.time() + 3600) is not None


def test_clean_stale_keeps_live_claims(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "study")
    claim = acquire(store.runs_dir, "live", heartbeat_s=0)
    assert isinstance(claim, Claim)
    old = time.time() - 10_000
    os.utime(claim.path, (old, old))
    store.clean_stale(min_age_s=0)
    assert claim.path.is_file() and store.live_claim("live") is not None
    claim.release()


def test_run_one_skips_a_run_held_elsewhere_and_the_summary_says_pending(tmp_path: Path) -> None:
    study = study_from_dict(counted_study(tmp_path, seeds=[0], methods=["full"]))
    (rid, cfg), = expand(study)
    store = RunStore(study.study_dir())
    holder = acquire(store.runs_dir, rid, heartbeat_s=0)  # a live process (this one) trains it
    assert isinstance(holder, Claim)
    assert run_one(str(study.study_dir()), study.name, rid, cfg, "cpu") == CLAIMED
    assert not store.run_dir(rid).exists()
    summary = run_sweep(study)
    assert not summary.failed and not summary.missing
    assert [r for r, _ in summary.pending] == [rid] and "claimed elsewhere by host" in summary.text()
    holder.release()
    assert run_one(str(study.study_dir()), study.name, rid, cfg, "cpu") == "ok"
    assert not claim_path(store.runs_dir, rid).exists()  # released once the folder is written


def test_two_concurrent_sweeps_train_every_run_once(tmp_path: Path) -> None:
    """Two `idlab sweep` processes on one study: every run trained exactly once, both exit 0, and
    a stale claim left by a dead process is taken over."""
    import socket

    raw = counted_study(tmp_path, seeds=[0, 1, 2])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    runs = expand(study_from_dict(raw))
    assert len(runs) == 6
    stale_rid = runs[-1][0]
    plant_claim(tmp_path / "tiny" / "runs", stale_rid, socket.gethostname(), dead_pid())
    counter = tmp_path / "trained.txt"
    env = {**os.environ, "IDLAB_FIXTURE_COUNTER": str(counter), "IDLAB_FIXTURE_SLEEP": "0.5"}
    cmd = [sys.executable, "-m", "idlab.cli", "sweep", str(cfg)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    wall = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    trained = Counter(counter.read_text().split())
    assert sum(trained.values()) == len(runs), (trained, outs)  # each run trained once, by one of the two
    for rid, _ in runs:
        res = json.loads((tmp_path / "tiny" / "runs" / rid / "result.json").read_text())
        assert res["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "tiny" / "runs").iterdir()) == sorted(r for r, _ in runs)
    stderr = "".join(err for _, err in outs)
    assert stderr.count(f"taking over run {stale_rid}") == 1 and "is not running" in stderr
    print(f"two sweeps: {len(runs)} runs trained once each (per process {dict(trained)}), "
          f"{stderr.count('claimed by')} skip(s) of a claimed run, wall {wall:.1f}s")
