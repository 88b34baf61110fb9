"""The threshold rules of a crossing (docs/SCIENCE.md section 6): known answers on hand-made curves.

fraction (Li et al.):  target = 0.9 x baseline
improvement:           target = pretrained + 0.9 x (baseline - pretrained)   (a loss: L_pre - 0.9 (L_pre - L_full))
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from idlab.config import study_from_dict
from idlab.d90 import analyze_d90, make_target, rate_baseline, threshold_crossing
from idlab.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# neg_loss curves of two seeds at d = 10, 100, 1000 (pretrained L = 2.0, full fine-tuning L = 1.0)
SEED0 = {10: -1.5, 100: -1.0, 1000: -1.0}  # alone: crosses -1.1 at 10^(1 + 0.8) = 63.0957
SEED1 = {10: -1.9, 100: -1.6, 1000: -1.0}  # alone: crosses at 10^(2 + 5/6) = 681.29
# seed mean -1.7, -1.3, -1.0: crosses at 10^(2 + 2/3) = 464.16


def _curve() -> pd.DataFrame:
    return pd.DataFrame([{"d": d, "seed": s, "score": v} for s, c in ((0, SEED0), (1, SEED1)) for d, v in c.items()])


def test_fraction_rule_is_li_and_ignores_the_pretrained_score() -> None:
    b = make_target(0.8, 0.9, rule="fraction", pretrained=0.3)
    assert b.target == pytest.approx(0.72) and b.rule == "fraction" and b.pretrained is None
    assert make_target([0.7, 0.9]).target == pytest.approx(0.72)  # local: mean 0.8
    with pytest.raises(ValueError, match="improvement"):  # a loss (neg_loss < 0) under the fraction rule
        make_target(-1.0, 0.9)


def test_improvement_rule_on_a_loss_and_on_exact_match() -> None:
    b = make_target(-1.0, 0.9, rule="improvement", pretrained=-2.0)  # neg_loss: L_pre 2.0, L_full 1.0
    assert b.target == pytest.approx(-1.1) and b.rule == "improvement" and b.pretrained == -2.0
    assert -b.target == pytest.approx(2.0 - 0.9 * (2.0 - 1.0))  # L_pre - 0.9 (L_pre - L_full)
    em = make_target([0.5, 0.7], 0.9, rule="improvement", pretrained=0.1)  # exact match 0.1 -> 0.6
    assert em.target == pytest.approx(0.1 + 0.9 * 0.5) and em.kind == "local"
    with pytest.raises(ValueError, match="pretrained score"):
        make_target(-1.0, rule="improvement")
    with pytest.raises(ValueError, match="does not improve"):
        make_target(-2.5, rule="improvement", pretrained=-2.0)
    with pytest.raises(ValueError, match="unknown threshold rule"):
        make_target(0.8, rule="gain")
    got = rate_baseline({1e-3: {0: -1.2, 1: -1.4}, 1e-2: {0: -1.0, 1: -1.0}}, 0.9, rule="improvement", pretrained=-2.0)
    assert got is not None and got.value == -1.0 and got.target == pytest.approx(-1.1)


def test_improvement_rule_crossing_and_its_bootstrap_interval() -> None:
    res = analyze_d90(_curve(), [-1.0, -1.0], 0.9, rule="improvement", pretrained=-2.0, n_bootstrap=1000)
    assert res.target == pytest.approx(-1.1) and res.rule == "improvement" and res.pretrained == -2.0
    assert res.d90 == 1000
    assert res.d90_interp == pytest.approx(10 ** (2 + 2 / 3), rel=1e-9)
    # two seeds: a resample is {0,0} (1/4), {0,1} (1/2) or {1,1} (1/4); the 2.5% and 97.5% order
    # statistics of 1,000 resamples are the one-seed crossings
    assert res.ci is not None
    assert res.ci[0] == pytest.approx(10 ** 1.8, rel=1e-9) and res.ci[1] == pytest.approx(10 ** (2 + 5 / 6), rel=1e-9)
    d = res.to_dict()
    assert d["rule"] == "improvement" and d["pretrained"] == -2.0
    # the same crossing through the one estimator the report calls
    cr = threshold_crossing(_curve(), res.target)
    assert (cr.value, cr.interp, cr.ci) == (1000, res.d90_interp, res.ci)


def test_fraction_rule_crossing_on_an_accuracy_curve() -> None:
    acc = pd.DataFrame([{"d": d, "seed": 0, "score": v} for d, v in ((10, 0.5), (100, 0.7), (1000, 0.8))])
    res = analyze_d90(acc, 0.8, 0.9)  # target 0.72 between 100 (0.7) and 1000 (0.8): t = 0.2
    assert res.rule == "fraction" and res.target == pytest.approx(0.72) and res.d90 == 1000
    assert res.d90_interp == pytest.approx(10 ** 2.2, rel=1e-9)
    # the improvement rule over a pretrained accuracy of 0.5: target 0.5 + 0.9 x 0.3 = 0.77, t = 0.7
    imp = analyze_d90(acc, 0.8, 0.9, rule="improvement", pretrained=0.5)
    assert imp.target == pytest.approx(0.77) and imp.d90_interp == pytest.approx(10 ** 2.7, rel=1e-9)


def _study(tmp_path: Path, **target: object) -> dict[str, object]:
    return {
        "name": "rules", "model": {"name": "mlp", "hidden": [16]}, "task": "idlab_fixture_tasks:blobs",
        "methods": ["full", "subspace"], "full": {"lr": [0.01]},
        "subspace": {"d": [8, 64], "projection": ["dense"], "head": "project", "lr": [0.05]},
        "train": {"steps": 20, "batch_size": 32, "eval_every": 10, "optimizer": "adam", "eval_at_start": True},
        "target": target, "seeds": [0], "results_dir": str(tmp_path / "results"), "device": "cpu",
    }


def test_improvement_without_a_pretrained_score_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    raw = _study(tmp_path, rule="improvement")
    raw["train"] = {"steps": 20, "batch_size": 32}
    with pytest.raises(ConfigError, match=r"target\.rule.*eval_at_start"):
        study_from_dict(raw)
    raw["target"] = {"rule": "improvement", "pretrained": 0.3}
    assert study_from_dict(raw).target.pretrained == 0.3
    with pytest.raises(ConfigError, match=r"target\.rule"):
        study_from_dict({**raw, "target": {"rule": "gain"}})


def test_report_applies_and_names_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from idlab.report import make_report
    from idlab.sweep.driver import run_sweep

    monkeypatch.syspath_prepend(str(FIXTURES))
    assert len(run_sweep(study_from_dict(_study(tmp_path, rule="improvement"))).ok) == 3
    text = make_report(tmp_path / "results", tmp_path / "r", analysis=False).read_text()
    summary = pd.read_parquet(tmp_path / "r" / "summary.parquet")
    full = summary[summary["method"] == "full"].iloc[0]
    pre, base = float(full["score_start"]), float(full["score_final"])
    assert math.isfinite(pre) and base > pre
    m = re.search(r"target by the rule improvement: pretrained \+ 90% x \(baseline - pretrained\) = ([-0-9.]+)\. "
                  r"Pretrained score ([-0-9.]+) \(step-0 evaluation of full FT, mean of 1 seed\(s\)\)", text)
    assert m is not None, text[:2000]
    assert float(m.group(1)) == pytest.approx(pre + 0.9 * (base - pre), abs=1e-4)
    assert float(m.group(2)) == pytest.approx(pre, abs=1e-4)
    row = next(line for line in text.splitlines() if line.startswith("| DID dense | d90 |"))
    assert row.endswith("| improvement: pretrained + 90% x (baseline - pretrained) |")  # the rule of this d90


def test_report_baseline_refuses_a_lower_is_better_metric_and_applies_the_rule() -> None:
    from idlab.report.tables import baseline

    def runs(hib: bool, start: float | None) -> pd.DataFrame:
        return pd.DataFrame([{"method": "full", "status": "ok", "lr": 1e-3, "seed": s, "score_final": v,
                              "score_start": start, "metric": "neg_loss" if hib else "loss", "higher_is_better": hib}
                             for s, v in ((0, -1.0), (1, -1.2))])

    meta = {"study": {"target": {"rule": "improvement"}}}
    got = baseline(runs(True, -2.1), meta, "score_final")
    assert got["value"] == pytest.approx(-1.1) and got["pretrained"] == pytest.approx(-2.1)
    assert got["target"] == pytest.approx(-2.1 + 0.9 * 1.0) and got["rule"] == "improvement"
    assert "lower-is-better" in baseline(runs(False, 2.1), meta, "score_final")["kind"]
    assert "no step-0 evaluation" in baseline(runs(True, None), meta, "score_final")["kind"]
    fixed = baseline(runs(True, None), {"study": {"target": {"rule": "improvement", "pretrained": -3.0}}}, "score_final")
    assert fixed["target"] == pytest.approx(-3.0 + 0.9 * 1.9) and fixed["pretrained_kind"] == "fixed (target.pretrained)"
    assert "improvement" in baseline(runs(True, None), {"study": {}}, "score_final")["kind"]  # fraction on a loss


def test_score_exact_match_crosses_on_the_end_of_run_exact_match(tmp_path: Path) -> None:
    """``score: exact_match`` (instruction tasks): the crossing reads each run's exact_match, the improvement
    rule's pretrained score is full FT's exact_match_before; RunResult.score reads it; a study whose task
    cannot give one is refused."""
    from idlab.config import ConfigError, study_from_dict
    from idlab.report.load import score_col
    from idlab.report.tables import baseline, threshold_crossing
    from idlab.runs import RunResult

    meta = {"study": {"score": "exact_match", "target": {"rule": "improvement"}}}
    assert score_col(meta) == "exact_match" and score_col({"study": {}}) == "score_final"
    full = pd.DataFrame([{"method": "full", "status": "ok", "lr": 1e-5, "seed": s, "exact_match": v,
                          "exact_match_before": 0.1, "score_start": -2.0, "metric": "neg_loss",
                          "higher_is_better": True} for s, v in ((0, 0.5), (1, 0.7))])
    got = baseline(full, meta, "exact_match")
    assert got["value"] == pytest.approx(0.6) and got["pretrained"] == pytest.approx(0.1)
    assert got["target"] == pytest.approx(0.1 + 0.9 * 0.5)
    lora = pd.DataFrame([{"r": r, "seed": s, "exact_match": v} for (r, s, v) in
                         ((1, 0, 0.3), (1, 1, 0.4), (4, 0, 0.6), (4, 1, 0.6))])
    assert threshold_crossing(lora, "r", got["target"], "exact_match").value == 4
    res = RunResult.from_dict({"run_id": "x", "study": "s", "config": {}, "status": "ok", "metric": "neg_loss",
                               "metrics": {"neg_loss": -1.0}, "exact_match": 0.25})
    assert res.score("exact_match") == 0.25 and res.score("final") == -1.0
    from idlab.config.checks import check_instruct

    with pytest.raises(ConfigError, match=r"score.*not an instruction task"):  # checked before any run
        check_instruct(study_from_dict({"name": "x", "methods": ["full"], "score": "exact_match", "task": "digits",
                                        "model": {"name": "mlp"}, "results_dir": str(tmp_path)}))
