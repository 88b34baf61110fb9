"""The one training loop: determinism, divergence, evaluation bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from idlab.data.base import ClassificationTask
from idlab.models import MLP
from idlab.training.loop import TrainConfig, train


def blobs(seed: int = 0, n: int = 256) -> ClassificationTask:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (2 * n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]])
    x = centers[y] + 0.5 * torch.randn(2 * n, 2, generator=g)
    return ClassificationTask(x[:n], y[:n], x[n:], y[n:], name="blobs")


def test_learns_and_is_bit_identical() -> None:
    cfg = TrainConfig(lr=1e-2, steps=60, batch_size=32, eval_every=20, progress=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train(MLP((2, 16, 3)), blobs(), cfg))
    a, b = runs
    assert a.metrics["accuracy"] > 0.9
    assert a.metrics == b.metrics and a.curve == b.curve
    assert [c["step"] for c in a.curve] == [20.0, 40.0, 60.0]
    assert a.best["accuracy"] == max(c["accuracy"] for c in a.curve)
    assert a.trainable_parameters == 2 * 16 + 16 + 16 * 3 + 3


def test_divergence_stops_the_run() -> None:
    torch.manual_seed(0)
    model = MLP((2, 8, 3))
    res = train(model, blobs(), TrainConfig(steps=50, progress=False),
                extra_loss=lambda: torch.tensor(math.inf))
    assert res.diverged and res.steps == 0 and "inf" in (res.error or "")


def test_only_requires_grad_parameters_move() -> None:
    torch.manual_seed(0)
    model = MLP((2, 8, 3))
    first = model.net[0]
    first.weight.requires_grad_(False)
    w0 = first.weight.clone()
    train(model, blobs(), TrainConfig(steps=5, progress=False))
    assert torch.equal(first.weight, w0)


def test_bad_config_is_named() -> None:
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")  # type: ignore[arg-type]
    model = MLP((2, 3))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, blobs(), TrainConfig(steps=1, progress=False))


def test_public_names_are_not_shadowed_by_submodules() -> None:
    """`idlab.train` stays the function after every submodule has been imported."""
    import importlib

    import idlab

    for name in ("training", "subspace", "subspace.projections", "methods", "methods.lora_peft", "d90", "models", "analysis"):
        importlib.import_module(f"idlab.{name}")
    for name in idlab.__all__:
        obj = getattr(idlab, name)
        if name != "analysis":
            assert not isinstance(obj, type(idlab)), f"idlab.{name} is a module, not the public object"
    assert callable(idlab.train) and idlab.train.__module__ == "idlab.training.loop"


def test_peak_memory_is_per_run_on_linux() -> None:
    """A big allocation before the run does not count in the run's peak RSS."""
    from idlab.training.loop import _peak_memory, _reset_peak_rss

    if not _reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS counter")
    big = torch.ones(96 * 2**20)  # 384 MiB, touched
    before = _peak_memory(torch.device("cpu"))  # the process's peak so far, with `big`
    del big
    cfg = TrainConfig(lr=1e-2, steps=5, batch_size=32, progress=False)
    res = train(MLP((2, 16, 3)), blobs(), cfg)
    assert 0 < res.peak_memory_bytes < before - 256 * 2**20
