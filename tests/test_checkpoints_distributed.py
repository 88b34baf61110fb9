"""Long runs beyond one device (issue "Long runs beyond one device", parts 1-3): mid-run checkpoints
that a run killed with kill -9 resumes from, bit-identical on the CPU; one run on 2 processes
(torchrun, gloo) giving the 1-process loss curve and Delta W within float tolerance for full
fine-tuning (FSDP2), LoRA (DDP) and SAID (DDP); the refusals before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from idlab.config import ConfigError, study_from_dict
from idlab.runs import RunStore
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]

#: 2-process runs against 1-process runs (fp32, gloo): the loss and Delta W agree to float32 rounding
LOSS_TOL = 1e-5
DELTA_TOL = 1e-5


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), str(REPO), os.environ.get("PYTHONPATH", "")]))


def study(results: Path, methods: list[str], **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "long", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
        "methods": methods, "full": {"lr": [0.01]},
        "lora": {"r": [2], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
        "subspace": {"d": [20], "lr": [0.05], "said": [True]},
        "train": {"steps": 12, "batch_size": 32, "eval_every": 4, "optimizer": "adamw"},
        "seeds": [0], "results_dir": str(results), "device": "cpu",
    }
    for k, v in over.items():
        if k == "train":
            raw["train"] = {**raw["train"], **v}
        else:
            raw[k] = v
    return raw


def results(results_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in (results_dir / "long" / "runs").glob("*/result.json")}


# --------------------------------------------------------------------------- checkpoints


def test_a_run_killed_with_kill_9_resumes_bit_identical(tmp_path: Path) -> None:
    train = {"steps": 40, "batch_size": 16, "eval_every": 10, "checkpoint_every": 10}
    raw = study(tmp_path / "killed", ["full"], task="idlab_fixture_tasks:slow_blobs", train=train)
    code = f"from idlab.config import study_from_dict; from idlab.sweep.driver import run_sweep; " \
           f"run_sweep(study_from_dict({raw!r}))"
    env = {**os.environ, "IDLAB_FIXTURE_STEP_SLEEP": "0.1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    runs = tmp_path / "killed" / "long" / "runs"
    deadline, step = time.time() + 120, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            metas = list(runs.glob(".ckpt-*/meta.json")) if runs.is_dir() else []
            if metas:
                step = json.loads(metas[0].read_text())["step"]
                if step >= 10:
                    break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 10 <= step < 40, f"the kill did not land mid-run (checkpoint step {step})"
    assert not list(runs.glob("*/result.json"))
    rid = expand(study_from_dict(raw))[0][0]
    assert (runs / f".ckpt-{rid}").is_dir()
    RunStore(runs.parent).clean_stale(min_age_s=0)  # the sweep's housekeeping keeps the checkpoint
    assert (runs / f".ckpt-{rid}" / "checkpoint.pt").is_file()

    run_sweep(study_from_dict(raw))  # the same sweep again: resumes
    resumed = results(tmp_path / "killed")[rid]
    assert resumed["status"] == "ok" and resumed["resumed_from"] >= 10
    assert not (runs / f".ckpt-{rid}").exists()  # removed once the run is written ok

    run_sweep(study_from_dict(study(tmp_path / "whole", ["full"], task="idlab_fixture_tasks:slow_blobs",
                                    train=train)))
    whole = results(tmp_path / "whole")[rid]
    assert "resumed_from" not in whole
    assert resumed["metrics"] == whole["metrics"] and resumed["curve"] == whole["curve"]
    from safetensors.torch import load_file

    delta = "long/runs/" + rid + "/delta.safetensors"
    a, b = load_file(str(tmp_path / "killed" / delta)), load_file(str(tmp_path / "whole" / delta))
    assert set(a) == set(b) and a
    # the tensors' bytes (the file's header orders its metadata keys per process: safetensors' hash map)
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def test_keep_checkpoints_and_the_run_id(tmp_path: Path) -> None:
    plain = study_from_dict(study(tmp_path, ["lora"]))
    kept = study_from_dict(study(tmp_path, ["lora"], train={"checkpoint_every": 5, "keep_checkpoints": True}))
    assert [r for r, _ in expand(plain)] == [r for r, _ in expand(kept)]  # how a run executes: same run id
    run_sweep(kept)
    rid = expand(kept)[0][0]
    folder = tmp_path / "long" / "runs" / f".ckpt-{rid}"
    assert json.loads((folder / "meta.json").read_text()) == {"run_id": rid, "step": 10}


def test_checkpoints_by_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.checkpoint_every_min: a checkpoint whenever that much training time has passed since the last
    one (a clock that advances 1 minute per step here, so every 3rd step at 2.5 minutes); it keeps the run
    id and the numbers of the run without checkpoints."""
    from idlab.training import checkpoint as ckpt_mod

    clock = iter(range(0, 10_000, 60))
    monkeypatch.setattr(ckpt_mod, "_clock", lambda: float(next(clock)))
    saved: list[int] = []
    real_save = ckpt_mod.save
    monkeypatch.setattr(ckpt_mod, "save", lambda spec, state, write=True: (saved.append(state["step"]),
                                                                           real_save(spec, state, write=write))[1])
    timed = study_from_dict(study(tmp_path / "t", ["lora"], train={"checkpoint_every_min": 2.5,
                                                                    "keep_checkpoints": True}))
    plain = study_from_dict(study(tmp_path / "p", ["lora"]))
    assert [r for r, _ in expand(plain)] == [r for r, _ in expand(timed)]
    run_sweep(timed)
    assert saved == [4, 7, 10]  # minute 0 at step 1; due at minutes >= 2.5 after each save (steps 4, 7, 10)
    run_sweep(plain)
    rid = expand(timed)[0][0]
    assert results(tmp_path / "t")[rid]["curve"] == results(tmp_path / "p")[rid]["curve"]
    with pytest.raises(ConfigError, match="checkpoint_every_min"):
        study_from_dict(study(tmp_path, ["lora"], train={"checkpoint_every_min": 0}))


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    s = study_from_dict(study(tmp_path, ["full"], train={"checkpoint_every": 5}))
    rid = expand(s)[0][0]
    folder = tmp_path / "long" / "runs" / f".ckpt-{rid}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"run_id": "0123456789ab", "step": 5}))
    (folder / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="another config"):
        run_sweep(s)
    assert sorted(p.name for p in (tmp_path / "long").iterdir()) == ["runs"]
    assert [p.name for p in (tmp_path / "long" / "runs").iterdir()] == [f".ckpt-{rid}"]


# --------------------------------------------------------------------------- distributed


def _gloo() -> str | None:
    import importlib.util

    if importlib.util.find_spec("torch.distributed.run") is None or not torch.distributed.is_available():
        return "torch.distributed (torchrun) is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def _compare(tmp_path: Path, methods: list[str], **over: Any) -> dict[str, str]:
    """Run ``methods`` on 1 process and on 2 (torchrun, gloo); assert the loss curves and Delta W agree;
    return each method's strategy."""
    from safetensors.torch import load_file

    run_sweep(study_from_dict(study(tmp_path / "one", methods, **over)))
    run_sweep(study_from_dict(study(tmp_path / "two", methods, executor="torchrun", nproc_per_node=2, **over)))
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert set(one) == set(two) and len(one) == len(methods)
    strategies = {}
    for rid, a in one.items():
        b = two[rid]
        assert b["status"] == "ok", b.get("error")
        method = a["config"]["method"]
        strategies[method] = b["distributed"]["strategy"]
        assert b["distributed"]["world_size"] == 2 and b["distributed"]["backend"] == "gloo"
        assert "distributed" not in a
        la, lb = [c["train_loss"] for c in a["curve"]], [c["train_loss"] for c in b["curve"]]
        assert len(la) == len(lb) >= 2
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < LOSS_TOL, (method, la, lb)
        da = load_file(str(tmp_path / "one" / "long" / "runs" / rid / "delta.safetensors"))
        db = load_file(str(tmp_path / "two" / "long" / "runs" / rid / "delta.safetensors"))
        assert set(da) == set(db) and da
        for k in da:
            torch.testing.assert_close(db[k], da[k], atol=DELTA_TOL, rtol=0)
    return strategies


@pytest.mark.skipif(_gloo() is not None, reason=str(_gloo()))
def test_two_processes_give_the_one_process_numbers_lora_and_said(tmp_path: Path) -> None:
    assert _compare(tmp_path, ["lora", "subspace"]) == {"lora": "ddp", "subspace": "ddp"}


@pytest.mark.skipif(_gloo() is not None, reason=str(_gloo()))
def test_two_processes_give_the_one_process_numbers_full_fsdp2_tiny_llama(tmp_path: Path) -> None:
    """Full fine-tuning of a tiny Llama under FSDP2: each decoder layer sharded, then the root."""
    assert _compare(tmp_path, ["full"], model={"name": "idlab_fixture_tasks:tiny_llama_model"},
                    task="idlab_fixture_tasks:random_lm", full={"lr": [0.001]},
                    train={"steps": 6, "batch_size": 8, "eval_every": 3}) == {"full": "fsdp2"}


@pytest.mark.skipif(_gloo() is not None, reason=str(_gloo()))
def test_fsdp2_on_one_process_through_torchrun(tmp_path: Path) -> None:
    """executor=torchrun nproc_per_node=1 train.distributed=fsdp2 (the issue's world-size-1 FSDP2 measurement):
    torchrun starts the one process, so FSDP2 has its process group; the numbers are the plain run's."""
    over = {"model": {"name": "idlab_fixture_tasks:tiny_llama_model"}, "task": "idlab_fixture_tasks:random_lm",
            "full": {"lr": [0.001]}, "train": {"steps": 4, "batch_size": 8, "eval_every": 2}}
    run_sweep(study_from_dict(study(tmp_path / "plain", ["full"], **over)))
    run_sweep(study_from_dict(study(tmp_path / "fsdp", ["full"], executor="torchrun", nproc_per_node=1,
                                    **{**over, "train": {**over["train"], "distributed": "fsdp2"}})))
    (rid, a), = results(tmp_path / "plain").items()
    b = results(tmp_path / "fsdp")[rid]
    assert b["status"] == "ok", b.get("error")
    assert b["distributed"] == {"strategy": "fsdp2", "world_size": 1, "backend": "gloo"}
    la, lb = [c["train_loss"] for c in a["curve"]], [c["train_loss"] for c in b["curve"]]
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < LOSS_TOL


def test_distributed_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing for FSDP2 to shard"):
        run_sweep(study_from_dict(study(tmp_path, ["full", "lora"], executor="torchrun", nproc_per_node=2,
                                        train={"distributed": "fsdp2"})))
    with pytest.raises(ConfigError, match="needs executor=torchrun"):
        run_sweep(study_from_dict(study(tmp_path, ["lora"], train={"distributed": "ddp"})))
    with pytest.raises(ConfigError, match="nproc_per_node"):
        run_sweep(study_from_dict(study(tmp_path, ["lora"], executor="torchrun", nproc_per_node=0)))
    assert not (tmp_path / "long").exists()


@pytest.mark.skipif(_gloo() is not None, reason=str(_gloo()))
def test_a_rank_that_dies_ends_the_run_failed(tmp_path: Path) -> None:
    t0 = time.time()
    run_sweep(study_from_dict(study(tmp_path, ["lora"], task="idlab_fixture_tasks:blobs_rank_1_dies",
                                    executor="torchrun", nproc_per_node=2)))
    assert time.time() - t0 < 120
    (res,) = results(tmp_path).values()
    # rank 0 records the broken collective itself, or the launcher records torchrun's exit
    assert res["status"] == "failed" and ("torchrun exited" in res["error"] or "gloo" in res["error"])
    runs = tmp_path / "long" / "runs"
    (folder,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.name for p in folder.iterdir()) == ["result.json"]  # nothing half-written


@pytest.mark.skipif(_gloo() is not None, reason=str(_gloo()))
def test_a_two_process_run_resumes_from_its_checkpoint_bit_identical(tmp_path: Path) -> None:
    """FSDP2: each rank writes its own shards (torch.distributed.checkpoint) and loads them back; the resumed
    run ends bit-identical."""
    import shutil

    raw = study(tmp_path, ["full"], executor="torchrun", nproc_per_node=2,
                train={"checkpoint_every": 5, "keep_checkpoints": True})
    run_sweep(study_from_dict(raw))
    runs = tmp_path / "long" / "runs"
    (rid,) = results(tmp_path)
    first = json.loads((runs / rid / "result.json").read_text())
    ck = runs / f".ckpt-{rid}"
    assert [p.name for p in ck.glob("shards-*")] == ["shards-10"]  # the step-5 shards were removed
    assert len(list((ck / "shards-10").glob("*.distcp"))) == 2  # one file per rank: nothing gathered
    saved = torch.load(ck / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert saved["shards"] == "shards-10" and saved["model"] == {} and saved["optimizer"] == {}
    shutil.move(str(runs / rid), str(tmp_path / rid))  # as if it had been killed after its checkpoint at step 10
    run_sweep(study_from_dict(raw))
    again = json.loads((runs / rid / "result.json").read_text())
    assert again["resumed_from"] == 10 and again["distributed"]["strategy"] == "fsdp2"
    assert again["curve"] == first["curve"] and again["metrics"] == first["metrics"]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / rid / "delta.safetensors")), load_file(str(runs / rid / "delta.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_plan_over_n_devices() -> None:
    """FSDP2 divides weights + grads + optimizer by N, DDP does not; activations follow ceil(batch / N)."""
    from idlab.sweep.plan import RunPlan, devices_table

    gb = 10**9
    full = RunPlan(run_id="", label="full", method="full", device="cuda", precision="bf16-mixed", total_parameters=1,
                   trainable_parameters=1, tokens_per_step=1, weights_bytes=24 * gb, grads_bytes=24 * gb,
                   optimizer_bytes=48 * gb, method_bytes=0, activation_bytes=32 * gb, runtime_bytes=gb,
                   host_bytes=gb, batch_size=32, shardable=True)
    assert full.per_device_bytes(1) == 129 * gb
    assert full.per_device_bytes(4) == 24 * gb + 8 * gb + gb
    assert full.smallest_world(80 * gb) == 2 and full.sharded_strategy() == "fsdp2"
    lora = RunPlan(**{**full.__dict__, "label": "lora", "shardable": False})
    assert lora.per_device_bytes(4) == 96 * gb + 8 * gb + gb and lora.smallest_world(80 * gb) is None
    table = devices_table([full, lora], 80)
    assert "fsdp2" in table and "none" in table and "projected" in table
    assert "nproc_per_node=2" in table and "asks Slurm for 2 tasks and 2 GPUs" in table
