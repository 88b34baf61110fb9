"""SubspaceModel: exact start, gradients, SAID count, delta/merged, state round trip, errors."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from idlab.models import lenet, mnist_fc
from idlab.subspace import SubspaceModel


def _standin_module() -> types.ModuleType:
    """Temporary explicit-dense stand-in for idlab.subspace.projections (used only if it is absent)."""
    mod = types.ModuleType("idlab.subspace.projections")

    class Projection(nn.Module):
        def __init__(self, kind: str, D: int, d: int, seed: int, device, dtype) -> None:
            super().__init__()
            self.kind, self.D, self.d, self.seed = kind, D, d, seed
            g = torch.Generator().manual_seed(seed)
            P = torch.randn(D, d, generator=g)
            self.register_buffer("P", (P / P.norm(dim=0)).to(device=device, dtype=dtype))

        def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
            return self.P @ theta_d

    def make_projection(kind, D, d, seed=0, device=None, dtype=torch.float32):
        if kind not in ("dense", "sparse", "fastfood"):
            raise ValueError(f"unknown projection kind {kind!r}")
        if kind == "fastfood" and d > D:
            raise ValueError(f"fastfood needs d <= D, got d={d}, D={D}")
        return Projection(kind, D, d, seed, device, dtype)

    mod.make_projection = make_projection  # type: ignore[attr-defined]
    return mod


if importlib.util.find_spec("idlab.subspace.projections") is None:  # pragma: no cover - until it lands
    sys.modules["idlab.subspace.projections"] = _standin_module()

KINDS = ["dense", "fastfood"]


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def tiny_llama(tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_theta_reproduces_mlp_and_lenet_exactly(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 28, 28)
    for net in (mnist_fc(), lenet()):
        ref = net(x)
        sm = SubspaceModel(net, dim=50, projection=kind)
        assert torch.equal(sm(x), ref)
        assert sm.D == sum(p.numel() for p in net.parameters())


def _theta0_of(module: nn.Module) -> torch.Tensor:
    """The module's stored weight: the parametrization's original when streamed, else the weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original  # type: ignore[no-any-return]
    return module.weight  # type: ignore[no-any-return]


def test_zero_theta_reproduces_llama_exactly() -> None:
    ids = torch.randint(0, 128, (2, 7))
    for tied in (False, True):
        net = tiny_llama(tied)
        ref = net(input_ids=ids).logits
        sm = SubspaceModel(net, dim=40, projection="fastfood", said=True)
        assert torch.equal(sm(input_ids=ids).logits, ref)
        n_unique = sum(p.numel() for p in net.parameters())  # parameters() dedups tied tensors
        assert sm.D == n_unique
        if tied:  # one theta_0 tensor (the parametrizations' original), read by both modules
            assert _theta0_of(net.lm_head) is _theta0_of(net.model.embed_tokens)
            assert len(sm.projected_names) == len(list(net.parameters()))
            torch.testing.assert_close(net.lm_head.weight, net.model.embed_tokens.weight)


def test_tied_weights_move_together() -> None:
    net = tiny_llama(tied=True)
    sm = SubspaceModel(net, dim=16, projection="dense")
    with torch.no_grad():
        sm.theta_d.normal_()
    merged = sm.merged()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 5))
    torch.testing.assert_close(sm(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_batchnorm_buffers_update_and_round_trip() -> None:
    torch.manual_seed(0)
    net = BNNet()
    sm = SubspaceModel(net, dim=10, projection="dense")
    before = net.bn.running_mean.clone()
    sm.train()
    sm(torch.randn(8, 1, 8, 8))
    assert not torch.equal(net.bn.running_mean, before)
    sm.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(0)
    assert torch.equal(sm(x), net(x))


def test_gradients_reach_only_subspace_params() -> None:
    torch.manual_seed(0)
    net = mnist_fc()
    sm = SubspaceModel(net, dim=30, projection="dense", said=True)
    sm(torch.rand(4, 784)).sum().backward()
    assert sm.theta_d.grad is not None and sm.theta_d.grad.abs().sum() > 0
    assert sm.lambdas is not None and sm.lambdas.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    trainable = [n for n, p in sm.named_parameters() if p.requires_grad]
    assert trainable == ["theta_d", "lambdas"]


def test_said_count_and_train_excluded_head() -> None:
    net = mnist_fc()
    m = len(list(net.parameters()))  # 6 tensors
    sm = SubspaceModel(net, dim=40, projection="dense", said=True)
    assert sm.m == m and sm.theta_d.numel() == 40 - m and sm.num_trainable == 40
    assert sum(p.numel() for p in sm.parameters() if p.requires_grad) == 40

    net = mnist_fc()
    sm = SubspaceModel(net, dim=40, projection="dense", said=True, exclude="net.4", train_excluded=True)
    head = 200 * 10 + 10
    assert sm.m == 4 and sm.num_trainable == 40 + head
    assert sum(p.numel() for p in sm.parameters() if p.requires_grad) == 40 + head
    sm(torch.rand(2, 784)).sum().backward()
    assert net.net[4].weight.grad is not None and net.net[0].weight.grad is None

    net = mnist_fc()
    sm = SubspaceModel(net, dim=5, projection="dense", include=["*.weight"], exclude="net.4")
    assert sm.projected_names == ["net.0.weight", "net.2.weight"]
    assert not net.net[4].weight.requires_grad and sm.num_trainable == 5


def test_delta_and_merged_consistent_with_forward() -> None:
    torch.manual_seed(0)
    net = lenet()
    x = torch.rand(3, 1, 28, 28)
    sm = SubspaceModel(net, dim=25, projection="fastfood", said=True, seed=3)
    with torch.no_grad():
        sm.theta_d.normal_()
        sm.lambdas.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    out = sm(x)
    merged = sm.merged()
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)
    deltas = sm.delta()
    assert set(deltas) == set(sm.projected_names)
    for name, p in zip(sm.projected_names, sm._theta0()):  # net itself is parametrized (streamed)
        torch.testing.assert_close(dict(merged.named_parameters())[name].detach(), p + deltas[name])
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())  # merged: a plain model
    flat = torch.cat([deltas[n].flatten() / sm.lambdas[i].detach() for i, n in enumerate(sm.projected_names)])  # type: ignore[index]
    torch.testing.assert_close(flat, sm.offset().detach(), rtol=1e-5, atol=1e-6)
    by_module = sm.delta(by_module=True)
    assert set(by_module) == {"classifier.0", "classifier.2", "classifier.4"}
    assert all(p.requires_grad for p in merged.parameters())


def test_state_dict_round_trip_restores_outputs() -> None:
    torch.manual_seed(0)
    net = mnist_fc()
    x = torch.rand(4, 784)
    sm = SubspaceModel(net, dim=12, projection="dense", said=True, seed=7, exclude="net.4", train_excluded=True)
    with torch.no_grad():
        sm.theta_d.normal_()
        sm.lambdas.mul_(1.3)  # type: ignore[union-attr]
        net.net[4].weight.add_(0.1)
    out = sm(x)
    sd = sm.state_dict()
    assert "theta_d" in sd and "lambdas" in sd and "_extra_state" in sd
    assert "model.net.4.weight" in sd and "model.net.0.weight" not in sd
    assert not any(k.startswith("projection.") for k in sd)
    assert sd["_extra_state"]["seed"] == 7

    torch.manual_seed(0)
    fresh = SubspaceModel(mnist_fc(), dim=12, projection="dense", said=True, seed=0,
                          exclude="net.4", train_excluded=True)
    res = fresh.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert fresh.seed == 7
    assert torch.equal(fresh(x), out)

    with pytest.raises(ValueError, match="dim"):
        SubspaceModel(mnist_fc(), dim=13, projection="dense", said=True,
                      exclude="net.4", train_excluded=True).load_state_dict(sd)


def test_l2_penalty_matches_theta_D_and_reuses_forward() -> None:
    torch.manual_seed(0)
    net = mnist_fc()
    sm = SubspaceModel(net, dim=8, projection="dense")
    with torch.no_grad():
        sm.theta_d.normal_()
    expected = sum(float((p + d).pow(2).sum()) for p, d in zip(net.parameters(), sm.delta().values()))
    pen = sm.l2_penalty(1e-4)
    assert pen.item() == pytest.approx(1e-4 * expected, rel=1e-5)
    loss = sm(torch.rand(2, 784)).sum()
    assert sm._cache is not None
    (loss + sm.penalty(1e-4)()).backward()
    assert sm._cache is None and sm.theta_d.grad is not None


def test_trains_with_the_training_loop() -> None:
    from idlab.data.vision import digits_task
    from idlab.models import MLP
    from idlab.training.loop import TrainConfig, train

    task = digits_task(flatten=True)
    sm = SubspaceModel(MLP((64, 32, 10)), dim=100, projection="fastfood")
    res = train(sm, task, TrainConfig(optimizer="adam", lr=2e-2, steps=60, batch_size=64, progress=False),
                extra_loss=sm.penalty(1e-5))
    assert res.trainable_parameters == 100
    assert res.metrics["accuracy"] > 0.3


def test_bad_inputs_raise_clear_errors() -> None:
    net = mnist_fc()
    for bad in (0, -3):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            SubspaceModel(net, dim=bad)
    with pytest.raises(ValueError, match="said=True needs dim > m"):
        SubspaceModel(mnist_fc(), dim=6, said=True, projection="dense")
    with pytest.raises(ValueError):
        SubspaceModel(mnist_fc(), dim=10, projection="no-such-kind")
    with pytest.raises(ValueError):
        SubspaceModel(nn.Linear(2, 2), dim=7, projection="fastfood")  # d > D = 6
    with pytest.raises(ValueError, match=r"matches no float parameter.*net\.0\.weight"):
        SubspaceModel(mnist_fc(), dim=10, include="encoder.*")
    with pytest.raises(ValueError, match="no floating-point parameters"):
        SubspaceModel(nn.ReLU(), dim=10)

    class IntOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.long), requires_grad=False)

    with pytest.raises(ValueError, match="no floating-point parameters"):
        SubspaceModel(IntOnly(), dim=1)
    with pytest.raises(ValueError, match="leave no tensor"):
        SubspaceModel(mnist_fc(), dim=3, exclude="*")
    with pytest.raises(ValueError, match=r"unknown projection_options \['cache'\]"):
        SubspaceModel(mnist_fc(), dim=3, projection_options={"cache": True})
    with pytest.raises(ValueError, match=r"cache_state is now fastfood_state"):
        SubspaceModel(mnist_fc(), dim=3, projection_options={"cache_state": "all"})
    with pytest.raises(ValueError, match=r"unknown projection layout 'tiles'"):
        SubspaceModel(mnist_fc(), dim=3, layout="tiles")
    for layout in ("blocks", "global"):
        with pytest.raises(ValueError, match=rf"layout '{layout}'.*d=7 > D=6"):
            SubspaceModel(nn.Linear(2, 2), dim=7, projection="fastfood", layout=layout)


def test_projection_options_change_memory_not_the_model() -> None:
    # a dense P held as a matrix and one regenerated block by block give the same model
    x = torch.randn(4, 1, 28, 28)
    outs = []
    for limit in (0, 1 << 30):
        torch.manual_seed(0)
        sm = SubspaceModel(lenet(), dim=50, projection="dense", seed=3,
                           projection_options={"dense_cache_limit": limit})
        assert sm.projection.cached == (limit > 0)  # type: ignore[union-attr]
        with torch.no_grad():
            sm.theta_d.copy_(torch.linspace(-1, 1, 50))
        outs.append(sm(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _with_offset(sm: SubspaceModel, offsets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t0 + o for n, t0, o in zip(sm.projected_names, sm._theta0(), offsets)}


@pytest.mark.parametrize("said", [False, True])
def test_streamed_blocks_equal_the_whole_offset(said: bool) -> None:
    """Per-tensor streaming gives theta_0 + lambda * split(P theta) and its exact gradients."""
    from torch.func import functional_call

    torch.manual_seed(0)
    net = lenet()
    plain = copy.deepcopy(net)  # the reference runs on an unwrapped copy
    x = torch.rand(3, 1, 28, 28)
    sm = SubspaceModel(net, dim=60, projection="fastfood", said=said, seed=2)
    assert sm.streamed and sm.layout == "blocks" and sm.projection.segments == tuple(sm._sizes)
    with torch.no_grad():
        sm.theta_d.normal_()
        if sm.lambdas is not None:
            sm.lambdas.uniform_(0.5, 1.5)
    out = sm(x)
    out.square().sum().backward()
    theta = sm.theta_d.detach().clone().requires_grad_(True)
    lam = sm.lambdas.detach().clone().requires_grad_(True) if sm.lambdas is not None else None
    pieces = sm.projection(theta).split(sm._sizes)  # the whole (D,) offset, autograd through cat
    offs = [p.view(s.shape) * (lam[i] if lam is not None else 1) for i, (s, p) in enumerate(zip(sm._slots, pieces))]
    ref = functional_call(plain, _with_offset(sm, offs), (x,))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().sum().backward()
    torch.testing.assert_close(sm.theta_d.grad, theta.grad, rtol=1e-4, atol=1e-6)
    if lam is not None:
        torch.testing.assert_close(sm.lambdas.grad, lam.grad, rtol=1e-4, atol=1e-6)  # type: ignore[union-attr]


def test_streamed_gradcheck_theta_and_lambdas() -> None:
    from torch.func import functional_call

    from idlab.subspace.streamed import StreamedWeight

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    plain = copy.deepcopy(net)
    sm = SubspaceModel(net, dim=12, projection="fastfood", said=True, dtype=torch.float64)
    assert sm.streamed
    x = torch.randn(4, 5, dtype=torch.float64)
    theta0 = torch.randn(sm.d_proj, dtype=torch.float64) * 0.1
    lam0 = torch.rand(sm.m, dtype=torch.float64) + 0.5

    def f(theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        ts = [StreamedWeight.apply(theta, lam[i], t0, sm.projection, i) for i, t0 in enumerate(sm._theta0())]
        return functional_call(plain, dict(zip(sm.projected_names, ts)), (x,))

    assert torch.autograd.gradcheck(f, (theta0.requires_grad_(True), lam0.requires_grad_(True)))


@pytest.mark.parametrize("said", [False, True])
def test_recompute_rebuilds_weights_and_gives_the_same_gradients(said: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """recompute=True: autograd keeps no weight (each is rebuilt in the backward), same bits."""
    grads, rebuilt = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        net, x = lenet(), torch.rand(3, 1, 28, 28)
        sm = SubspaceModel(net, dim=60, projection="fastfood", said=said, seed=2, recompute=recompute)
        with torch.no_grad():
            sm.theta_d.normal_()
        calls: list[int] = []

        def counted(self: SubspaceModel, i: int, calls: list[int] = calls,
                    real: Any = SubspaceModel.rebuild_weight) -> torch.Tensor:
            calls.append(i)
            return real(self, i)  # type: ignore[no-any-return]

        monkeypatch.setattr(SubspaceModel, "rebuild_weight", counted)
        out = sm(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in sm.parameters() if p.requires_grad])  # type: ignore[union-attr]
        rebuilt.append(sorted(set(calls)))
        monkeypatch.undo()
    assert rebuilt[0] == [] and len(rebuilt[1]) >= 5  # every conv / linear weight kept for a backward
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)


def test_global_layout_is_the_old_single_block() -> None:
    from idlab.subspace.fastfood import FastfoodProjection

    torch.manual_seed(0)
    sm = SubspaceModel(mnist_fc(), dim=50, projection="fastfood", layout="global", seed=1)
    assert isinstance(sm.projection, FastfoodProjection) and not sm.streamed
    assert sm.config()["layout"] == "global"
    state = sm.state_dict()
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "layout"}  # a pre-layout save
    torch.manual_seed(0)
    SubspaceModel(mnist_fc(), dim=50, projection="fastfood", layout="global", seed=1).load_state_dict(state)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"saved layout='global' but this wrapper has layout='blocks'"):
        SubspaceModel(mnist_fc(), dim=50, projection="fastfood", seed=1).load_state_dict(state)


@pytest.mark.parametrize("layout", ["blocks", "global"])
def test_delta_exact_in_bf16(layout: str) -> None:
    """delta() is the projection's offset in float32 (not a difference of rounded bf16 weights), for a
    bf16 model with an fp32 theta_d (bf16-mixed) and with a bf16 theta_d (pure bf16): equal to the
    float64 computation with the same theta_d values to float32 rounding."""
    theta = torch.linspace(-1e-3, 1e-3, 40 - 21).to(torch.bfloat16)  # d' = dim - m (m = 21 tensors)
    deltas = {}
    for model_dt, theta_dt in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32),
                               (torch.bfloat16, torch.bfloat16)):
        torch.manual_seed(0)
        net = tiny_llama().to(model_dt)
        sm = SubspaceModel(net, dim=40, projection="fastfood", said=True, seed=3, layout=layout, dtype=theta_dt)
        assert sm.d_proj == theta.numel()
        with torch.no_grad():
            sm.theta_d.copy_(theta)
        deltas[(model_dt, theta_dt)] = sm.delta()
        assert all(t.dtype == torch.promote_types(theta_dt, torch.float32) for t in deltas[(model_dt, theta_dt)].values())
        sm(input_ids=torch.randint(0, 128, (1, 5)))  # runs in the model's dtype
    ref = deltas.pop((torch.float64, torch.float64))
    for case, got in deltas.items():
        for name, r in ref.items():
            err = ((got[name].double() - r).norm() / r.norm()).item()
            assert err < 1e-5, (case, name, err)



def test_a_deep_copy_reads_its_own_theta() -> None:
    """copy.deepcopy of a streamed SubspaceModel: the copy's parametrizations follow the copy."""
    torch.manual_seed(0)
    sm = SubspaceModel(lenet(), dim=30, projection="fastfood", said=True, seed=1)
    x = torch.rand(2, 1, 28, 28)
    before = sm(x).detach()
    twin = copy.deepcopy(sm)
    with torch.no_grad():
        twin.theta_d.normal_()
    assert torch.equal(sm(x).detach(), before)  # the original is untouched
    assert not torch.allclose(twin(x), before)
    torch.testing.assert_close(twin.merged()(x), twin(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm.merged()(x), before, rtol=1e-5, atol=1e-5)  # merging leaves both wrappers whole
    assert torch.equal(sm(x).detach(), before) and not torch.allclose(twin(x), before)
