"""train.precision: fp32 / tf32 / bf16-mixed / bf16 / auto; no host sync per step; divergence flag."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from idlab.config.run import RunConfig
from idlab.models import MLP
from idlab.training.devices import DeviceError, resolve_precision
from idlab.training.loop import TrainConfig, train
from tests.test_training import blobs

CPU = torch.device("cpu")


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MLP((2, 32, 3)).to(dtype)


def _cfg(precision: str, **kw: object) -> TrainConfig:
    base = {"lr": 1e-2, "steps": 60, "batch_size": 32, "eval_every": 20, "progress": False}
    return TrainConfig(precision=precision, **{**base, **kw})  # type: ignore[arg-type]


def test_bf16_mixed_loss_is_close_to_fp32_and_recorded() -> None:
    ref = train(_mlp(), blobs(), _cfg("fp32"))
    mixed = train(_mlp(), blobs(), _cfg("bf16-mixed"))
    assert ref.precision == "fp32" and mixed.precision == "bf16-mixed"
    assert mixed.to_dict()["precision"] == "bf16-mixed"
    for a, b in zip(ref.curve, mixed.curve):
        assert a["step"] == b["step"]
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=0.05, abs_tol=0.01)
        assert math.isclose(a["loss"], b["loss"], rel_tol=0.05, abs_tol=0.01)
    assert mixed.metrics["accuracy"] > 0.9
    # autocast really ran: bf16 rounding makes the two runs differ (the test can fail)
    assert ref.curve != mixed.curve


def test_bf16_mixed_reruns_are_bit_identical() -> None:
    a = train(_mlp(), blobs(), _cfg("bf16-mixed"))
    b = train(_mlp(), blobs(), _cfg("bf16-mixed"))
    assert a.curve == b.curve and a.metrics == b.metrics


def test_mixed_keeps_trainable_in_fp32_and_frozen_as_loaded() -> None:
    model = _mlp(torch.bfloat16)
    first, last = model.net[0], model.net[-1]
    first.requires_grad_(False)
    seen: list[torch.dtype] = []
    last.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    res = train(model, blobs(), _cfg("auto", steps=5, eval_every=None))
    assert res.precision == "bf16-mixed"  # auto with a bf16 model on the CPU
    assert first.weight.dtype == torch.bfloat16  # frozen: as loaded
    assert last.weight.dtype == torch.float32 and last.bias.dtype == torch.float32  # master weights
    assert set(seen) == {torch.bfloat16}  # the matmuls ran under autocast


def test_lora_adapters_theta_d_and_head_stay_fp32_under_mixed() -> None:
    from idlab.methods.lora_peft import apply_lora
    from idlab.subspace import SubspaceModel

    peft_model = apply_lora(_mlp(torch.bfloat16), 2, target_modules=["net.0"], modules_to_save=["net.2"])
    train(peft_model, blobs(), _cfg("bf16-mixed", steps=3, eval_every=None))
    trained = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert peft_model.get_base_model().net[0].base_layer.weight.dtype == torch.bfloat16

    model = _mlp(torch.bfloat16)
    sm = SubspaceModel(model, 20, said=True, exclude=["net.2"], train_excluded=True)
    train(sm, blobs(), _cfg("bf16-mixed", steps=3, eval_every=None))
    assert sm.theta_d.dtype == sm.lambdas.dtype == torch.float32  # type: ignore[union-attr]
    assert model.net[2].weight.dtype == torch.float32 and model.net[0].weight.dtype == torch.bfloat16


def test_pure_bf16_casts_every_parameter() -> None:
    model = _mlp()
    res = train(model, blobs(), _cfg("bf16", steps=20, eval_every=None))
    assert res.precision == "bf16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert res.metrics["accuracy"] > 0.6


def test_auto_is_fp32_for_an_fp32_model_on_the_cpu() -> None:
    assert train(_mlp(), blobs(), _cfg("auto", steps=2, eval_every=None)).precision == "fp32"


def test_bad_precision_values_are_named_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"precision='fp16'.*allowed values: auto, fp32, tf32"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(DeviceError, match=r"'tf32' needs a CUDA GPU.*use precision=fp32"):
        resolve_precision("tf32", CPU)
    with pytest.raises(DeviceError, match=r"'fp32' with a model holding bfloat16.*bf16-mixed"):
        resolve_precision("fp32", CPU, [torch.bfloat16, torch.float32])
    # a CUDA device without native bfloat16 (e.g. a V100), faked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    cuda = torch.device("cuda")
    with pytest.raises(DeviceError, match=r"'bf16-mixed' but cuda \(Tesla V100\) has no native bfloat16"):
        resolve_precision("bf16-mixed", cuda)
    assert resolve_precision("auto", cuda) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", cuda) == "bf16-mixed"
    # nothing trained: a bad precision fails in train() before any parameter moves
    model = _mlp(torch.bfloat16)
    w = model.net[0].weight.clone()
    with pytest.raises(DeviceError):
        train(model, blobs(), _cfg("fp32", steps=2))
    assert torch.equal(model.net[0].weight, w) and model.net[0].weight.dtype == torch.bfloat16


def test_study_config_rejects_an_unknown_precision() -> None:
    from idlab.config import ConfigError, study_from_dict

    with pytest.raises(ConfigError, match=r"train.precision.*'fp16'.*bf16-mixed"):
        study_from_dict({"train": {"precision": "fp16"}})
    assert study_from_dict({"train": {"precision": "bf16-mixed"}}).train.precision == "bf16-mixed"


# --------------------------------------------------------------------------- host syncs


class _SyncCounter:
    """Counts Tensor -> Python conversions (item, float, int, bool, tolist) made outside torch itself.

    On a CUDA device each of these waits for the stream; torch's own CPU-side step counters
    (optimizer state on the host) are excluded by the caller's file name.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sys

        self.calls = 0
        torch_dir = os.path.dirname(torch.__file__)
        for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
            orig = getattr(torch.Tensor, name)

            def wrapped(t: torch.Tensor, *a: object, _orig: object = orig, **k: object) -> object:
                caller = sys._getframe(1).f_code.co_filename
                if not caller.startswith(torch_dir):
                    self.calls += 1
                return _orig(t, *a, **k)  # type: ignore[operator]

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_no_host_sync_per_step(monkeypatch: pytest.MonkeyPatch, precision: str) -> None:
    counts = {}
    for steps in (10, 40):
        model = _mlp()
        counter = _SyncCounter(monkeypatch)
        train(model, blobs(), _cfg(precision, steps=steps, eval_every=None, grad_clip=1.0))
        counts[steps] = counter.calls
        monkeypatch.undo()
    # 30 more steps cost no conversion at all: the checks happen at the end (and the final eval)
    assert counts[40] == counts[10], counts


def test_syncs_grow_with_evaluations_only(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {}
    for steps in (20, 40):  # 1 vs 3 intermediate evaluations
        counter = _SyncCounter(monkeypatch)
        train(_mlp(), blobs(), _cfg("fp32", steps=steps, eval_every=10))
        counts[steps] = counter.calls
        monkeypatch.undo()
    per_eval = (counts[40] - counts[20]) / 2
    assert 0 < per_eval < 20, counts  # a handful per evaluation (loss, flag, metrics), none per step


def test_divergence_found_by_the_device_flag() -> None:
    calls = {"n": 0}

    def blow_up_at_7() -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(math.inf if calls["n"] >= 7 else 0.0)

    res = train(_mlp(), blobs(), _cfg("fp32", steps=500, eval_every=None), extra_loss=blow_up_at_7)
    assert res.diverged and res.steps == 6 and res.error == "loss became inf at step 7"
    assert calls["n"] == 100  # stopped at the first check (DIVERGENCE_CHECK_EVERY), not at step 500
    assert len(res.curve) == 1  # evaluated once, where it stopped

    calls["n"] = 0
    res = train(_mlp(), blobs(), _cfg("fp32", steps=50, eval_every=5), extra_loss=blow_up_at_7)
    assert res.diverged and res.steps == 6 and calls["n"] == 10  # the check at the step-10 evaluation
    assert [c["step"] for c in res.curve] == [5.0]  # keeps its last finite evaluation


# --------------------------------------------------------------------------- CUDA (make test-gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_precisions_and_sync_debug_mode() -> None:
    from idlab.training.loop import float32_matmul

    dev = torch.device("cuda")
    before = torch.backends.cuda.matmul.fp32_precision
    with float32_matmul("tf32", dev):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    with float32_matmul("fp32", dev):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == before
    for precision in ("fp32", "tf32", "bf16-mixed", "bf16"):
        res = train(_mlp(), blobs(), _cfg(precision, steps=30, device="cuda"))
        assert res.precision == precision and res.metrics["accuracy"] > 0.6
    # no synchronising call inside the steps: with sync debug mode "error" between log points
    import warnings

    model = _mlp()
    counts = {}
    for steps in (10, 40):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(model, blobs(), _cfg("bf16-mixed", steps=steps, eval_every=None, device="cuda"))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(x.message) for x in w)
    assert counts[40] == counts[10], counts


# --------------------------------------------------------------------------- Delta W


@pytest.mark.parametrize(("model_dtype", "precision"),
                         [(torch.bfloat16, "bf16-mixed"), (torch.float32, "bf16"), (torch.float32, "fp32")])
def test_full_delta_is_exact_against_theta_0(model_dtype: torch.dtype, precision: str) -> None:
    """Full FT's Delta W equals the float64 difference of what trained and where it started (< 1%)."""
    from idlab import methods

    model = _mlp(model_dtype)
    w0 = model.net[0].weight.detach().clone()
    run = RunConfig(method="full")
    prep = methods.get(run.method).prepare(model, run.axes, run.seed)
    train(prep.model, blobs(), _cfg(precision, steps=5, eval_every=None, lr=1e-4))
    start = w0.to(model.net[0].weight.dtype)  # pure bf16: training started from the bf16-rounded W_0
    ref = model.net[0].weight.detach().double() - start.double()
    got = prep.deltas()["net.0"]
    assert got.dtype == torch.float32 and ref.abs().max() > 0
    assert ((got.double() - ref).norm() / ref.norm()).item() < 0.01
    if precision == "bf16-mixed":
        assert model.net[0].weight.dtype == torch.float32  # fp32 master weights: the update is not rounded
        assert torch.equal(got.double(), ref)


def test_lora_deltas_do_not_copy_w0() -> None:
    from idlab import methods
    from idlab.methods.lora import LoraAxes
    from idlab.methods.lora_peft import apply_lora, lora_deltas

    run = RunConfig(method="lora", axes=LoraAxes(r=2, target_modules=("net.0",), lora_alpha=4.0))
    prep = methods.get(run.method).prepare(_mlp(torch.bfloat16), run.axes, run.seed)
    deltas = prep.deltas()
    assert deltas and all(d.base_weight is None for d in deltas.values())  # no W_0 on the host
    assert all(d.A.dtype == d.B.dtype == torch.float32 and d.A.device.type == "cpu" for d in deltas.values())
    # with the base weight: a view of the model's own storage, not a copy
    peft_model = apply_lora(_mlp(), 2, target_modules=["net.0"])
    d = lora_deltas(peft_model)["net.0"]
    w = peft_model.get_base_model().net[0].base_layer.weight
    assert d.base_weight is not None and d.base_weight.data_ptr() == w.data_ptr()
