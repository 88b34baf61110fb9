"""CUDA_VISIBLE_DEVICES parsing, one multigpu worker per visible device, CONFIG=auto, Slurm settings,
and bad device input refused before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from idlab.config import ConfigError, study_from_dict
from idlab.training.devices import DeviceError, resolve_device, visible_devices, worker_devices
from tests.test_sweep import FIXTURES, tiny_study

UUID_A = "GPU-8f6d3c52-1a2b-4c3d-9e8f-0123456789ab"
UUID_B = "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
MIG = "MIG-4b3a2c1d-0e9f-5a6b-8c7d-112233445566"


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))


def test_visible_devices_parses_indices_uuids_and_mig() -> None:
    assert visible_devices(None) is None
    assert visible_devices("") == [] and visible_devices("-1") == []
    assert visible_devices("4,5") == ["4", "5"]
    assert visible_devices(f" {UUID_A} , {UUID_B}") == [UUID_A, UUID_B]
    assert visible_devices(f"{MIG},MIG-GPU-{UUID_A[4:]}/1/0") == [MIG, f"MIG-GPU-{UUID_A[4:]}/1/0"]
    assert visible_devices("GPU-8f6d3c52") == ["GPU-8f6d3c52"]  # a unique UUID prefix, as CUDA allows
    with pytest.raises(DeviceError, match=r"entry 'gpu0' is neither.*hide it and every entry after it \(gpu0, 2\)"):
        visible_devices("1,gpu0,2")
    with pytest.raises(DeviceError, match=r"names \['1'\] more than once"):
        visible_devices("1,1")


def _env(value: str | None) -> dict[str, str]:
    return {} if value is None else {"CUDA_VISIBLE_DEVICES": value}


@pytest.mark.parametrize(("env", "count", "gpus", "expected"), [
    (None, 3, None, ["0", "1", "2"]),               # nothing set: torch's indices are physical
    ("4,5", 2, None, ["4", "5"]),                   # the bug: workers must get 4 and 5, not 0 and 1
    ("4,5", 2, [1], ["5"]),                         # gpus index the parent's visible devices
    (f"{UUID_A},{UUID_B}", 2, None, [UUID_A, UUID_B]),
    ("6,2,7", 2, None, ["6", "2"]),                 # CUDA saw only the first two (7 does not exist)
    (MIG, 1, None, [MIG]),
])
def test_one_worker_per_device_the_parent_sees(env: str | None, count: int, gpus: list[int] | None,
                                                expected: list[str]) -> None:
    assert worker_devices(gpus, env=_env(env), count=lambda: count) == expected


def test_worker_devices_errors_name_the_value_and_the_fix() -> None:
    with pytest.raises(DeviceError, match=r"CUDA_VISIBLE_DEVICES='' names no device.*executor=local"):
        worker_devices(None, env=_env(""), count=lambda: 0)
    with pytest.raises(DeviceError, match=r"CUDA_VISIBLE_DEVICES='9' names no device"):
        worker_devices(None, env=_env("9"), count=lambda: 0)
    with pytest.raises(DeviceError, match=r"sees no CUDA device.*executor=local"):
        worker_devices(None, env=_env(None), count=lambda: 0)
    with pytest.raises(DeviceError, match=r"gpus=\[0, 2\]: \[2\] out of range; this process sees 2"):
        worker_devices([0, 2], env=_env("4,5"), count=lambda: 2)
    with pytest.raises(DeviceError, match="repeats a device"):
        worker_devices([1, 1], env=_env("4,5"), count=lambda: 2)


def test_worker_gets_the_parents_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """_gpu_worker sets CUDA_VISIBLE_DEVICES to the entry it was given (a UUID stays a UUID)."""
    import multiprocessing as mp

    from idlab.sweep import executors

    seen: dict[str, Any] = {}

    def fake_run_one(study_dir: str, study_name: str, rid: str, cfg: Any, device: str, retry: bool) -> str:
        seen.update(env=os.environ["CUDA_VISIBLE_DEVICES"], device=device)
        return "ok"

    monkeypatch.setattr(executors, "run_one", fake_run_one)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    q: Any = mp.get_context("spawn").SimpleQueue()
    done: Any = mp.get_context("spawn").SimpleQueue()
    q.put(("rid", {}))
    q.put(None)
    executors._gpu_worker(UUID_B, "dir", "study", True, q, done)
    assert seen == {"env": UUID_B, "device": "cuda:0"} and done.get() == ("rid", "ok")


def test_multigpu_without_gpus_fails_before_anything_is_written(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.sweep.driver import run_sweep

    if torch.cuda.is_available():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    study = study_from_dict(tiny_study(tmp_path, executor="multigpu", device="auto"))
    with pytest.raises(DeviceError, match=r"executor=multigpu: .*no.*device"):
        run_sweep(study)
    assert not any(tmp_path.iterdir())  # no study.json, no run folder


@pytest.mark.parametrize(("over", "match"), [
    ({"device": "cuda"}, "device='cuda' but torch"),
    ({"device": "gpu7"}, "device='gpu7' is not a device name"),
    ({"train": {"steps": 2, "precision": "tf32"}}, "'tf32' needs a CUDA GPU"),
    ({"model": {"name": "mlp", "dtype": "bfloat16"}, "train": {"steps": 2, "precision": "fp32"}},
     "'fp32' with a model holding bfloat16"),
])
def test_bad_device_or_precision_fails_before_anything_is_written(tmp_path: Path, over: dict[str, Any],
                                                                  match: str) -> None:
    from idlab.sweep.driver import run_sweep

    if torch.cuda.is_available() and over.get("device") == "cuda":
        pytest.skip("this machine has CUDA")
    study = study_from_dict(tiny_study(tmp_path, **over))
    with pytest.raises(ConfigError, match=match):
        run_sweep(study)
    assert not any(tmp_path.iterdir())


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("value", "match"), [
    ("9", r"CUDA_VISIBLE_DEVICES='9' names no device torch can use"),
    ("gpu0,1", r"entry 'gpu0' is neither a device index"),
])
def test_auto_device_with_a_visible_devices_value_naming_no_gpu_fails_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, match: str) -> None:
    """On a GPU machine (faked nvidia-smi) torch sees no device through CUDA_VISIBLE_DEVICES: auto would
    silently train on the CPU, so the sweep stops first; '' means the CPU on purpose."""
    from idlab.sweep.driver import run_sweep
    from idlab.training import devices

    monkeypatch.setattr(devices, "nvidia_gpus", lambda: ["GPU 0: NVIDIA H100 (UUID: GPU-1234)"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    study = study_from_dict(tiny_study(tmp_path, device="auto"))
    with pytest.raises(DeviceError, match=match):
        run_sweep(study)
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device("auto") == torch.device("cpu")


# --------------------------------------------------------------------------- CONFIG=auto, Slurm


def test_config_auto_follows_where_the_runs_execute(monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.sweep.driver import auto_config, resolve_config_path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_config([])[0] == "cpu_study_converged"
    name, why = auto_config(["executor=slurm"])  # a login node without GPU submitting to GPU nodes
    assert name == "gpu_study" and "slurm.gpus_per_node" in why and "no CUDA" in why
    assert auto_config(["executor=slurm", "slurm.gpus_per_node=0"])[0] == "cpu_study_converged"
    assert resolve_config_path("auto", ["executor=slurm"]).name == "gpu_study.yaml"
    assert resolve_config_path("auto").name == "cpu_study_converged.yaml"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert auto_config([]) == ("gpu_study", "this host has 2 CUDA device(s)")


def test_slurm_request_follows_the_study_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.sweep import grid as sweep
    from idlab.sweep import slurm, slurm_env

    monkeypatch.setattr(slurm_env, "_sinfo", lambda partition: None)  # no Slurm here
    raw = tiny_study(tmp_path, methods=["full"], seeds=[0], executor="slurm", device="cuda")
    study = study_from_dict(raw)
    pending = sweep.expand(study)
    mem, source = slurm.slurm_mem_gb(study, pending)
    assert mem >= slurm.MIN_MEM_GB and source.startswith("idlab plan")
    req = slurm.slurm_request(study, pending)
    assert req.params["gpus_per_node"] == 1 and f"--mem={mem}GB" in req.sbatch and "--gpus-per-node=1" in req.sbatch
    assert req.params["cpus_per_task"] == slurm.DEFAULT_CPUS
    fixed = study_from_dict({**raw, "slurm": {"mem_gb": 200, "gres": "gpu:a100:1", "setup": ["module load cuda"],
                                              "additional_parameters": {"mail-type": "END"}, "account": "lab"}})
    assert slurm.slurm_mem_gb(fixed, pending) == (200, "slurm.mem_gb")
    params = slurm.slurm_parameters(fixed, 200)
    assert params["slurm_gres"] == "gpu:a100:1" and "gpus_per_node" not in params
    assert params["slurm_setup"] == ["module load cuda"]
    assert params["slurm_additional_parameters"] == {"account": "lab", "mail-type": "END"}
    opts = slurm.sbatch_options(params, tmp_path)
    assert "--gres=gpu:a100:1" in opts and "--mail-type=END" in opts and "--account=lab" in opts
    cpu = study_from_dict({**raw, "device": "cpu"})
    assert slurm.gpu_request(cpu)[:2] == (0, None)
    assert not any("gpu" in o or "gres" in o for o in slurm.slurm_request(cpu, pending).sbatch)
    with pytest.raises(ConfigError, match="device=cpu"):
        slurm.gpu_request(study_from_dict({**raw, "device": "cpu", "slurm": {"gpus_per_node": 1}}))
    auto = study_from_dict({**raw, "device": "auto"})
    with pytest.raises(ConfigError, match="device=cuda"):
        slurm.gpu_request(auto)  # auto, and no sinfo to say whether the nodes have GPUs
    monkeypatch.setattr(slurm_env, "_sinfo", lambda partition: [(2, "(null)")])
    assert slurm.gpu_request(auto)[0] == 0 and slurm.cpus_request(auto)[0] == 2  # capped by the node
    monkeypatch.setattr(slurm_env, "_sinfo", lambda partition: [(64, "gpu:a100:4")])
    assert slurm.gpu_request(auto)[0] == 1 and slurm.cpus_request(auto)[0] == slurm.DEFAULT_CPUS


def test_slurm_request_of_a_run_on_n_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nproc_per_node=N under executor=slurm: N tasks on one node, one GPU each, the node's memory N times
    the one-process plan, the CPUs split; refused without a launcher that starts the processes."""
    from idlab.sweep import grid as sweep
    from idlab.sweep import slurm, slurm_env
    from idlab.sweep.executors import check_distributed

    monkeypatch.setattr(slurm_env, "_sinfo", lambda partition: [(8, "(null)")])
    raw = tiny_study(tmp_path, methods=["full"], seeds=[0], executor="slurm", device="cuda")
    one, four = study_from_dict(raw), study_from_dict({**raw, "nproc_per_node": 4})
    pending = sweep.expand(one)
    req = slurm.slurm_request(four, pending)
    assert req.params["tasks_per_node"] == 4 and req.params["nodes"] == 1 and req.params["gpus_per_node"] == 4
    assert "--ntasks-per-node=4" in req.sbatch and "--gpus-per-node=4" in req.sbatch
    assert slurm.slurm_mem_gb(four, pending)[0] == 4 * slurm.slurm_mem_gb(one, pending)[0]
    cpu4 = study_from_dict({**raw, "nproc_per_node": 4, "device": "cpu"})
    assert slurm.cpus_request(cpu4)[0] == 2 and slurm.gpu_request(cpu4)[0] == 0  # 8 CPUs / 4 tasks
    assert "tasks per run" in str(check_distributed(cpu4))
    assert "tasks_per_node" not in slurm.slurm_request(one, pending).params
    with pytest.raises(ConfigError, match="set nproc_per_node=N"):
        check_distributed(study_from_dict({**raw, "train": {**raw.get("train", {}), "distributed": "ddp"}}))
    with pytest.raises(ConfigError, match=r"nproc_per_node.*executor=local"):
        check_distributed(study_from_dict({**raw, "executor": "local", "nproc_per_node": 2}))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="got 4, but this host sees 2 CUDA device"):  # torchrun on CUDA: counted
        check_distributed(study_from_dict({**raw, "executor": "torchrun", "nproc_per_node": 4}))
    assert "2 GPU process(es)" in str(check_distributed(study_from_dict({**raw, "executor": "torchrun",
                                                                         "nproc_per_node": 2})))


def test_slurm_jobs_record_and_status_without_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.sweep import slurm_env, slurm_jobs

    monkeypatch.setattr(slurm_jobs, "squeue_states", lambda: {"7_0": ("PENDING", "PartitionConfig", "")})
    (tmp_path / "study.json").write_text('{"run_ids": ["a", "b", "c"]}')
    slurm_jobs.record_jobs(tmp_path, {"a": {"job_id": "7_0", "stderr": "/x/7_0.err"}})
    slurm_jobs.record_jobs(tmp_path, {"b": {"job_id": "7_1", "stderr": "/x/7_1.err"}})
    assert set(slurm_jobs.read_jobs(tmp_path)) == {"a", "b"}
    rows = {r["run_id"]: r for r in slurm_jobs.status_rows(tmp_path)}
    assert rows["a"]["state"] == "PENDING (PartitionConfig)" and rows["a"]["log"] == "/x/7_0.err"
    assert rows["b"]["state"] == "gone, no result" and rows["c"]["state"] == "not submitted"
    assert slurm_jobs._stuck("ReqNodeNotAvail, UnavailableNodes:n1") and not slurm_jobs._stuck("Resources")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    rec = slurm_env.slurm_record()
    assert rec is not None and rec["job_id"] == "7_1" and rec["node"] == "n1"


def test_cpu_torch_on_a_gpu_machine_warns_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.training.devices import cpu_torch_on_gpu_machine

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    msg = cpu_torch_on_gpu_machine()
    assert msg is not None and "nvidia-smi lists 1 GPU" in msg and "CPU-only build" in msg
    assert "make install TORCH=torch" in msg
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cpu_torch_on_gpu_machine() is None


def test_idlab_sweep_prints_the_cpu_torch_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`make sweep` (idlab sweep) on a GPU machine with a CPU-only torch says so, with the fix, first."""
    from idlab.cli import main_sweep
    from idlab.training import devices

    monkeypatch.setattr(devices, "cpu_torch_on_gpu_machine", lambda: "warning: nvidia-smi lists 1 GPU(s) but ...")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps(tiny_study(tmp_path, methods=["full"], seeds=[0])))
    main_sweep(str(cfg), [], dry_run=True)
    assert capsys.readouterr().err.startswith("warning: nvidia-smi lists 1 GPU(s)")
