"""experiments.hu2021_section7 on synthetic results folders (no model download, no training).

Both naming schemes: Llama-style (``q_proj`` / ``v_proj``, target set qv) and BERT/RoBERTa
(``query`` / ``value``, target set bert-qv)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.hu2021_section7 import _random_delta_like, analyse, is_query_value, module_role
from idlab.analysis import (
    load_deltas,
    random_baseline,
    save_deltas,
    subspace_of,
    subspace_similarity,
    weight_alignment,
)
from idlab.deltas.lowrank import LowRankDelta

D_OUT, D_IN, LAYERS = 72, 80, (1, 2)
SCHEMES = {
    "llama": ("model.layers.{layer}.self_attn.{m}", ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "bert": ("bert.encoder.layer.{layer}.attention.self.{m}", ("query", "value"), ("query", "key", "value")),
}
ROLE_OF = {"q_proj": "query", "query": "query", "v_proj": "value", "value": "value"}


def _names(scheme: str) -> dict[tuple[int, str], str]:
    fmt, qv, _ = SCHEMES[scheme]
    return {(layer, ROLE_OF[m]): fmt.format(layer=layer, m=m) for layer in LAYERS for m in qv}


def _base(scheme: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {n: torch.randn(D_OUT, D_IN, generator=g) for n in _names(scheme).values()}


def _write_run(root: Path, run_id: str, r: int, seed: int, targets: list[str], scheme: str,
               status: str = "ok", delta: bool = True, planted: torch.Tensor | None = None,
               score: float = 0.5, converged: bool | None = None, finished: str | None = None) -> None:
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    cfg = {"method": "lora", "r": r, "seed": seed, "target_modules": targets,
           "model": "tiny", "task": "toy", "lora_alpha": 2.0 * r}
    (d / "result.json").write_text(json.dumps(
        {"run_id": run_id, "status": status, "config": cfg, "finished_at": finished or f"t{run_id}",
         "task_info": {"num_classes": 2, "metric": "accuracy"}, "metrics": {"accuracy": score},
         "steps": 100 * r, "converged": seed != 1 if converged is None else converged}))
    if delta:
        g = torch.Generator().manual_seed(1000 * seed + r)
        fmt = SCHEMES[scheme][0]
        deltas = {}
        for layer in LAYERS:
            for m in targets:
                name = fmt.format(layer=layer, m=m)
                B = torch.randn(D_OUT, r, generator=g) * 0.1
                A = torch.randn(r, D_IN, generator=g)
                if planted is not None:  # one strong shared input direction on top of noise
                    A[0] = 30.0 * planted
                    B[:, 0] = B[:, 0] * 10.0
                deltas[name] = LowRankDelta(B, A, 2.0, name=name)
        save_deltas(d / "delta.safetensors", deltas)


def _results(root: Path, scheme: str) -> Path:
    qv = list(SCHEMES[scheme][1])
    _write_run(root, "r4s0", 4, 0, qv, scheme)
    _write_run(root, "r8s0", 8, 0, qv, scheme)
    _write_run(root, "r64s0", 64, 0, qv, scheme)
    _write_run(root, "other8", 8, 0, list(SCHEMES[scheme][2]), scheme)  # not query+value only
    _write_run(root, "r64s1", 64, 1, qv, scheme, status="failed", delta=False)
    return root


def test_module_roles_and_target_sets() -> None:
    assert module_role("model.layers.3.self_attn.q_proj") == (3, "query")
    assert module_role("bert.encoder.layer.11.attention.self.value") == (11, "value")
    assert module_role("roberta.encoder.layer.0.attention.self.query") == (0, "query")
    assert module_role("model.layers.3.self_attn.k_proj") is None
    assert module_role("bert.encoder.layer.2.attention.self.key") is None
    assert module_role("classifier") is None
    assert is_query_value({"target_modules": ["value", "query"]})
    assert is_query_value({"target_modules": ["q_proj", "v_proj"]})
    assert not is_query_value({"target_modules": ["query", "key", "value"]})
    assert is_query_value({"target_set": "bert-qv"}) and is_query_value({"target_set": "qv"})
    assert not is_query_value({"target_set": "qkvo"})


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_numbers_match_direct_calls_and_missing_named(scheme: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    results = _results(tmp_path / "study", scheme)
    W0 = _base(scheme)
    names = _names(scheme)
    calls: list[list[str]] = []

    def base_weights(model: str, asked: list[str]) -> dict[str, torch.Tensor]:
        calls.append(list(asked))
        return {n: W0[n] for n in asked}

    out = tmp_path / "out"
    rep = analyse(results, "all", out=out, base_weights=base_weights, figures=False)
    assert rep["meta"]["layers"] == list(LAYERS)
    assert calls and sorted(calls[0]) == sorted(names.values())
    assert rep["missing"] == ["query+value r=64 at a second seed (for the seed pair)"]
    assert any("r64s1" in n and "failed" in n for n in rep["notes"])
    assert rep["runs_used"] == {"r=4 seed=0": "r4s0", "r=8 seed=0": "r8s0", "r=64 seed=0": "r64s0"}
    md = (out / "section7.md").read_text()
    assert "other8" not in md and "seed pair" in md
    runs = {k: load_deltas(results / "runs" / k / "delta.safetensors") for k in ("r4s0", "r8s0", "r64s0")}
    for (layer, role), n in names.items():
        for r, rid in ((4, "r4s0"), (8, "r8s0"), (64, "r64s0")):
            want = weight_alignment(runs[rid][n], W0[n], r=r)
            got = rep["alignment"][layer][role][r]
            for key in ("proj_delta", "proj_weight", "proj_random", "weight_fro", "delta_fro", "amplification"):
                assert got[key] == pytest.approx(getattr(want, key), rel=1e-12), (layer, role, r, key)
            assert got["amplification_random"] == pytest.approx(want.delta_fro / want.proj_random)
            ctrl = weight_alignment(_random_delta_like(runs[rid][n], r, seed=1000 + layer), W0[n], r=r)
            assert got["amplification_random_delta"] == pytest.approx(ctrl.amplification)
        U1 = subspace_of(runs["r8s0"][n], side="right", source="factor")  # Hu et al. eq. 4: from A
        U2 = subspace_of(runs["r64s0"][n], side="right", source="factor")
        phi = subspace_similarity(U1[:, :8], U2[:, :64])
        (p,) = rep["phi"][layer][role]["rank"]
        assert torch.allclose(torch.tensor(p["map"], dtype=torch.float64), phi, atol=1e-12)
        assert p["phi_11"] == pytest.approx(float(phi[0, 0]))
        assert p["base_11"] == pytest.approx(random_baseline(1, 1, D_IN))
        assert p["phi_full"] == pytest.approx(float(phi[7, 63]))
        # single-direction overlaps sum back to ||U1^T U2||_F^2
        assert sum(p["single_overlaps"]) == pytest.approx(float((U1[:, :8].T @ U2).pow(2).sum()))
        assert "seed" not in rep["phi"][layer][role]
    v = rep["verdict"]
    assert v["query"]["seed_top_above_0.5"] == {"holds": 0, "of": 0}
    assert v["query"]["amplification_larger_at_low_rank"]["of"] == len(LAYERS)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_planted_shared_direction_is_found_and_random_ones_are_not(scheme: str, tmp_path: Path) -> None:
    root = tmp_path / "planted"
    qv = list(SCHEMES[scheme][1])
    u = torch.zeros(D_IN)
    u[5] = 1.0
    for seed in (0, 1, 2):
        _write_run(root, f"r8s{seed}", 8, seed, qv, scheme, planted=u)
        _write_run(root, f"r64s{seed}", 64, seed, qv, scheme, planted=u)
    W0 = _base(scheme)
    rep = analyse(root, [2], base_weights=lambda m, names: {n: W0[n] for n in names}, figures=False)
    ph = rep["phi"][2]
    for role in ("query", "value"):
        assert len(ph[role]["rank"]) == 3 and len(ph[role]["seed"]) == 3  # 3 seeds, 3 seed pairs
        for p in ph[role]["rank"] + ph[role]["seed"]:
            assert p["phi_11"] > 0.95  # from A: the planted row dominates A, the noise rows tilt it a little
            assert p["others_mean_1J"] < 64 / D_IN + 0.15  # the rest: random, near J/k
    v = rep["verdict"]
    assert v["query"]["rank_top_above_0.5"] == {"holds": 1, "of": 1}
    assert v["value"]["seed_top_well_above_baseline"] == {"holds": 1, "of": 1}
    assert rep["runs_converged"]["r=64 seed=1"] is False  # the flag of result.json is carried
    # the same folder without the planted direction: phi(1,1) near the 1/k baseline
    root2 = tmp_path / "random"
    for seed in (0, 1):
        _write_run(root2, f"r8s{seed}", 8, seed, qv, scheme)
        _write_run(root2, f"r64s{seed}", 64, seed, qv, scheme)
    rep2 = analyse(root2, [2], base_weights=lambda m, names: {n: W0[n] for n in names}, figures=False)
    assert all(p["phi_11"] < 0.5 for p in rep2["phi"][2]["query"]["rank"])


def test_no_runs_of_the_asked_ranks_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"at r=8, r=64; no usable LoRA query\+value run at all"):
        analyse(tmp_path / "empty", base_weights=lambda m, n: {}, figures=False)
    root = tmp_path / "r4only"
    _write_run(root, "r4s0", 4, 0, ["query", "value"], "bert")
    _write_run(root, "r64s0", 64, 0, ["query", "value"], "bert", status="failed", delta=False)
    with pytest.raises(ValueError, match=r"at r=8, r=64; usable ranks found: \[4\] among 2"):
        analyse(root, base_weights=lambda m, n: {}, figures=False)
    with pytest.raises(ValueError, match=r"layers \[7\] are not in the delta files; layers present: \[1, 2\]"):
        analyse(root, [7], base_weights=lambda m, n: {}, figures=False, rank_pair=(4, 4))


def test_figures_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = _results(tmp_path / "study", "bert")
    W0 = _base("bert")
    rep = analyse(results, "all", out=tmp_path / "f", base_weights=lambda m, names: {n: W0[n] for n in names},
                  focus_layer=2)
    assert len(rep["figures"]) == 2  # rank pair, query and value of the focus layer (seed pair missing)
    assert all(Path(f).stat().st_size > 0 for f in rep["figures"])
    assert not list((tmp_path / "f").glob(".*"))  # no temporary file left behind


def test_random_delta_control_has_the_norm_and_rank_asked() -> None:
    g = torch.Generator().manual_seed(0)
    d = LowRankDelta(torch.randn(D_OUT, 4, generator=g), torch.randn(4, D_IN, generator=g), 0.5)
    c = _random_delta_like(d, 4, seed=3)
    assert c.r == 4 and c.shape == (D_OUT, D_IN)
    assert float(torch.linalg.norm(c.dense())) == pytest.approx(float(torch.linalg.norm(d.dense(torch.float64))))


def test_score_by_rank_and_a_converged_rerun_wins(tmp_path: Path) -> None:
    """Hu et al. Table 6 on the runs: per-rank scores; a converged rerun replaces an unconverged run."""
    root = tmp_path / "ranks"
    qv = list(SCHEMES["bert"][1])
    for r, sc in ((1, 0.815), (8, 0.82), (64, 0.83)):
        _write_run(root, f"r{r}s0", r, 0, qv, "bert", score=sc, converged=True, finished="t1")
    _write_run(root, "r64s2", 64, 2, qv, "bert", score=0.81, converged=True, finished="t1")
    # r = 1 seed 2: an unconverged run that finished later than the converged rerun
    _write_run(root, "r1s2new", 1, 2, qv, "bert", score=0.825, converged=True, finished="t1")
    _write_run(root, "r1s2cap", 1, 2, qv, "bert", score=0.70, converged=False, finished="t2")
    W0 = _base("bert")
    rep = analyse(root, [1], base_weights=lambda m, names: {n: W0[n] for n in names}, figures=False)
    acc = rep["accuracy"]
    assert acc[1]["scores"] == {0: 0.815, 2: 0.825} and acc[1]["converged"] == {0: True, 2: True}
    assert acc[1]["mean"] == pytest.approx(0.82) and acc[64]["mean"] == pytest.approx(0.82)
    assert acc[8]["steps"] == {0: 800}
    assert any("r1s2new (converged)" in n for n in rep["notes"])
    rn = rep["verdict"]["rank_needed"]
    assert rn["smallest_rank"] == 1 and rn["holds"] is True and rn["converged"] is True
    assert "Table 6" in rep["markdown"] and "s2: 0.825, 100 steps, yes" in rep["markdown"]
    # r = 1 far below the best: the claim fails
    _write_run(root, "r1s0low", 1, 0, qv, "bert", score=0.6, converged=True, finished="t3")
    rep = analyse(root, [1], base_weights=lambda m, names: {n: W0[n] for n in names}, figures=False)
    assert rep["verdict"]["rank_needed"]["holds"] is False
