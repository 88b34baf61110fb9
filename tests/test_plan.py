"""``idlab plan``: counts from meta models, memory terms, and the projection against measured CPU peaks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from idlab import methods
from idlab.cli import main_plan
from idlab.config.run import RunConfig
from idlab.methods.subspace import subspace_memory
from idlab.sweep.plan import (
    CPU_RUNTIME_BYTES,
    SLURM_HEADROOM,
    activation_bytes,
    cpu_runtime_bytes,
    plan_memory,
    plan_run,
)
from tests.memory_probe import build, run_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "experiments" / "configs" / "recipes"


def _meta_plan(name: str, method: str, batch: int = 16, seq: int = 128):  # type: ignore[no-untyped-def]
    run = run_config(name, method)
    model = methods.get(method).plan_model(build(name).to("meta"), run.axes, run.seed)
    ids = {"input_ids": torch.ones(batch, seq, dtype=torch.long, device="meta")}
    return plan_memory(model, ids, torch.zeros(batch, dtype=torch.long, device="meta"), method=method,
                       axes=run.axes, precision="fp32", device="cpu")


@pytest.mark.parametrize(("name", "method"), [
    ("llama", "full"), ("bert", "lora"), ("llama", "subspace"),
    pytest.param("llama", "lora", marks=pytest.mark.slow), pytest.param("bert", "full", marks=pytest.mark.slow),
])
def test_plan_matches_the_measured_cpu_peak_rss(name: str, method: str) -> None:
    """Peak RSS of two real AdamW steps (fresh interpreter) vs the plan's device total: within 25%.

    glibc is told to return freed blocks at once (else its heap keeps them and RSS exceeds the live
    tensors by an allocator-dependent amount, which the plan's host figure covers separately).
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "tests.memory_probe", name, method, "16", "128"], env=env,
                         capture_output=True, text=True, timeout=300, check=True, cwd=REPO)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
    plan = _meta_plan(name, method)
    assert abs(plan.device_total_bytes - measured) / measured < 0.25, (plan.to_dict(), measured)
    # the model-dependent part alone is most of it (the test can fail)
    assert plan.peak_bytes > 0.25 * measured


def test_meta_activations_equal_the_real_saved_tensors() -> None:
    model = build("bert")
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(3, 2000, (4, 32))
    real, _ = activation_bytes(model, {"input_ids": ids}, torch.zeros(4, dtype=torch.long))
    meta, _ = activation_bytes(model.to("meta"), {"input_ids": ids.to("meta")},
                               torch.zeros(4, dtype=torch.long, device="meta"))
    assert real == meta > 0


def test_terms_and_counts() -> None:
    full, lora = _meta_plan("llama", "full"), _meta_plan("llama", "lora")
    n = sum(p.numel() for p in build("llama").parameters())
    assert full.total_parameters == full.trainable_parameters == n
    assert full.weights_bytes == full.grads_bytes == 4 * n and full.optimizer_bytes == 8 * n
    assert lora.total_parameters > n and 0 < lora.trainable_parameters < n // 50
    assert lora.activation_bytes < full.activation_bytes  # frozen weights need no saved inputs
    assert full.runtime_bytes == cpu_runtime_bytes() >= CPU_RUNTIME_BYTES  # this environment's, measured
    assert full.slurm_mem_gb * 2**30 >= SLURM_HEADROOM * full.host_bytes
    assert subspace_memory(1000, 100, 2) == 1000 * 2 + 800
    assert subspace_memory(1000, 100, 2, streamed=True) == 100 * (2 + 8)  # one weight at a time


def test_bf16_mixed_keeps_trainable_in_fp32() -> None:
    model = build("llama").to(torch.bfloat16).to("meta")
    run = run_config("llama", "lora")
    model = methods.get("lora").plan_model(model, run.axes, run.seed)
    ids = {"input_ids": torch.ones(2, 16, dtype=torch.long, device="meta")}
    p = plan_memory(model, ids, torch.zeros(2, dtype=torch.long, device="meta"), method="lora", axes=run.axes,
                    precision="bf16-mixed", device="cuda")
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert p.grads_bytes == 4 * trainable and p.optimizer_bytes == 8 * trainable
    assert p.weights_bytes < 2.1 * p.total_parameters  # frozen stay bf16


def test_subspace_run_counts_d_plus_the_head() -> None:
    run = RunConfig.from_dict({"model": "mlp", "model_options": {"hidden": [16]}, "task": "digits",
                               "task_options": {}, "train": {"batch_size": 8}, "method": "subspace", "seed": 0,
                               "lr": 0.1, "d": 50, "projection": "fastfood", "said": False, "head": "train"})
    p = plan_run(run)
    assert p.total_parameters == 64 * 16 + 16 + 16 * 10 + 10
    # MLP has no classifier head name: everything is projected, d trainable
    assert p.trainable_parameters == 50 and p.method_bytes == subspace_memory(p.total_parameters, 64 * 16, 4)
    streamed = plan_run(dataclasses.replace(run, axes=dataclasses.replace(run.axes, layout="blocks")))  # the default engine: one weight at a time
    assert streamed.method_bytes == subspace_memory(p.total_parameters, 64 * 16, 4, streamed=True) < p.method_bytes


def test_recipe_models_are_planned_offline_with_their_published_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built on meta from KNOWN_CONFIGS (the hub is unreachable): the counts in the recipe headers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = main_plan(str(RECIPES / "llama2_7b_rank_grid.yaml"), ["lora.r=[1]", "lora.target_modules=[qv]",
                                                                "seeds=[0]"], device="cuda")
    assert "6,607,884,288" in out and "532,480" in out  # 6,607,351,808 + r=1 q,v adapters
    assert "bf16-mixed" in out and "mem_gb" in out


def test_idlab_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from idlab.cli import main

    assert main(["plan", "smoke", "seeds=[0]"]) == 0
    out = capsys.readouterr().out
    assert "plan " in out and "trainable" in out and "mem_gb" in out
    assert main(["plan", "smoke", "train.precision=fp8"]) == 2
    assert "train.precision" in capsys.readouterr().err
