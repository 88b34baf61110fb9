"""idlab.methods.lora_peft: PEFT LoRA wrapping, counting, LowRankDelta read-out, PEFT-format adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlab.deltas.lowrank import LowRankDelta
from idlab.methods.lora_peft import (
    apply_lora,
    count_parameters,
    load_adapter,
    lora_deltas,
    parameter_summary,
    save_adapter,
    write_adapter,
)
from idlab.models import mnist_fc, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")


def _ids(seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=x).logits


def test_llama2_7b_parameter_count_on_meta() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    assert count_parameters(base) == (6_738_415_616, 6_738_415_616)
    model = apply_lora(base, r=8, target_modules=("q_proj", "v_proj"))
    total, trainable = count_parameters(model)
    assert (total, trainable) == (6_742_609_920, 4_194_304)
    assert round(100 * trainable / total, 2) == 0.06
    assert parameter_summary(model) == (
        "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    )


def test_only_adapters_trainable_and_alpha_default() -> None:
    model = apply_lora(tiny_llama(), r=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for d in lora_deltas(model).values():
        assert d.scale == 1.0  # lora_alpha defaults to r
        assert torch.count_nonzero(d.B) == 0  # B starts at zero
    # rsLoRA: alpha / sqrt(r)
    rs = apply_lora(tiny_llama(), r=4, lora_alpha=8, use_rslora=True)
    assert all(d.scale == pytest.approx(8 / 2) for d in lora_deltas(rs).values())


@pytest.mark.parametrize("rs", [False, True])
def test_deltas_equal_merged_minus_base(rs: bool) -> None:
    base = tiny_llama(seed=1)
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = apply_lora(
        base, r=4, lora_alpha=6, target_modules="all-linear", use_rslora=rs, init_lora_weights=False,
        rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3},
    )
    deltas = lora_deltas(model)
    assert "lm_head" not in deltas  # all-linear leaves the output layer out
    assert len(deltas) == 2 * 7
    assert deltas["model.layers.0.mlp.down_proj"].r == 2
    for name, d in deltas.items():
        assert isinstance(d, LowRankDelta) and d.name == name
        assert d.base_weight is not None and torch.equal(d.base_weight, w0[name])
    merged = model.merge_and_unload()
    for name, d in deltas.items():
        w = dict(merged.named_modules())[name].weight.detach()
        torch.testing.assert_close(d.dense(), w - w0[name], rtol=1e-5, atol=1e-6)


def test_lm_head_target_and_plain_mlp() -> None:
    model = apply_lora(tiny_llama(), r=2, target_modules=["lm_head"])
    assert list(lora_deltas(model)) == ["lm_head"]
    mlp = apply_lora(mnist_fc(), r=4, target_modules=["net.0", "net.2"])
    total, trainable = count_parameters(mlp)
    assert trainable == 4 * (784 + 200) + 4 * (200 + 200)
    assert total == 199_210 + trainable
    assert sorted(lora_deltas(mlp)) == ["net.0", "net.2"]
    out = mlp(torch.randn(3, 784))
    assert out.shape == (3, 10)


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="r must be a positive integer, got r=0"):
        apply_lora(tiny_llama(), r=0)
    with pytest.raises(ValueError, match=r"r=40 exceeds min\(d_in, d_out\).*q_proj"):
        apply_lora(tiny_llama(), r=40)
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        apply_lora(tiny_llama(), r=4, lora_alpha=0)
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module.*q_proj.*model\.layers\.0"):
        apply_lora(tiny_llama(), r=4, target_modules=["qproj"])
    with pytest.raises(ValueError, match=r"net\.0"):
        apply_lora(mnist_fc(), r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(tiny_llama(), r=4, modules_to_save=["head"])
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_deltas(tiny_llama())


def test_save_load_roundtrip_peft_format(tmp_path: Path) -> None:
    from peft import PeftModel

    model = apply_lora(tiny_llama(seed=2), r=4, lora_alpha=8, init_lora_weights=False)
    x = _ids()
    ref = _logits(model, x)
    out = save_adapter(model, tmp_path / "adapter")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    loaded = PeftModel.from_pretrained(tiny_llama(seed=2), str(out))
    assert torch.equal(_logits(loaded, x), ref)
    again = load_adapter(tiny_llama(seed=2), out)
    assert torch.equal(_logits(again, x), ref)
    # saving again replaces the folder atomically
    save_adapter(model, out)
    assert {p.name for p in out.iterdir()} == files
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(tiny_llama(), tmp_path / "nothing")


def test_write_adapter_from_deltas(tmp_path: Path) -> None:
    from peft import PeftModel

    model = apply_lora(
        tiny_llama(seed=3), r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False,
        rank_pattern={"gate_proj": 2}, alpha_pattern={"o_proj": 12},
    )
    x = _ids(1)
    ref = _logits(model, x)
    deltas = lora_deltas(model)
    path = write_adapter(deltas, tmp_path / "w", base_model_name_or_path="tiny")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["base_model_name_or_path"] == "tiny"
    assert sorted(cfg["target_modules"]) == sorted(deltas)
    assert set(cfg["rank_pattern"].values()) == {2} and list(cfg["alpha_pattern"].values()) == [12.0, 12.0]
    loaded = PeftModel.from_pretrained(tiny_llama(seed=3), str(path))
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=1e-6, atol=1e-6)
    for name, d in lora_deltas(loaded).items():
        torch.testing.assert_close(d.dense(), deltas[name].dense())


def test_write_adapter_arbitrary_factors(tmp_path: Path) -> None:
    base = tiny_llama(seed=4)
    g = torch.Generator().manual_seed(0)
    deltas = {
        "model.layers.1.self_attn.q_proj": LowRankDelta(torch.randn(32, 3, generator=g), torch.randn(3, 32, generator=g), 0.25),
        "model.layers.0.mlp.up_proj": LowRankDelta(torch.randn(64, 5, generator=g), torch.randn(5, 32, generator=g), 1.0),
    }
    path = write_adapter(deltas, tmp_path / "a")
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if n in deltas}
    merged = load_adapter(base, path).merge_and_unload()
    for name, d in deltas.items():
        w = dict(merged.named_modules())[name].weight.detach()
        torch.testing.assert_close(w - w0[name], d.dense(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scale=0"):
        write_adapter({"x": LowRankDelta(torch.ones(2, 1), torch.ones(1, 2), 0.0)}, tmp_path / "b")
    with pytest.raises(ValueError, match="prefix"):
        write_adapter({"base_model.model.x": LowRankDelta(torch.ones(2, 1), torch.ones(1, 2))}, tmp_path / "c")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_classification_head_modules_to_save(tmp_path: Path, arch: str) -> None:
    def make() -> torch.nn.Module:
        return tiny_llama(num_labels=3, seed=5) if arch == "llama" else tiny_bert(num_labels=3, seed=5)

    head = "score" if arch == "llama" else "classifier"
    targets = ("q_proj", "v_proj") if arch == "llama" else ("query", "value")
    model = apply_lora(make(), r=2, target_modules=targets, init_lora_weights=False)
    extra = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra and all(f"{head}.modules_to_save" in n for n in extra)
    with torch.no_grad():  # move the head away from its initial value
        for n, p in model.named_parameters():
            if f"{head}.modules_to_save" in n:
                p.add_(0.5)
    x = _ids(2)
    ref = _logits(model, x)
    path = save_adapter(model, tmp_path / "cls")
    loaded = load_adapter(make(), path)
    assert torch.equal(_logits(loaded, x), ref)
    merged = load_adapter(make(), path).merge_and_unload()
    torch.testing.assert_close(_logits(merged, x), ref, rtol=1e-5, atol=1e-5)
    # all-linear never adapts the head, with or without modules_to_save
    for save in ("auto", None):
        al = apply_lora(make(), r=4, target_modules="all-linear", modules_to_save=save)
        assert not [k for k in lora_deltas(al) if k.startswith(head)]
    # explicitly no head: only adapters train
    bare = apply_lora(make(), r=2, target_modules=targets, modules_to_save=None)
    assert all("lora_" in n for n, p in bare.named_parameters() if p.requires_grad)


def test_train_loop_updates_only_adapters() -> None:
    from idlab.data.base import ClassificationTask
    from idlab.training.loop import TrainConfig, train

    model = apply_lora(tiny_llama(num_labels=2, seed=6), r=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (16, 8), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    y = (ids[:, 0] > 64).long()
    task = ClassificationTask(x, y, x, y, name="toy")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    res = train(model, task, TrainConfig(lr=1e-2, steps=3, batch_size=8, progress=False, device="cpu"))
    assert res.steps == 3 and res.trainable_parameters == count_parameters(model)[1]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert any(torch.count_nonzero(d.B) for d in lora_deltas(model).values())
