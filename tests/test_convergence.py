"""The convergence rule (idlab.training.convergence) and `until: converged` in the training loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from idlab.training.convergence import (
    ConvergenceRule,
    check_convergence,
    mark_unconverged,
    patience_exhausted,
    plateau_gain,
    run_converged,
    unconverged_points,
    validate_until,
)
from idlab.training.loop import TrainConfig, train


def curve(values: list[float], every: int = 10) -> list[dict[str, float]]:
    return [{"step": float(every * (i + 1)), "accuracy": v} for i, v in enumerate(values)]


def test_plateaued_curve_is_converged_and_rising_curve_is_not() -> None:
    flat = curve([0.5, 0.8, 0.9, 0.95, 0.96, 0.961, 0.9605, 0.961, 0.9608, 0.961])
    rising = curve([0.1 * i for i in range(1, 11)])
    # steps 10..100, window 20%: t0 = 80 -> window {90, 100}, before {10..80}
    assert plateau_gain(flat, "accuracy") == pytest.approx(0.0)
    assert plateau_gain(rising, "accuracy") == pytest.approx(1.0 - 0.8)
    ok = check_convergence(flat, "accuracy", True, ConvergenceRule(tol=0.002))
    bad = check_convergence(rising, "accuracy", True, ConvergenceRule(tol=0.002))
    assert ok.converged and "plateaued" in ok.reason and not ok.early_stopped
    assert not bad.converged and "still improving" in bad.reason and bad.gain == pytest.approx(0.2)


def test_gain_exactly_at_tol_is_not_converged_and_lower_is_better_is_sign_flipped() -> None:
    c = curve([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.25, 1.0])  # higher_is_better: gain 0.25
    assert not check_convergence(c, "accuracy", True, ConvergenceRule(tol=0.25)).converged
    assert check_convergence(c, "accuracy", True, ConvergenceRule(tol=0.2501)).converged
    loss = [{"step": float(s), "loss": v} for s, v in ((10, 2.0), (20, 1.0), (30, 0.5), (40, 0.1), (50, 0.01))]
    # lower is better: window {50} vs before {10..40}: gain = -0.01 - (-0.1) = 0.09
    assert plateau_gain(loss, "loss", higher_is_better=False) == pytest.approx(0.09)
    assert not check_convergence(loss, "loss", False, ConvergenceRule(tol=0.05)).converged


def test_too_short_curve_is_not_converged_and_says_why() -> None:
    v = check_convergence(curve([0.9]), "accuracy")
    assert not v.converged and v.gain is None and "too few evaluations (1)" in v.reason
    assert not check_convergence([], "accuracy").converged
    # rows without the metric (e.g. a NaN train-only point) are ignored
    c = [{"step": 0.0, "accuracy": math.nan}, *curve([0.9, 0.9, 0.9, 0.9, 0.9])]
    assert check_convergence(c, "accuracy").converged


def test_patience_counts_evaluations_without_a_tol_gain() -> None:
    rule = ConvergenceRule(tol=0.01, patience=2)
    assert not patience_exhausted(curve([0.5, 0.6]), "accuracy", True, rule)
    assert not patience_exhausted(curve([0.5, 0.6, 0.605]), "accuracy", True, rule)  # 1 miss
    assert patience_exhausted(curve([0.5, 0.6, 0.605, 0.609]), "accuracy", True, rule)  # 2 misses
    assert not patience_exhausted(curve([0.5, 0.6, 0.605, 0.61]), "accuracy", True, rule)  # 0.61 >= 0.6 + tol
    assert not patience_exhausted(curve([0.5, 0.6, 0.605, 0.609]), "accuracy", True,
                                  ConvergenceRule(tol=0.01, patience=None))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tol": -0.1}, "tol must be a finite number >= 0"), ({"tol": math.nan}, "tol"),
     ({"window": 0.0}, "window must be in"), ({"window": 1.0}, "window"), ({"patience": 0}, "patience must be >= 1")],
)
def test_bad_rule_errors(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvergenceRule(**kwargs)  # type: ignore[arg-type]


def test_until_validation_names_the_fix() -> None:
    validate_until("steps", None, 1.0, None)
    validate_until("converged", 100, 1.0, 10)
    with pytest.raises(ValueError, match="needs a step cap"):
        validate_until("converged", None, math.inf, 10)
    with pytest.raises(ValueError, match="set eval_every"):
        validate_until("converged", 100, 1.0, None)
    with pytest.raises(ValueError, match="unknown; use 'steps' or 'converged'"):
        validate_until("forever", 100, 1.0, 10)
    with pytest.raises(ValueError, match="needs a step cap"):
        TrainConfig(until="converged", epochs=math.inf, eval_every=5)
    with pytest.raises(ValueError, match="tol"):
        TrainConfig(tol=-1.0)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(until="converged", steps=50)


class ScriptedTask:
    """A task whose evaluation returns a scripted accuracy sequence (one value per call)."""

    name, metric, higher_is_better, num_train = "scripted", "accuracy", True, 64

    def __init__(self, accs: list[float]) -> None:
        self.accs, self.calls = list(accs), 0

    def train_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(len(idx), 2), torch.zeros(len(idx))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        v = self.accs[min(self.calls, len(self.accs) - 1)]
        self.calls += 1
        return {"accuracy": v}


def test_early_stop_triggers_at_the_right_step() -> None:
    # evaluations at steps 5, 10, 15, ...; best 0.8 at step 10; then 0.801, 0.799, 0.8 miss the
    # 0.005 tol: patience 3 is exhausted at the 5th evaluation, step 25.
    task = ScriptedTask([0.5, 0.8, 0.801, 0.799, 0.8, 0.9, 0.95])
    cfg = TrainConfig(until="converged", steps=100, eval_every=5, patience=3, tol=0.005, batch_size=8,
                      progress=False, device="cpu", optimizer="sgd", lr=1e-3)
    res = train(nn.Linear(2, 1), task, cfg)  # type: ignore[arg-type]
    assert res.steps == 25 and len(res.curve) == 5 and task.calls == 5
    assert res.converged and res.convergence["early_stopped"]
    assert res.metrics["accuracy"] == 0.8 and res.best == {"accuracy": 0.801, "step": 15.0}
    assert res.to_dict()["converged"] is True


def test_until_steps_runs_to_the_cap_and_records_the_verdict() -> None:
    rising = [0.1 * i for i in range(1, 30)]
    cfg = TrainConfig(steps=40, eval_every=5, patience=1, tol=0.005, batch_size=8, progress=False,
                      device="cpu", optimizer="sgd", lr=1e-3)
    res = train(nn.Linear(2, 1), ScriptedTask(rising), cfg)  # type: ignore[arg-type]
    assert res.steps == 40 and len(res.curve) == 8  # no early stop with until=steps
    assert not res.converged and "still improving" in res.convergence["reason"]
    capped = TrainConfig(until="converged", steps=40, eval_every=5, patience=3, tol=0.005, batch_size=8,
                         progress=False, device="cpu", optimizer="sgd", lr=1e-3)
    res2 = train(nn.Linear(2, 1), ScriptedTask(rising), capped)  # type: ignore[arg-type]
    assert res2.steps == 40 and not res2.converged and not res2.convergence["early_stopped"]


def test_unconverged_points_and_marks() -> None:
    rows = [
        {"method": "lora", "axis_value": 4, "seed": 0, "converged": True},
        {"method": "lora", "axis_value": 4, "seed": 1, "converged": False},
        {"method": "lora", "axis_value": 8, "seed": 0, "train": {"converged": True}},
        {"method": "did", "axis_value": 1000, "seed": 2, "result": {"converged": False}},
        {"method": "did", "axis_value": 1000, "seed": 0},  # older result: no flag, not counted
    ]
    flagged = unconverged_points(rows)
    assert flagged == {("lora", 4): [1], ("did", 1000): [2]}
    assert run_converged(rows[4]) is None and run_converged(rows[2]) is True
    assert mark_unconverged(4, ("lora", 4), flagged) == "4 †"
    assert mark_unconverged(8, ("lora", 8), flagged) == "8"


def test_unconverged_crossings_marks_the_bracket_only() -> None:
    import pandas as pd

    from idlab.training.convergence import unconverged_crossings

    d90 = {"SAID": {"value": 8000, "grid": [1000, 2000, 8000, 16000]},
           "DID": {"value": None, "grid": [1000, 2000]}}
    r90 = {"LoRA qv": {"value": 4, "grid": [1, 2, 4, 8]}}
    rows = pd.DataFrame([
        {"variant": "SAID", "d": 8000, "seed": 0, "converged": False},  # at the grid value
        {"variant": "SAID", "d": 2000, "seed": 2, "converged": False},  # the bracket below
        {"variant": "SAID", "d": 1000, "seed": 1, "converged": False},  # outside the bracket: ignored
        {"variant": "SAID", "d": 16000, "seed": 1, "converged": False},  # above: ignored
        {"variant": "DID", "d": 1000, "seed": 0, "converged": False},  # no crossing: nothing to mark
        {"variant": "LoRA qv", "r": 4, "seed": 0, "converged": True},
        {"variant": "LoRA qv", "r": 2, "seed": 1, "converged": None},  # not recorded: not counted
    ])
    got = unconverged_crossings([(d90, "d"), (r90, "r")], rows.to_dict("records"))
    assert got == ["SAID: d=2000 seeds [2] unconverged, d=8000 seeds [0] unconverged"]
    rows.loc[5, "converged"] = False
    got = unconverged_crossings([(d90, "d"), (r90, "r")], rows.to_dict("records"))
    assert got[0] == "LoRA qv: r=4 seeds [0] unconverged" and len(got) == 2


def test_report_rows_carry_the_flag(tmp_path: Path) -> None:
    import json

    from idlab.report import load_results

    d = tmp_path / "study" / "runs" / "abc"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"run_id": "abc", "status": "ok", "converged": False,
                                               "config": {"method": "lora", "r": 4, "seed": 0}}))
    df = load_results(tmp_path / "study")
    assert list(df["converged"]) == [False]
