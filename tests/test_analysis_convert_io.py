"""Eckart-Young conversion to LoRA, the PEFT adapter writer hook, and delta files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlab.analysis import (
    deltas_to_adapter,
    load_delta_metadata,
    load_deltas,
    save_deltas,
    to_lora,
)
from idlab.deltas.lowrank import LowRankDelta


def _rank_k(d_out: int, d_in: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def test_to_lora_exact_when_r_at_least_rank() -> None:
    M = _rank_k(40, 30, [5.0, 3.0, 1.0])
    for r in (3, 4, 30):
        lr, res = to_lora(M, r)
        assert lr.r == r and lr.scale == 1.0 and lr.B.shape == (40, r) and lr.A.shape == (r, 30)
        assert res == pytest.approx(0.0, abs=1e-20)
        assert torch.allclose(lr.dense(), M, atol=1e-12)


def test_to_lora_leaves_dropped_energy() -> None:
    M = _rank_k(40, 30, [5.0, 3.0, 1.0])
    lr, res = to_lora(M, 1)
    assert res == pytest.approx((9 + 1) / (25 + 9 + 1), rel=1e-12)
    resid = float(((M - lr.dense()) ** 2).sum())
    assert resid == pytest.approx(10.0, rel=1e-10)
    # a LowRankDelta input is re-truncated via its factored SVD; dtype kept
    g = torch.Generator().manual_seed(1)
    delta = LowRankDelta(
        torch.randn(20, 6, generator=g), torch.randn(6, 15, generator=g), 0.25, name="x"
    )
    lr2, res2 = to_lora(delta, 8)  # r above the rank: exact, zero padding
    assert lr2.B.dtype == torch.float32 and lr2.name == "x"
    assert torch.allclose(lr2.dense(torch.float64), delta.dense(torch.float64), atol=1e-4)
    assert res2 == pytest.approx(0.0, abs=1e-12)


def test_to_lora_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"r=31 must be an int in \[1, 30\]"):
        to_lora(torch.randn(40, 30), 31)
    with pytest.raises(ValueError, match="r=0"):
        to_lora(torch.randn(40, 30), 0)
    bad = torch.randn(5, 5)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_lora(bad, 2)


def test_deltas_to_adapter(tmp_path: Path) -> None:
    lora = pytest.importorskip("idlab.methods.lora_peft")
    if not hasattr(lora, "write_adapter"):
        pytest.skip("idlab.methods.lora_peft.write_adapter not available yet")
    deltas = {
        "model.layers.0.self_attn.q_proj": _rank_k(16, 12, [4.0, 2.0, 1.0]).float(),
        "model.layers.0.self_attn.v_proj": LowRankDelta(torch.randn(8, 2), torch.randn(2, 12), 0.5),
    }
    res = deltas_to_adapter(deltas, 2, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert res["model.layers.0.self_attn.q_proj"] == pytest.approx(1 / 21, rel=1e-5)
    assert res["model.layers.0.self_attn.v_proj"] == pytest.approx(0.0, abs=1e-9)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and float(cfg["lora_alpha"]) == 2.0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_save_load_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = {
        "model.layers.3.self_attn.q_proj": LowRankDelta(
            torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g), 0.125
        ),
        "net.0": torch.randn(7, 5, generator=g).T,  # non-contiguous dense
        "net.2": torch.randn(3, 7, generator=g, dtype=torch.float64),
    }
    p = save_deltas(tmp_path / "delta.safetensors", deltas, metadata={"run_id": "abc", "r": 4})
    assert p.is_file() and not list(tmp_path.glob(".*tmp"))
    back = load_deltas(p)
    assert set(back) == set(deltas)
    q = back["model.layers.3.self_attn.q_proj"]
    assert (
        isinstance(q, LowRankDelta)
        and q.scale == 0.125
        and q.name == "model.layers.3.self_attn.q_proj"
    )
    orig = deltas["model.layers.3.self_attn.q_proj"]
    assert isinstance(orig, LowRankDelta)
    assert torch.equal(q.A, orig.A) and torch.equal(q.B, orig.B)
    assert torch.equal(back["net.0"], deltas["net.0"])  # type: ignore[arg-type]
    assert back["net.2"].dtype == torch.float64  # type: ignore[union-attr]
    assert load_delta_metadata(p) == {"run_id": "abc", "r": 4}
    # file layout per docs/CONTRACTS.md
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {
        "model.layers.3.self_attn.q_proj.lora_A",
        "model.layers.3.self_attn.q_proj.lora_B",
        "net.0.delta",
        "net.2.delta",
    }
    assert json.loads(meta["scales"]) == {"model.layers.3.self_attn.q_proj": 0.125}


def test_save_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PEFT"):
        save_deltas(tmp_path / "d.safetensors", {"base_model.model.net.0": torch.ones(2, 2)})
    bad = torch.ones(2, 2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_deltas(tmp_path / "d.safetensors", {"net.0": bad})
    with pytest.raises(ValueError, match="2-D"):
        save_deltas(tmp_path / "d.safetensors", {"net.0": torch.ones(2)})
    assert not (tmp_path / "d.safetensors").exists()
    with pytest.raises(FileNotFoundError):
        load_deltas(tmp_path / "missing.safetensors")
