"""Published claims on crossings: known answers for `compare_crossings`, SAID <= DID, and the
cross-model table (Aghajanyan et al. 2021)."""

from __future__ import annotations

import math

import pandas as pd

from idlab import methods
from idlab.d90 import Crossing, compare_crossings, crossing_text, threshold_crossing
from idlab.report.claims import StudyHeadline, method_claims, model_size_lines
from idlab.report.headline import Headline
from idlab.report.tables import CurveCrossing


def _c(interp: float | None, ci: tuple[float, float] | None = None) -> Crossing:
    return Crossing(value=None if interp is None else interp, interp=interp, ci=ci, std=None,
                    grid=(100.0, 1000.0, 10000.0), means=(0.5, 0.6, 0.7), n_seeds=(3, 3, 3), seeds=(0, 1, 2),
                    target=0.65, n_bootstrap=1000, ci_level=0.95)


def test_compare_crossings_known_answers() -> None:
    assert compare_crossings(_c(500, (400, 600)), _c(2000, (1500, 3000))).startswith("**holds**, resolved")
    assert "within the seed spread" in compare_crossings(_c(500, (300, 1600)), _c(900, (600, 2000)))
    assert compare_crossings(_c(900, (300, 1600)), _c(500, (400, 2000))).startswith("**does not hold** on the")
    assert compare_crossings(_c(3000, (2500, 4000)), _c(500, (400, 600))).startswith("**does not hold**, resolved")
    assert "one seed" in compare_crossings(_c(500), _c(900))
    assert compare_crossings(_c(500, (400, 600)), _c(None)).startswith("**holds** (only the first")
    assert compare_crossings(_c(None), _c(500, (400, 600))).startswith("**does not hold** (only the second")
    assert compare_crossings(_c(None), _c(None)).startswith("undecided")
    assert crossing_text(_c(2362.4, (1010.0, math.inf))) == "2,362 [1,010, not reached]"
    assert crossing_text(_c(None)) == "not reached (grid 100-10,000)"


def test_said_vs_did_claim_from_real_crossings() -> None:
    """The subspace method states SAID <= DID per projection from the one estimator's crossings:
    SAID reaches the target at d = 1,000 on every seed, DID only at 10,000."""
    rows = []
    for seed in range(3):
        for d, said, did in ((100, 0.50, 0.40), (1000, 0.80, 0.55), (10000, 0.85, 0.80)):
            rows += [{"variant": "SAID fastfood", "d": d, "seed": seed, "score": said + 0.01 * seed},
                     {"variant": "DID fastfood", "d": d, "seed": seed, "score": did + 0.01 * seed}]
    df = pd.DataFrame(rows)
    found = {v: threshold_crossing(g, 0.7) for v, g in df.groupby("variant")}
    (line,) = methods.get("subspace").claims(found)
    assert "SAID's d90 <= DID's (fastfood)" in line and "**holds**, resolved" in line
    assert methods.get("lora").claims({}) == []  # a method without claims states none
    head = Headline({}, pd.DataFrame(), {"subspace": {v: CurveCrossing(c) for v, c in found.items()}}, None)
    assert method_claims(head.found) == [line]


def test_larger_model_lower_d90_table_and_verdict() -> None:
    def head(d90: float, ci: tuple[float, float]) -> Headline:
        return Headline({}, pd.DataFrame(), {"subspace": {"SAID fastfood": CurveCrossing(_c(d90, ci))}}, None)

    entries = [StudyHeadline("big", "", "smollm2-135m", "glue/sst2", 134_515_008, head(800, (500, 1200))),
               StudyHeadline("small", "", "minilm-l6", "glue/sst2", 22_713_986, head(2400, (1500, 4000))),
               StudyHeadline("other", "", "minilm-l6", "glue/mrpc", 22_713_986, head(900, (500, 2000)))]
    text = "\n".join(model_size_lines(entries))
    assert "### Across models on `glue/sst2`" in text and "glue/mrpc" not in text  # one model on MRPC: no claim
    assert "| minilm-l6 | 22,713,986 |" in text and "| smollm2-135m | 134,515,008 |" in text
    assert "larger model smollm2-135m 800 [500, 1,200] <= smaller minilm-l6 2,400 [1,500, 4,000]: **holds**, resolved" \
        in text
    assert "differ in family" in text
    assert model_size_lines(entries[2:]) == []
