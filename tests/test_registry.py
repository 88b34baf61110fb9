"""The method registry: dispatch, refusals, and a method registered only here that runs end to end
through the sweep, the plan and the report without any other file knowing it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from idlab import methods
from idlab.config import RunConfig, study_from_dict
from idlab.errors import ConfigError
from idlab.methods import Axes, GridContext, Method, PlanTerms, Prepared
from idlab.methods.lora import LoraAxes
from idlab.models import linear_weights
from tests.test_sweep import FIXTURES, tiny_study


@dataclass(frozen=True)
class TailSettings:
    """The test method's block: train the last ``k`` parameter tensors."""

    k: tuple[int, ...] = field(default=(1, 2), metadata={"help": "number of trailing tensors that train"})
    lr: tuple[float, ...] = field(default=(1e-2,), metadata={"help": "learning rate(s)"})


@dataclass(frozen=True)
class TailAxes(Axes):
    k: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> TailAxes:
        return cls(k=int(cfg["k"]))

    def label(self) -> str:
        return f"k={self.k}"

    def variant(self) -> str:
        return "tail tuning"

    def size(self) -> int:
        return self.k


class Tail(Method[TailSettings, TailAxes]):
    """Trains the last k parameter tensors; its crossing on k is called k90."""

    name = "tail"
    settings_type = TailSettings
    axes_type = TailAxes
    help = "test method: the last k tensors train"
    size_key = "k"
    quantity = "k90"

    def cells(self, settings: TailSettings, ctx: GridContext | None = None) -> list[TailAxes]:
        return [TailAxes(k) for k in settings.k]

    def describe(self, settings: TailSettings, cells: Sequence[TailAxes]) -> str:
        return f"k {list(settings.k)} x lr {list(settings.lr)}"

    def _mark(self, model: nn.Module, k: int) -> None:
        params = list(model.parameters())
        for i, p in enumerate(params):
            p.requires_grad_(i >= len(params) - k)

    def prepare(self, model: nn.Module, axes: TailAxes, seed: int) -> Prepared:
        self._mark(model, axes.k)
        w0 = {n: w.detach().clone() for n, w in linear_weights(model).items()}
        return Prepared(model, {"k": axes.k},
                        lambda: {n: w.detach() - w0[n] for n, w in linear_weights(model).items()})

    def plan_model(self, model: nn.Module, axes: TailAxes, seed: int) -> nn.Module:
        self._mark(model, axes.k)
        return model

    def plan_terms(self, model: nn.Module, axes: TailAxes, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        return PlanTerms(host_copies=4 * sum(w.numel() for w in linear_weights(model).values()))


@pytest.fixture
def tail() -> Iterator[Tail]:
    m = Tail()
    methods.register(m)
    yield m
    methods.unregister(m.name)


@pytest.fixture(autouse=True)
def _fixture_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]))


def test_registry_dispatch_and_refusals() -> None:
    assert methods.names()[:3] == ("full", "lora", "subspace")
    assert methods.baseline_method().name == "full"
    with pytest.raises(ValueError, match="unknown method 'ia3'; registered methods: full, lora, subspace"):
        methods.get("ia3")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("lora"))
    with pytest.raises(ValueError, match=r"needs its axes \(LoraAxes\)"):
        RunConfig(method="lora")
    run = RunConfig(method="lora", axes=LoraAxes(r=4, target_modules=("q_proj", "v_proj"), lora_alpha=8.0))
    assert methods.variant(run.to_dict()) == "LoRA qv" and run.label() == "lora r=4 qv lr=0.001 seed=0"
    assert RunConfig.from_dict(run.to_dict()) == run


def test_an_unregistered_method_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"methods.*unknown method\(s\) \['tail'\]"):
        study_from_dict(tiny_study(tmp_path, methods=["full", "tail"]))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_method_registered_in_a_test_runs_through_sweep_plan_and_report(tail: Tail, tmp_path: Path) -> None:
    from idlab.report import make_report
    from idlab.sweep.driver import run_sweep
    from idlab.sweep.plan import plan_runs

    raw = tiny_study(tmp_path, methods=["full", "tail"], tail={"k": [1, 2, 4]}, seeds=[0])
    study = study_from_dict(raw)
    assert study.settings("tail") == TailSettings(k=(1, 2, 4))
    with pytest.raises(ConfigError, match=r"tail\.kk.*unknown key"):
        study_from_dict({**raw, "tail": {"kk": [1]}})
    # the plan: trainable counts are what the method marks
    plans = {p.label: p for p in plan_runs(study, device="cpu")}
    assert plans["tail k=1"].trainable_parameters == 3  # the last bias of the blobs MLP (3 classes)
    assert plans["tail k=2"].trainable_parameters == 16 * 3 + 3
    # the sweep trains it through the one loop
    summary = run_sweep(study)
    assert len(summary.ok) == 4 and not summary.failed
    # the report draws its curve and reads its crossing (k90) with the one estimator
    md = make_report(tmp_path, formats=("png",), analysis=False).read_text()
    assert "tail tuning" in md and "k90" in md
