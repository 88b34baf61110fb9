"""The Makefile's install stamps follow the torch build (``make -n`` only: nothing is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make_n(venv: Path, path_prefix: Path | None = None, *args: str) -> str:
    env = {**os.environ}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    else:  # no nvidia-smi on PATH, whatever this machine has
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                      if not (Path(p) / "nvidia-smi").exists())
    out = subprocess.run(["make", "-n", "install", f"VENV={venv}", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


@pytest.fixture
def gpu_path(tmp_path: Path) -> Path:
    """A folder with a fake ``nvidia-smi`` that lists one GPU."""
    d = tmp_path / "gpubin"
    d.mkdir()
    exe = d / "nvidia-smi"
    exe.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0000)'\n")
    exe.chmod(0o755)
    return d


def _pretend_installed(venv: Path, plan: str) -> None:
    """Create the stamps the dry-run plan would write (newer than pyproject.toml and Makefile)."""
    venv.mkdir(exist_ok=True)
    for stamp in re.findall(r"> (\S+\.idlab-torch-\d+)", plan) + re.findall(r"touch (\S+\.idlab-installed-\d+)",
                                                                              plan):
        Path(stamp).write_text("x")


def test_cpu_machine_installs_the_cpu_build_and_checks_it(tmp_path: Path) -> None:
    plan = _make_n(tmp_path / "venv")
    assert 'pip install -q "torch==2.13.0"' in plan
    assert "torch.version.cuda is not None" in plan  # refuses a CUDA build pulled on a CPU machine


def test_a_cpu_venv_is_reinstalled_on_a_gpu_machine(tmp_path: Path, gpu_path: Path) -> None:
    venv = tmp_path / "venv"
    _pretend_installed(venv, _make_n(venv))
    assert "pip install" not in _make_n(venv)  # installed: nothing to do on the CPU machine
    on_gpu = _make_n(venv, gpu_path)  # same .venv, now nvidia-smi lists a GPU: TORCH defaults to torch
    assert "pip uninstall -q -y torch" in on_gpu and 'pip install -q "torch" ' in on_gpu
    assert "torch.version.cuda is not None" not in on_gpu
    assert 'pip install -q -e ".[dev,cluster]"' in on_gpu


def test_changing_torch_index_reinstalls_torch(tmp_path: Path, gpu_path: Path) -> None:
    venv = tmp_path / "venv"
    _pretend_installed(venv, _make_n(venv, gpu_path))
    assert "pip install" not in _make_n(venv, gpu_path)
    idx = "https://download.pytorch.org/whl/cu124"
    plan = _make_n(venv, gpu_path, 'TORCH=torch==2.5.1', f"TORCH_INDEX={idx}")
    assert f'pip install -q "torch==2.5.1" --index-url {idx}' in plan and "pip uninstall" in plan


def test_make_test_adds_the_test_extra_and_sweep_does_not(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                 if not (Path(p) / "nvidia-smi").exists())}

    def plan(target: str) -> str:
        return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60, check=True).stdout

    assert 'pip install -q -e ".[dev,cluster,test,tracking,eval]"' in plan("test")
    assert 'pip install -q -e ".[dev,cluster,test,tracking,eval]"' in plan("gpu-check") and "bench.gpu_check" in plan("gpu-check")
    sweep = plan("sweep")
    assert 'pip install -q -e ".[dev,cluster]"' in sweep and "test]" not in sweep
