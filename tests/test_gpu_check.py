"""`make gpu-check` (bench/gpu_check.py) in its reduced mode: every check runs at tiny sizes on CPU
(the Triton kernels interpreted), so the script the GPU session will run cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_reduced_runs_every_check(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="triton is not installed (the `test` extra: pip install -e '.[test]')")
    out = tmp_path / "gpu.md"
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--reduced", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    md = out.read_text()
    from bench.gpu_check import CHECKS

    assert sum(limit for _, limit, _ in CHECKS) <= 480  # the GPU run fits 8 minutes
    for name, _, _ in CHECKS:
        assert f"| {name} | ok |" in md and f"## {name}" in md
        assert f"gpu-check {name}: ok" in p.stdout
    for cell in ("| 2^12 | triton |", "| 2^14 | torch |", "| said | bf16-mixed |", "| lora | fp32 |",
                 "plan peak GiB", "| idlab report |"):
        assert cell in md
