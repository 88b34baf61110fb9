"""executor=slurm against a real one-node Slurm on localhost (`make test-slurm`; marked slurm, left out of
`make test`). tests/slurm/setup.sh installs slurm-wlm + munge (root, apt), writes slurm.conf and starts
the daemons; where it cannot, every test here skips with the reason. Each case prints its wall time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idlab.runs import RunStore

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "slurm" / "setup.sh"
#: a smoke-sized study: one MLP run per seed on digits, one CPU per task (two tasks at once on 2 CPUs)
BASE = ["smoke", "executor=slurm", "methods=[full]", "slurm.cpus_per_task=1", "slurm.time_min=10"]
ENV = {**os.environ, "IDLAB_SLURM_POLL_S": "1"}


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> Iterator[None]:
    t0 = time.perf_counter()
    out = subprocess.run(["bash", str(SETUP), "start"], capture_output=True, text=True, timeout=900)
    if out.returncode == 3:
        msg = f"REAL-SLURM TESTS SKIPPED: {out.stderr.strip().splitlines()[-1]}"
        print(f"\n{'!' * 80}\n{msg}\n{'!' * 80}", file=sys.stderr)
        pytest.skip(msg)
    assert out.returncode == 0, f"tests/slurm/setup.sh start failed:\n{out.stdout}\n{out.stderr}"
    print(f"\n[slurm] cluster up in {time.perf_counter() - t0:.1f}s: {out.stderr.strip()}")
    yield
    subprocess.run(["bash", str(SETUP), "stop"], timeout=120)


def idlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "idlab.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _timed(name: str, t0: float) -> None:
    print(f"\n[slurm] case {name}: {time.perf_counter() - t0:.1f}s")


def _jobs(study_dir: Path) -> dict[str, dict[str, str]]:
    return json.loads((study_dir / "slurm" / "jobs.json").read_text())


def _assert_whole(study_dir: Path, n: int) -> None:
    store = RunStore(study_dir)
    rids = json.loads((study_dir / "study.json").read_text())["run_ids"]
    assert len(rids) == n
    for rid in rids:
        res, problem = store.check(rid)
        assert res is not None and problem is None and res.status == "ok", (rid, problem)
        assert res.slurm is not None and res.slurm["job_id"] == _jobs(study_dir)[rid]["job_id"]
        assert res.slurm["node"] and Path(str(res.slurm["stderr"])).is_file()


def _wait_gone(job_id: str, limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
        if job_id not in out.stdout.split():
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still in squeue after {limit_s}s")


def test_cpu_study_every_result_whole_and_no_gpu_asked(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    out = idlab("sweep", *BASE, "seeds=[0,1]", f"results_dir={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    sd = tmp_path / "smoke"
    _assert_whole(sd, 2)
    scripts = list((sd / "slurm").rglob("*_submission.sh"))
    assert scripts and not any("gpu" in s.read_text() or "gres" in s.read_text() for s in scripts)
    assert "GPUs: 0 (device=cpu: no GPU)" in out.stderr and "2 done, 0 failed" in out.stderr
    status = idlab("status", str(sd))
    assert status.returncode == 0 and "2 runs: 2 ok" in status.stdout and "_log.err" in status.stdout
    _timed("cpu study, 2 runs, all result.json whole", t0)


@pytest.mark.parametrize("override, option", [("slurm.partition=nosuch", "slurm.partition"),
                                              ("slurm.mem_gb=500", "slurm.mem_gb"),
                                              ("slurm.cpus_per_task=64", "slurm.cpus_per_task"),
                                              ("slurm.gres=gpu:1", "slurm.gres")])
def test_impossible_request_is_refused_before_anything_is_written(tmp_path: Path, override: str,
                                                                  option: str) -> None:
    t0 = time.perf_counter()
    out = idlab("sweep", *BASE, "seeds=[0]", f"results_dir={tmp_path}", override)
    assert out.returncode == 2, out.stdout + out.stderr
    assert option in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no study folder
    _timed(f"refused {override}", t0)


def test_scancel_then_rerun_redoes_the_run(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    # held (any sbatch option passes through additional_parameters), so it is still queued when cancelled
    out = idlab("sweep", *BASE, "seeds=[0]", f"results_dir={tmp_path}", "--detach",
                "slurm.additional_parameters={hold: true}")
    assert out.returncode == 0, out.stdout + out.stderr
    sd = tmp_path / "smoke"
    (rid, job), = _jobs(sd).items()
    assert "JobHeldUser" in idlab("status", str(sd)).stdout
    subprocess.run(["scancel", job["job_id"]], check=True)
    _wait_gone(job["job_id"])
    state = idlab("status", str(sd)).stdout
    assert "CANCELLED" in state or "gone, no result" in state, state  # squeue keeps it MinJobAge, then it is gone
    again = idlab("sweep", *BASE, "seeds=[0]", f"results_dir={tmp_path}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted 1 array task" in again.stderr and _jobs(sd)[rid]["job_id"] != job["job_id"]
    _assert_whole(sd, 1)
    _timed("scancel + rerun", t0)


def test_killed_driver_restarted_attaches_instead_of_resubmitting(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "idlab.cli", "sweep", *BASE, "seeds=[0,1]", f"results_dir={tmp_path}"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs_file = tmp_path / "smoke" / "slurm" / "jobs.json"
    end = time.monotonic() + 120
    while not jobs_file.is_file() and time.monotonic() < end and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert jobs_file.is_file()
    before = _jobs(tmp_path / "smoke")
    again = idlab("sweep", *BASE, "seeds=[0,1]", f"results_dir={tmp_path}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "slurm: submitted" not in again.stderr, again.stderr  # no run was submitted a second time
    if "attaching to" not in again.stderr:  # both tasks finished before the restart looked (slow start)
        print("\n[slurm] note: the jobs had finished before the restarted driver looked")
    assert _jobs(tmp_path / "smoke") == before
    _assert_whole(tmp_path / "smoke", 2)
    _timed("killed driver restarted attaches", t0)


def test_detach_status_then_collect(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    out = idlab("sweep", *BASE, "seeds=[0]", f"results_dir={tmp_path}", "--detach")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "detached" in out.stdout
    sd = tmp_path / "smoke"
    status = idlab("status", str(sd))
    assert status.returncode == 0 and _jobs(sd) and any(s in status.stdout for s in ("PENDING", "RUNNING", "ok"))
    collect = idlab("sweep", *BASE, "seeds=[0]", f"results_dir={tmp_path}")
    assert collect.returncode == 0, collect.stdout + collect.stderr
    assert "slurm: submitted" not in collect.stderr and "1 ok" in collect.stdout
    _assert_whole(sd, 1)
    _timed("--detach, status, collect", t0)


def test_time_out_requeues_and_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """The signal Slurm sends before a time limit (submitit's USR2; sent here by hand, as submitit's
    own `_interrupt(timeout=True)` does) requeues the task, which resumes the run from its last
    mid-run checkpoint instead of step 0."""
    t0 = time.perf_counter()
    env = {**ENV, "IDLAB_FIXTURE_STEP_SLEEP": "0.3",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fixtures"), ENV.get("PYTHONPATH", "")])}
    args = ["sweep", *BASE, "seeds=[0]", "task.name=idlab_fixture_tasks:slow_blobs", "train.steps=60",
            "train.eval_every=20", "train.checkpoint_every=5", f"results_dir={tmp_path}"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "idlab.cli", *args, *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env=env)

    out = run("--detach")
    assert out.returncode == 0, out.stdout + out.stderr
    sd = tmp_path / "smoke"
    (rid, job), = _jobs(sd).items()
    ckpt = sd / "runs" / f".ckpt-{rid}"
    end = time.monotonic() + 180
    while not (ckpt / "meta.json").is_file():
        assert time.monotonic() < end, "no checkpoint within 180 s"
        time.sleep(0.5)
    time.sleep(2)  # a few more steps past the first checkpoint
    subprocess.run(["scancel", "--signal", "USR2", str(job["job_id"])], check=True, timeout=30)
    collect = run()
    assert collect.returncode == 0, collect.stdout + collect.stderr
    res = RunStore(sd).result(rid)
    assert res is not None and res.status == "ok" and res.steps == 60
    resumed = res.to_dict().get("resumed_from")
    assert isinstance(resumed, int) and 0 < resumed < 60, resumed  # it went on from a checkpoint
    _timed("time-out requeue resumes from the checkpoint", t0)


def test_a_run_on_two_slurm_tasks_gives_the_one_process_numbers(tmp_path: Path) -> None:
    """nproc_per_node=2 under executor=slurm: Slurm starts the two processes itself (--ntasks-per-node=2),
    submitit's TorchDistributedEnvironment ranks them, they train one run with DDP over gloo, rank 0
    writes it; the loss curve and Delta W are the one-process run's to float32 rounding."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    one = idlab("sweep", "smoke", "methods=[full]", "seeds=[0]", "executor=local", f"results_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stdout + one.stderr
    two = idlab("sweep", *BASE, "seeds=[0]", "nproc_per_node=2", "train.distributed=ddp",
                f"results_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 tasks per run on one node" in two.stdout + two.stderr and "1 done, 0 failed" in two.stderr
    sd = tmp_path / "two" / "smoke"
    _assert_whole(sd, 1)
    assert any("--ntasks-per-node=2" in s.read_text() for s in (sd / "slurm").rglob("*_submission.sh"))
    (rid,) = json.loads((sd / "study.json").read_text())["run_ids"]
    a, b = RunStore(tmp_path / "one" / "smoke").result(rid), RunStore(sd).result(rid)
    assert a is not None and b is not None and b.status == "ok", b and b.error
    dist = b.to_dict()["distributed"]
    assert dist == {"strategy": "ddp", "world_size": 2, "backend": "gloo"}
    la = [c["train_loss"] for c in a.to_dict()["curve"]]
    lb = [c["train_loss"] for c in b.to_dict()["curve"]]
    assert len(la) == len(lb) >= 2 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    da = load_file(str(tmp_path / "one" / "smoke" / "runs" / rid / "delta.safetensors"))
    db = load_file(str(sd / "runs" / rid / "delta.safetensors"))
    assert set(da) == set(db) and da
    for k in da:
        assert float((da[k] - db[k]).abs().max()) < 1e-5, k
    _timed("a run on two Slurm tasks (DDP, gloo) = the one-process run", t0)
