"""Run ids, atomic writes, completeness and cleanup of run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idlab.runs.store import (
    STALE_AFTER_S,
    RunStore,
    atomic_write_json,
    canonical_json,
    iter_result_files,
    read_json,
    run_id,
)

CFG = {"method": "lora", "r": 8, "lr": 0.0005, "seed": 0, "target_modules": ["q_proj", "v_proj"],
       "model": "smollm2-135m", "task": "glue/mrpc", "train": {"steps": 10, "batch_size": 8}}


def test_run_id_is_stable_across_processes_and_key_order() -> None:
    rid = run_id(CFG)
    assert len(rid) == 12 and int(rid, 16) >= 0
    assert run_id(dict(reversed(list(CFG.items())))) == rid
    code = ("import json,sys; from idlab.runs import run_id; "
            "print(run_id(json.loads(sys.argv[1])))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CFG)], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.strip() == rid
    # pinned: sha256 of the canonical JSON (changing the hash would orphan every stored result)
    import hashlib

    assert rid == hashlib.sha256(canonical_json(CFG).encode()).hexdigest()[:12]
    assert run_id({**CFG, "r": 16}) != rid and run_id({**CFG, "lr": 0.0005000001}) != rid


def test_atomic_write_json_leaves_no_temp_and_is_strict(tmp_path: Path) -> None:
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"v": float("nan"), "w": [1.0, float("inf")]})
    atomic_write_json(p, {"v": 2})
    assert read_json(p) == {"v": 2}
    assert sorted(os.listdir(p.parent)) == ["x.json"]
    atomic_write_json(p, {"v": float("nan")})
    assert json.loads(p.read_text()) == {"v": None}


def test_store_write_skip_retry_and_clean(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "study")
    assert not store.is_done("abc")
    store.write("abc", {"run_id": "abc", "status": "failed"}, None)
    assert not store.is_done("abc") and store.is_done("abc", retry_failed=False)

    def art(d: Path) -> None:
        (d / "delta.safetensors").write_bytes(b"x")

    store.write("abc", {"run_id": "abc", "status": "ok"}, art)
    assert store.is_done("abc") and (store.run_dir("abc") / "delta.safetensors").exists()
    # a crash inside the artifact writer leaves nothing behind
    def boom(d: Path) -> None:
        (d / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write("def", {"run_id": "def", "status": "ok"}, boom)
    assert not store.run_dir("def").exists()
    assert [p.name for p in store.runs_dir.iterdir()] == ["abc"]
    # leftovers of a killed process are cleaned, but only once they are old: a young temp
    # folder may be another sweep's run being written right now
    leftovers = [store.runs_dir / n for n in (".tmp-zzz-1-ab", ".trash-zzz-1-ab", "incomplete")]
    for p in leftovers:
        p.mkdir()
    assert store.clean_stale() == [] and all(p.exists() for p in leftovers)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(leftovers[0], (old, old))
    assert store.clean_stale() == [leftovers[0]]
    removed = store.clean_stale(min_age_s=0)
    assert len(removed) == 2 and [p.name for p in store.runs_dir.iterdir()] == ["abc"]
    assert [p.parent.name for p in iter_result_files(tmp_path)] == ["abc"]
