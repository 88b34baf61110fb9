"""experiments.hu2021_section7 on a synthetic results folder (no SmolLM2, no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments.hu2021_section7 import analyse
from idlab.analysis import (
    load_deltas,
    random_baseline,
    save_deltas,
    subspace_of,
    subspace_similarity,
    weight_alignment,
)
from idlab.lowrank import LowRankDelta

D_OUT, D_IN, LAYER = 72, 80, 2
NAMES = {m: f"model.layers.{LAYER}.self_attn.{m}" for m in ("q_proj", "v_proj")}


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {n: torch.randn(D_OUT, D_IN, generator=g) for n in NAMES.values()}


def _write_run(root: Path, run_id: str, r: int, seed: int, targets: list[str],
               status: str = "ok", delta: bool = True) -> None:
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    cfg = {"method": "lora", "r": r, "seed": seed, "target_modules": targets,
           "model": "tiny", "task": "toy", "lora_alpha": 2.0 * r}
    (d / "result.json").write_text(json.dumps(
        {"run_id": run_id, "status": status, "config": cfg, "finished_at": f"t{run_id}",
         "task_info": {"num_classes": 2}}))
    if delta:
        g = torch.Generator().manual_seed(1000 * seed + r)
        deltas = {}
        for layer in (LAYER - 1, LAYER):
            for m in targets:
                name = f"model.layers.{layer}.self_attn.{m}"
                deltas[name] = LowRankDelta(torch.randn(D_OUT, r, generator=g) * 0.1,
                                            torch.randn(r, D_IN, generator=g), 2.0, name=name)
        save_deltas(d / "delta.safetensors", deltas)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    _write_run(root, "r4s0", 4, 0, ["q_proj", "v_proj"])
    _write_run(root, "r8s0", 8, 0, ["q_proj", "v_proj"])
    _write_run(root, "r64s0", 64, 0, ["q_proj", "v_proj"])
    _write_run(root, "qkvo8", 8, 0, ["q_proj", "k_proj", "v_proj", "o_proj"])  # not q+v
    _write_run(root, "r64s1", 64, 1, ["q_proj", "v_proj"], status="failed", delta=False)
    return root


def test_numbers_match_direct_calls_and_missing_named(results: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    W0 = _base()
    calls: list[list[str]] = []

    def base_weights(model: str, names: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(names))
        return {n: W0[n] for n in names}

    out = tmp_path / "out"
    rep = analyse(results, layer=LAYER, out=out, base_weights=base_weights, figures=False)
    assert calls and sorted(calls[0]) == sorted(NAMES.values())
    assert rep["missing"] == ["q+v r=64 seed=1"]
    assert any("r64s1" in n and "failed" in n for n in rep["notes"])
    assert rep["runs_used"] == {"r=4 seed=0": "r4s0", "r=8 seed=0": "r8s0", "r=64 seed=0": "r64s0"}
    md = (out / "section7.md").read_text()
    assert "q+v r=64 seed=1" in md and "qkvo8" not in md

    runs = {k: load_deltas(results / "runs" / k / "delta.safetensors") for k in ("r4s0", "r8s0", "r64s0")}
    for m, n in NAMES.items():
        # Section 7.3: every row equals weight_alignment
        for r, rid in ((4, "r4s0"), (8, "r8s0"), (64, "r64s0")):
            want = weight_alignment(runs[rid][n], W0[n], r=r)
            got = rep["alignment"][m][r]
            for key in ("proj_delta", "proj_weight", "proj_random", "weight_fro", "delta_fro",
                        "amplification"):
                assert got[key] == pytest.approx(getattr(want, key), rel=1e-12), (m, r, key)
            assert f"{want.amplification:.4g}" in md
        # Section 7.2: the phi map equals subspace_similarity of the right singular vectors
        U1 = subspace_of(runs["r8s0"][n], side="right")
        U2 = subspace_of(runs["r64s0"][n], side="right")
        phi = subspace_similarity(U1[:, :8], U2[:, :64])
        p = rep["phi"]["rank"][m]
        assert torch.allclose(torch.tensor(p["map"], dtype=torch.float64), phi, atol=1e-12)
        assert p["phi_11"] == pytest.approx(float(phi[0, 0]))
        assert p["base_11"] == pytest.approx(random_baseline(1, 1, D_IN))
        assert p["phi_full"] == pytest.approx(float(phi[7, 63]))
        assert p["mean_8x8"] == pytest.approx(float(phi[:8, :8].mean()))
        # single-direction overlaps sum back to ||U1^T U2||_F^2
        assert sum(p["single_overlaps"]) == pytest.approx(float((U1[:, :8].T @ U2) .pow(2).sum()))
        assert f"{p['phi_11']:.4g}" in md
    # the seed pair needs r=64 seed 1, which failed
    assert "seed" not in rep["phi"]
    v = rep["verdict"]
    assert v["q_proj"]["seed_top_above_0.5"] is None
    assert isinstance(v["q_proj"]["amplification_larger_at_low_rank"], bool)
    assert not math.isnan(rep["alignment"]["v_proj"][64]["amplification"])


def test_nothing_found_still_writes(tmp_path: Path) -> None:
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    rep = analyse(tmp_path / "empty", layer=LAYER, out=tmp_path / "o",
                  base_weights=lambda m, n: {}, figures=False)
    assert len(rep["missing"]) == 4
    assert (tmp_path / "o" / "section7.md").exists()
    assert rep["verdict"]["overall"] == "not computable"


def test_figures_written(results: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    W0 = _base()
    rep = analyse(results, layer=LAYER, out=tmp_path / "f",
                  base_weights=lambda m, names: {n: W0[n] for n in names})
    assert len(rep["figures"]) == 2  # rank pair, q and v (seed pair missing)
    assert all(Path(f).stat().st_size > 0 for f in rep["figures"])


def test_r64_missing_uses_largest_rank_above_8(tmp_path: Path) -> None:
    root = tmp_path / "study"
    for r in (4, 8, 16):
        _write_run(root, f"r{r}s0", r, 0, ["q_proj", "v_proj"])
    W0 = _base()
    rep = analyse(root, layer=LAYER, out=tmp_path / "o",
                  base_weights=lambda m, names: {n: W0[n] for n in names}, figures=False)
    assert rep["missing"] == ["q+v r=64 seed=0", "q+v r=64 seed=1"]
    assert any("r=16 seed=0 stands in" in n for n in rep["notes"])
    assert rep["phi"]["rank"]["q_proj"]["runs"] == ["r8s0", "r16s0"]
    assert sorted(rep["alignment"]["q_proj"]) == [4, 8, 16]
    al = rep["alignment"]["q_proj"]
    assert rep["verdict"]["q_proj"]["amplification_larger_at_low_rank"] == (
        al[4]["amplification"] > al[16]["amplification"])
