"""analyze_runs on tiny synthetic run folders: tables equal direct calls."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from idlab.analysis import (
    analyze_runs,
    energy_rank,
    intruder_dimensions,
    parse_layer,
    save_deltas,
    singular_values,
    stable_rank,
    subspace_of,
    subspace_similarity,
    weight_alignment,
)
from idlab.deltas.lowrank import LowRankDelta

SHAPES = {"model.layers.0.self_attn.q_proj": (12, 10), "model.layers.1.mlp.down_proj": (10, 16)}


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {n: torch.randn(*s, generator=g) for n, s in SHAPES.items()}


def _run(
    root: Path, run_id: str, method: str, r: int | None, seed: int, status: str = "ok"
) -> Path:
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(1000 + seed * 10 + (r or 0))
    deltas: dict[str, LowRankDelta | torch.Tensor] = {}
    for name, (o, i) in SHAPES.items():
        if r is None:
            deltas[name] = 0.1 * torch.randn(o, i, generator=g)
        else:
            deltas[name] = LowRankDelta(
                torch.randn(o, r, generator=g), torch.randn(r, i, generator=g), 16 / r
            )
    save_deltas(d / "delta.safetensors", deltas)
    config = {
        "model": "tiny",
        "task": "toy",
        "method": method,
        "r": r,
        "seed": seed,
        "target_modules": ["q_proj", "down_proj"],
        "d": None,
    }
    (d / "result.json").write_text(
        json.dumps({"run_id": run_id, "study": "s", "config": config, "status": status})
    )
    return d


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    _run(root, "lora_r2_s0", "lora", 2, 0)
    _run(root, "lora_r4_s0", "lora", 4, 0)
    _run(root, "lora_r4_s1", "lora", 4, 1)
    _run(root, "full_s0", "full", None, 0)
    _run(root, "broken", "lora", 4, 2, status="diverged")
    return root


def test_parse_layer() -> None:
    assert parse_layer("model.layers.17.self_attn.q_proj") == 17
    assert parse_layer("transformer.h.3.attn.c_attn") == 3
    assert parse_layer("net.0") is None


def test_analyze_runs_tables_equal_direct_calls(study: Path, tmp_path: Path) -> None:
    base = _base()
    out = tmp_path / "out"
    tables = analyze_runs([study], out, base_weights=lambda m: base if m == "tiny" else {})
    for name in (
        "spectra",
        "ranks",
        "similarity",
        "similarity_summary",
        "alignment",
        "intruders",
        "notes",
    ):
        assert (out / f"{name}.parquet").is_file()
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"{name}.parquet"), tables[name], check_dtype=False
        )
    from idlab.analysis import load_deltas

    runs = {
        rid: load_deltas(study / "runs" / rid / "delta.safetensors")
        for rid in ("lora_r2_s0", "lora_r4_s0", "lora_r4_s1", "full_s0")
    }
    spectra, ranks = tables["spectra"], tables["ranks"]
    assert set(spectra.run_id) == set(runs)  # the diverged run is skipped with a note
    assert "broken" in set(tables["notes"].run_id)
    for rid, deltas in runs.items():
        for name, delta in deltas.items():
            s = singular_values(delta)
            got = spectra[(spectra.run_id == rid) & (spectra.module == name)].sort_values("index")
            assert torch.allclose(torch.tensor(got.singular_value.to_numpy()), s, rtol=1e-10)
            row = ranks[(ranks.run_id == rid) & (ranks.module == name)].iloc[0]
            assert row.energy_rank == energy_rank(s, 0.9)
            assert row.stable_rank == pytest.approx(stable_rank(s))
            assert row.layer == parse_layer(name) and row.module_type == name.rsplit(".", 1)[-1]
            al = tables["alignment"]
            arow = al[(al.run_id == rid) & (al.module == name)].iloc[0]
            direct = weight_alignment(delta, base[name])
            assert arow.amplification == pytest.approx(direct.amplification, rel=1e-8)
            assert arow.proj_weight == pytest.approx(direct.proj_weight, rel=1e-8)
            intr = tables["intruders"]
            irow = intr[(intr.run_id == rid) & (intr.module == name)].iloc[0]
            di = intruder_dimensions(
                base[name],
                delta if isinstance(delta, LowRankDelta) else base[name].double() + delta.double(),
            )
            assert irow["count"] == di.count
    summ = tables["similarity_summary"]
    pairs = {(a, b, k) for a, b, k in zip(summ.run_a, summ.run_b, summ.pair_kind)}
    assert pairs == {("lora_r2_s0", "lora_r4_s0", "rank"), ("lora_r4_s0", "lora_r4_s1", "seed")}
    sim = tables["similarity"]
    name = "model.layers.0.self_attn.q_proj"
    phi = subspace_similarity(  # the default: from A, Hu et al. eq. 4
        subspace_of(runs["lora_r2_s0"][name], source="factor"),
        subspace_of(runs["lora_r4_s0"][name], source="factor"),
    )
    got = sim[(sim.run_a == "lora_r2_s0") & (sim.module == name)]
    assert len(got) == 2 * 4
    assert set(sim.source) == {"factor"}
    for _, row in got.iterrows():
        assert row.phi == pytest.approx(float(phi[row.i - 1, row.j - 1]), abs=1e-5)
        assert row.random_baseline == pytest.approx(max(row.i, row.j) / 10)


def test_analyze_without_base_and_cli(
    study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tables = analyze_runs([study / "runs" / "lora_r2_s0"], None)
    assert len(tables["alignment"]) == 0 and len(tables["intruders"]) == 0
    assert tables["notes"].note.str.contains("no base_weights").any()
    from idlab.cli import main

    assert main(["analyze", str(study), "--out", str(tmp_path / "cli"), "--no-similarity"]) == 0
    assert (tmp_path / "cli" / "ranks.parquet").is_file()
    assert "ranks" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        analyze_runs([tmp_path / "nowhere"], None)


def _planted(root: Path, run_id: str, delta: LowRankDelta, seed: int) -> None:
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    save_deltas(d / "delta.safetensors", {"model.layers.0.self_attn.q_proj": delta})
    config = {"model": "tiny", "task": "toy", "method": "lora", "r": delta.A.shape[0], "seed": seed,
              "target_modules": ["q_proj"], "d": None}
    (d / "result.json").write_text(json.dumps({"run_id": run_id, "study": "s", "config": config,
                                               "status": "ok"}))


def test_phi_from_A_is_not_phi_from_delta_w(tmp_path: Path) -> None:
    """Known answer (Hu et al. eq. 4 vs the update's singular vectors). Run 1 (r=2): A has
    orthonormal rows a1, a2 with singular values 3 and 1, so A's top right-singular vector is a1;
    B = [0.1 e1, 10 e2] makes Delta W = 0.3 e1 a1^T + 10 e2 a2^T, whose top one is a2. Run 2
    (r=1, same seed): A' = a1. So phi(1, 1) is 1 from A and 0 from Delta W; phi(1, 2), against
    run 2's whole span, is 1 either way."""
    Q = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).Q
    a1, a2 = Q[:, 0], Q[:, 1]
    A = torch.stack([3 * a1, a2])  # (2, 10)
    B = torch.zeros(12, 2, dtype=torch.float64)
    B[0, 0], B[1, 1] = 0.1, 10.0
    root = tmp_path / "study"
    _planted(root, "r1", LowRankDelta(torch.randn(12, 1, dtype=torch.float64), a1[None, :].clone(), 1.0), 0)
    _planted(root, "r2", LowRankDelta(B, A, 1.0), 0)
    rows = {}
    for source in ("factor", "update"):
        sim = analyze_runs([root], None, similarity_source=source)["similarity"]  # type: ignore[arg-type]
        assert set(sim.source) == {source} and set(sim.pair_kind) == {"rank"}
        rows[source] = {(int(r.i), int(r.j)): float(r.phi) for r in sim.itertuples()}
    assert rows["factor"][(1, 1)] == pytest.approx(1.0, abs=1e-6)
    assert rows["update"][(1, 1)] == pytest.approx(0.0, abs=1e-6)
    assert rows["factor"][(1, 2)] == pytest.approx(1.0, abs=1e-6)
    assert rows["update"][(1, 2)] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="similarity_source='A'"):
        analyze_runs([root], None, similarity_source="A")  # type: ignore[arg-type]
