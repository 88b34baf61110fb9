"""The ``peft`` method: any PEFT method by name in a study (parsing, refusals before anything is written),
trainable counts against PEFT's, exact Delta W (known answers for LoRA, DoRA, OFT; merged weights
reproduce the adapted model's logits for every method), adapters reloading with the same logits, and a
tiny sweep + report with several PEFT curves, their p90 and the Pareto front."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from idlab import methods
from idlab.config import study_from_dict
from idlab.methods.peft_family import PeftAxes, PeftMethod, tuned_modules
from idlab.models import linear_weights, tiny_bert, tiny_llama
from idlab.sweep.driver import run_sweep
from idlab.sweep.grid import expand
from tests.test_refuse_early import _refused  # run_sweep refuses: needles named, nothing written

FIXTURES = Path(__file__).resolve().parent / "fixtures"
QV = ("q_proj", "v_proj")
BERT_QV = ("query", "value")


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def _study(results: Path, **over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "peft", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
        "methods": ["full", "peft"], "full": {"lr": [0.01]},
        "peft": [{"method": "vera", "r": [2, 4], "target_modules": [["net.0", "net.2"]], "lr": [0.03]}],
        "train": {"steps": 15, "batch_size": 32, "eval_every": 5, "optimizer": "adam"},
        "seeds": [0, 1], "results_dir": str(results), "device": "cpu",
    }
    raw.update(over)
    return raw




def _perturb(model: nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """What training does to the trainable entries: move them off their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _ids() -> torch.Tensor:
    return torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def _prepared(base: nn.Module, method: str, size: int | None, targets: tuple[str, ...] = QV,
              **options: Any) -> Any:
    axes = PeftAxes(method, size, targets, tuple(sorted(options.items())))
    return PeftMethod().prepare(base, axes, seed=0)


# --------------------------------------------------------------------------------------------------
# study parsing and refusals


def test_study_entries_sizes_options_and_per_method_learning_rates(tmp_path: Path) -> None:
    raw = _study(tmp_path, peft=[
        {"method": "vera", "r": [2, 4], "target_modules": [["net.0", "net.2"]], "lr": [0.01, 0.03]},
        {"method": "IA3", "target_modules": [["net.0"]], "feedforward_modules": ["net.0"], "lr": 0.003},
        {"method": "dora", "r": 1, "lora_alpha": 4, "target_modules": [["net.0", "net.2"]], "lr": [0.001]}])
    study = study_from_dict(raw)
    e = study.settings("peft").entries
    assert [x.method for x in e] == ["vera", "ia3", "dora"] and e[0].size == (2, 4) and e[1].size == ()
    assert e[1].options == (("feedforward_modules", ("net.0",)),) and e[2].options == (("lora_alpha", 4),)
    runs = expand(study)
    got = sorted({(c.axes.label(), c.train.lr) for _, c in runs if c.method == "peft"})
    assert got == [("DoRA r=1 net.0+net.2", 0.001), ("IA3 net.0", 0.003), ("VeRA r=2 net.0+net.2", 0.01),
                   ("VeRA r=2 net.0+net.2", 0.03), ("VeRA r=4 net.0+net.2", 0.01), ("VeRA r=4 net.0+net.2", 0.03)]
    assert len(runs) == 2 + 2 * 6
    cfg = next(c for _, c in runs if c.method == "peft" and c.axes.peft_method == "dora")
    assert methods.variant(cfg.to_dict()) == "DoRA net.0+net.2 lora_alpha=4"
    assert methods.axes_from_config(cfg.to_dict()) == cfg.axes and cfg.axes.size() == 1
    # the list form and the mapping form are one block; other fields may also go under options
    assert study_from_dict({**raw, "peft": {"entries": raw["peft"]}}).settings("peft") == study.settings("peft")
    dora = {"method": "dora", "r": 1, "options": {"lora_alpha": 4}, "target_modules": [["net.0", "net.2"]],
            "lr": [0.001]}
    assert study_from_dict({**raw, "peft": [dora]}).settings("peft").entries == e[2:]


@pytest.mark.parametrize(("entry", "needles"), [
    ({"method": "verra", "r": [2], "lr": [0.01]}, ["peft[0].method", "'verra'", "vera", "ia3", "oft", "dora"]),
    ({"method": "vera", "r": [2], "lr": [0.01], "alpha": 3}, ["peft[0].alpha", "VeraConfig", "d_initial",
                                                               "the size axis is r"]),
    ({"method": "vera", "r": [2]}, ["peft[0].lr", "required"]),
    ({"method": "ia3", "r": [2], "lr": [0.01]}, ["peft[0].r", "IA3Config", "no size axis"]),
    ({"method": "prompt_tuning", "lr": [0.01]}, ["peft[0].method", "prompt"]),
    ({"method": "loha", "r": [2], "lr": ["fast"]}, ["peft[0].lr[0]", "'fast'", "expected a number"]),
])
def test_block_refusals_name_key_and_fix(tmp_path: Path, entry: dict[str, Any], needles: list[str]) -> None:
    res = tmp_path / "results"
    _refused(_study(res, peft=[entry]), res, *needles)


def test_model_refusals_before_anything_is_written(tmp_path: Path) -> None:
    res = tmp_path / "results"
    # a target set the model lacks names the model's modules
    _refused(_study(res, peft=[{"method": "loha", "r": [2], "target_modules": ["qv"], "lr": [0.01]}]), res,
             "peft[0].target_modules", "'q_proj'", "'net.0'", "'net.2'")
    # a size PEFT refuses, or silently adjusts (OFT blocks must divide d_in = 8)
    _refused(_study(res, peft=[{"method": "oft", "oft_block_size": [2, 3], "target_modules": [["net.0"]],
                                "lr": [0.01]}]), res, "peft[0]", "PEFT refuses OFT oft_block_size=3", "Adjusted")
    _refused(_study(res, peft=[{"method": "fourierft", "n_frequency": [10, 1000], "target_modules": [["net.0"]],
                                "lr": [0.01]}]), res, "peft[0]", "PEFT refuses FourierFT n_frequency=1000")
    # bias tuning on a bias-free Llama
    llama = {"name": "idlab_fixture_tasks:tiny_llama_classifier"}
    _refused(_study(res, model=llama, peft=[{"method": "bias", "target_modules": ["qv"], "lr": [0.01]}]), res,
             "peft[0].target_modules", "bias tuning needs biases", "q_proj")


# --------------------------------------------------------------------------------------------------
# counts, Delta W, reload

#: (method, size, options) on q/v of the tiny models: every method the module's table names a knob for
CASES: list[tuple[str, int | None, dict[str, Any]]] = [
    ("lora", 4, {}), ("rslora", 4, {}), ("dora", 2, {}), ("pissa", 2, {}), ("olora", 2, {}), ("vera", 8, {}),
    ("loha", 2, {}), ("lokr", 2, {}), ("oft", 8, {}), ("boft", 8, {}), ("hra", 2, {}), ("hira", 2, {}),
    ("ia3", None, {"feedforward_modules": []}), ("fourierft", 40, {}),
    ("vblora", 2, {"vector_length": 16, "num_vectors": 16}), ("randlora", 2, {}), ("c3a", 8, {}),
    ("shira", 4, {}), ("unilora", 4, {}), ("tinylora", 2, {}),
]


@pytest.mark.parametrize(("method", "size", "options"), CASES, ids=[c[0] for c in CASES])
def test_count_matches_peft_and_delta_w_reproduces_the_model(method: str, size: int | None,
                                                            options: dict[str, Any]) -> None:
    """Trainable count = PEFT's (head counted once); W_0 + Delta W in a fresh base gives the adapted logits."""
    base = tiny_llama(num_labels=2, seed=3)
    prep = _prepared(copy.deepcopy(base), method, size, **options)
    pm = prep.model
    n = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    head = sum(p.numel() for p in base.score.parameters())
    assert n == pm.get_nb_trainable_parameters()[0] and n > head
    assert sum(p.numel() for nme, p in pm.named_parameters() if p.requires_grad and "score" in nme) == head
    _perturb(pm)
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    deltas = prep.deltas()
    assert set(deltas) == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in QV}
    assert prep.info["delta"].startswith("exact")
    rebuilt = copy.deepcopy(base)
    w = linear_weights(rebuilt)
    trained_head = {k.split("modules_to_save.default.")[-1]: v for k, v in pm.named_parameters()
                    if "score" in k and "modules_to_save" in k}
    with torch.no_grad():
        for k, d in deltas.items():
            w[k].add_(d)
        rebuilt.score.weight.copy_(trained_head["weight"])
        got = rebuilt(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # extracting left the training model as it was
        torch.testing.assert_close(pm(input_ids=ids).logits, want)


def test_delta_w_known_answers_lora_dora_oft() -> None:
    base = tiny_llama(num_labels=2, seed=4)
    w0 = {k: v.detach().clone() for k, v in linear_weights(base).items()}
    key = "model.layers.0.self_attn.q_proj"
    # LoRA: s B A
    prep = _prepared(copy.deepcopy(base), "lora", 4, lora_alpha=8)
    _perturb(prep.model)
    layer = tuned_modules(prep.model)[key]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(prep.deltas()[key], 2.0 * b @ a)
    # DoRA: W' = m * (W_0 + s B A) / ||W_0 + s B A|| per output row (PEFT's norm over dim 1 of (d_out, d_in))
    prep = _prepared(copy.deepcopy(base), "dora", 2, lora_alpha=2)
    _perturb(prep.model)
    layer = tuned_modules(prep.model)[key]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    v = w0[key] + 1.0 * b @ a
    want = m[:, None] * v / v.norm(dim=1, keepdim=True) - w0[key]
    torch.testing.assert_close(prep.deltas()[key], want.detach(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(want, b @ a)  # the magnitude rescaling matters: get_delta_weight would miss it
    # OFT: W' = W_0 R^T with R (d_in, d_in) block-diagonal, 8 x 8 blocks (PEFT multiplies R by W^T; R is
    # orthogonal only up to its truncated Cayley-Neumann series)
    prep = _prepared(copy.deepcopy(base), "oft", 8)
    _perturb(prep.model)
    layer = tuned_modules(prep.model)[key]
    r = layer.get_delta_weight("default")
    blocks = torch.block_diag(*[torch.ones(8, 8)] * (r.shape[0] // 8)).bool()
    assert r.shape == (32, 32) and not r[~blocks].any() and not torch.allclose(r, torch.eye(32))
    torch.testing.assert_close(prep.deltas()[key], (w0[key] @ r.T - w0[key]).detach(), atol=1e-6, rtol=1e-5)


def test_methods_without_delta_w_say_why() -> None:
    for method, size, targets in (("lily", 2, QV), ("ln_tuning", None, ("input_layernorm",))):
        prep = _prepared(tiny_llama(num_labels=2), method, size, targets)
        assert prep.deltas() == {} and "delta" not in prep.info
        assert ("cannot merge" if method == "lily" else "layer-norm") in prep.info["no_delta"]


@pytest.mark.parametrize(("method", "size", "bert"), [("lora", 4, False), ("dora", 2, True), ("vera", 8, False),
                                                     ("ia3", None, True), ("oft", 8, False), ("loha", 2, True)])
def test_adapter_reloads_with_the_same_logits(tmp_path: Path, method: str, size: int | None, bert: bool) -> None:
    from peft import PeftModel

    def make() -> nn.Module:
        return tiny_bert(num_labels=2) if bert else tiny_llama(num_labels=2)

    opts = {"feedforward_modules": []} if method == "ia3" else {}
    prep = _prepared(make(), method, size, BERT_QV if bert else QV, **opts)
    _perturb(prep.model)
    prep.save(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    ids = _ids()
    loaded = PeftModel.from_pretrained(make(), str(tmp_path / "adapter")).eval()
    prep.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, prep.model(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------------
# sweep + report


def test_pareto_front() -> None:
    from idlab.report.tables import pareto_front

    cells = pd.DataFrame({"variant": list("abcde"), "trainable_parameters": [10, 20, 20, 40, 5],
                          "mean": [0.5, 0.7, 0.6, 0.65, 0.5], "selected": True})
    front = pareto_front(cells)
    assert list(front["variant"]) == ["e", "a", "b"]  # a ties e's score at more parameters: not dominated


def test_sweep_and_report_carry_every_peft_curve_its_p90_and_the_pareto_front(tmp_path: Path) -> None:
    from idlab.report import make_report

    nets = [["net.0", "net.2"]]
    raw = _study(tmp_path, seeds=[0], peft=[
        {"method": "vera", "r": [1, 3], "target_modules": nets, "lr": [0.05]},
        {"method": "loha", "r": [1, 2], "target_modules": nets, "lr": [0.03]},
        {"method": "fourierft", "n_frequency": [4, 16], "target_modules": nets, "lr": [0.05]},
        {"method": "ia3", "target_modules": nets, "feedforward_modules": ["net.0"], "lr": [0.05]}])
    summary = run_sweep(study_from_dict(raw))
    assert len(summary.ok) == 1 + 7 and not summary.failed
    md = make_report(tmp_path, formats=("png",)).read_text()
    for v in ("VeRA net.0+net.2", "LoHa net.0+net.2", "FourierFT net.0+net.2", "IA3 net.0+net.2"):
        assert v in md, v
    head = md.split("### Figures")[0]
    assert head.count("| p90") >= 3 and "| IA3" not in head  # one crossing per curve with a size axis
    assert "Pareto front" in md and "Is ΔW low-rank" in md
