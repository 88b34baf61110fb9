"""The verdict and the markdown of `experiments.hu2021_section7`: which of Hu et al.'s Section 7
claims hold on the analysed runs (`verdict`), and the report page (`render_markdown`).

Split from the analysis so that each file holds one concept; `analyse` calls both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("query", "value")
def _source_text(meta: Mapping[str, Any]) -> str:
    """Whose singular vectors phi compares (reports written before the choice existed: Delta W)."""
    return ("A (Hu et al. eq. 4)" if meta.get("phi_source") == "factor"
            else "Delta W = s B A (not the paper's A; same span, another order)")


TOP_FACTOR = 10.0  # phi(1,1) "well above" baseline: at least this many times 1/k
OTHER_FACTOR = 2.0  # other directions "near baseline": mean overlap at most this many times j/k
SUFFICE_TOL = 0.01  # a rank "suffices" (Hu et al. Table 6) when its seed mean is within this of the best rank's

PAPER = {
    "model": "GPT-3 175B, layer 48 of 96, W_q",
    "proj_delta": {4: 0.32, 64: 1.90},
    "proj_weight": {4: 21.67, 64: 37.71},
    "proj_random": {4: 0.02, 64: 0.33},
    "weight_fro": 61.95,
    "delta_fro": {4: 6.91, 64: 3.57},
    "amplification": {4: 21.5, 64: 2.0},
    "phi_top": "> 0.5 (r=8 vs r=64, top direction)",
}


def _fmt(x: float | None, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "inf"
    return f"{x:.{nd}g}"


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else math.nan


def _layer_checks(rep: Mapping[str, Any], layer: int, role: str, r_hi: int) -> dict[str, bool | None]:
    """The criteria on one (layer, role): True / False / None (not computable)."""
    v: dict[str, bool | None] = {}
    al = rep["alignment"].get(layer, {}).get(role, {})
    hi = max(al) if al else None
    low = min(al) if al else None
    v["amplification_larger_at_low_rank"] = (
        al[low]["amplification"] > al[hi]["amplification"] if low is not None and hi is not None and hi > low else None
    )
    v["amplification_above_1_at_low_rank"] = None if low is None else al[low]["amplification"] > 1.0
    v["amplification_above_random_delta_at_low_rank"] = (
        None if low is None else al[low]["amplification"] > al[low]["amplification_random_delta"]
    )
    v["dW_dirs_above_random_at_low_rank"] = (
        None if low is None else al[low]["proj_delta"] > 2.0 * al[low]["proj_random"]
    )
    for label in ("rank", "seed"):
        ps = rep["phi"].get(layer, {}).get(role, {}).get(label, [])
        if not ps:
            v[f"{label}_top_well_above_baseline"] = v[f"{label}_top_above_0.5"] = None
            v[f"{label}_others_near_baseline"] = None
            continue
        top = _mean([p["phi_11"] for p in ps])
        v[f"{label}_top_well_above_baseline"] = top >= TOP_FACTOR * ps[0]["base_11"]
        v[f"{label}_top_above_0.5"] = top > 0.5
        oth = _mean([p["others_mean_1J"] for p in ps if not math.isnan(p["others_mean_1J"])])
        v[f"{label}_others_near_baseline"] = None if math.isnan(oth) else oth <= OTHER_FACTOR * ps[0]["base_1J"]
    return v


def verdict(report: Mapping[str, Any], r_hi: int) -> dict[str, Any]:
    """Per role and criterion, the layers where it holds, as ``{"holds": k, "of": n}`` (n = computable)."""
    out: dict[str, Any] = {}
    per: dict[str, dict[str, list[bool]]] = {role: {} for role in ROLES}
    for layer in report["meta"]["layers"]:
        for role in ROLES:
            for k, x in _layer_checks(report, layer, role, r_hi).items():
                lst = per[role].setdefault(k, [])
                if x is not None:
                    lst.append(x)
    for role in ROLES:
        out[role] = {k: {"holds": sum(v), "of": len(v)} for k, v in per[role].items()}
    pattern = ("amplification_larger_at_low_rank", "rank_top_well_above_baseline", "rank_others_near_baseline")

    def majority(k: str) -> bool | None:
        cells = [out[role].get(k, {"holds": 0, "of": 0}) for role in ROLES]
        if any(c["of"] == 0 for c in cells):
            return None
        return all(c["holds"] * 2 > c["of"] for c in cells)

    vals = [majority(k) for k in pattern]
    if all(x is None for x in vals):
        overall = "not computable"
    elif any(x is None for x in vals):
        overall = "incomplete (some runs missing)"
    elif all(vals):
        overall = "reproduces"
    elif any(vals):
        overall = "partly reproduces"
    else:
        overall = "does not reproduce"
    out["overall"] = overall
    ctrl = [majority(k) for k in ("amplification_above_1_at_low_rank", "dW_dirs_above_random_at_low_rank",
                                  "amplification_above_random_delta_at_low_rank")]
    out["controls"] = ("not computable" if all(x is None for x in ctrl)
                       else "hold" if all(x is True for x in ctrl)
                       else "fail" if all(x is False for x in ctrl) else "mixed")
    out["rank_needed"] = rank_needed(report.get("accuracy", {}))
    return out


def rank_needed(acc: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Hu et al. Table 6's claim, "a very low rank suffices": the smallest rank's seed mean against the best.

    ``holds`` when the smallest rank is within `SUFFICE_TOL` of the best rank's mean; ``converged``
    says whether every run behind the two means converged (None: not recorded).
    """
    means = {int(r): row["mean"] for r, row in acc.items() if row.get("mean") is not None}
    if len(means) < 2:
        return {"holds": None, "why": "fewer than two ranks with scores"}
    lo, best = min(means), max(means, key=lambda r: means[r])
    flags = [c for r in (lo, best) for c in acc[r]["converged"].values()]
    return {"smallest_rank": lo, "smallest_mean": means[lo], "best_rank": best, "best_mean": means[best],
            "tol": SUFFICE_TOL, "holds": means[lo] >= means[best] - SUFFICE_TOL,
            "converged": None if any(c is None for c in flags) else all(flags)}


def _yn(x: bool | None) -> str:
    return "–" if x is None else ("yes" if x else "no")


def _spread(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return _fmt(xs[0], 3)
    return f"{_fmt(_mean(xs), 3)} ({_fmt(min(xs), 3)}-{_fmt(max(xs), 3)}, n={len(xs)})"


def render_markdown(rep: Mapping[str, Any]) -> str:
    """The report as Markdown: runs, a per-layer table, the focus layer's Table 7, the verdict."""
    meta = rep["meta"]
    r_lo, r_hi = meta["rank_pair"]
    L: list[str] = []
    L.append(f"# Hu et al. 2021 Section 7 on {meta['model']} ({meta['task']}), layers {meta['layers']}")
    L.append("")
    L.append(f"Source: `{meta['results']}` ({rep['runs_found']} LoRA query+value runs found). Generated by "
             "`python -m experiments.hu2021_section7`.")
    L.append("")
    L.append("## Runs")
    L.append("")
    for k, v in rep["runs_used"].items():
        conv = rep["runs_converged"].get(k)
        L.append(f"- {k}: `{v}` (converged: {'unknown' if conv is None else _yn(conv)})")
    if rep["missing"]:
        L.append(f"- **missing** (not found, failed or without delta): {', '.join(rep['missing'])}")
    for n in rep["notes"]:
        L.append(f"- note: {n}")
    L.append("")
    acc = rep.get("accuracy", {})
    if acc:
        L.append("## Validation score by rank (Hu et al. Table 6: how low a rank suffices)")
        L.append("")
        L.append("| r | mean | per seed (score, steps, converged) |")
        L.append("|---|---|---|")
        for r in sorted(acc, key=int):
            row = acc[r]
            per = "; ".join(f"s{sd}: {_fmt(row['scores'][sd], 3)}, {row['steps'].get(sd) or '?'} steps, "
                            f"{'unknown' if row['converged'][sd] is None else _yn(row['converged'][sd])}"
                            for sd in sorted(row["scores"], key=int))
            L.append(f"| {r} | {_fmt(row['mean'], 3)} | {per} |")
        rn = rep["verdict"].get("rank_needed", {})
        if rn.get("holds") is not None:
            L.append("")
            L.append(f"r={rn['smallest_rank']} reaches {_fmt(rn['smallest_mean'], 3)} against the best rank's "
                     f"{_fmt(rn['best_mean'], 3)} (r={rn['best_rank']}): a very low rank suffices (within "
                     f"{rn['tol']:g}): **{_yn(rn['holds'])}**; every run behind both converged: "
                     f"{'unknown' if rn['converged'] is None else _yn(rn['converged'])}.")
        L.append("")
    L.append("## Every layer")
    L.append("")
    L.append(
        f"phi(1,1) of the right singular vectors of {_source_text(meta)} (random baseline 1/k, k = d_in): r={r_lo} vs "
        f"r={r_hi} (mean, range over seeds) and seed vs seed at r={r_hi} (over seed pairs). Amplification "
        "||ΔW||_F / ||U^T W_0 V^T||_F at seed 0 beside its controls: random directions (ΔW's norm over "
        "W_0's projection on random orthonormal U, V) and a random rank-r ΔW of the same norm. "
        f"Paper (GPT-3, W_q, layer 48): phi(1,1) {PAPER['phi_top']}; amplification 21.5 (r=4), 2.0 (r=64)."
    )
    L.append("")
    al_ranks = sorted({r for lay in rep["alignment"].values() for row in lay.values() for r in row})
    hdr = " | ".join(f"amp r={r} (rand dirs / rand ΔW)" for r in al_ranks)
    L.append(f"| layer | role | module | phi(1,1) rank pair | phi(1,1) seed pairs | base 1/k | {hdr} |")
    L.append("|---|---|---|---|---|---|" + "---|" * len(al_ranks))
    for layer in meta["layers"]:
        for role in ROLES:
            ph = rep["phi"].get(layer, {}).get(role, {})
            rank = [p["phi_11"] for p in ph.get("rank", [])]
            seed = [p["phi_11"] for p in ph.get("seed", [])]
            base = next((p["base_11"] for lst in ph.values() for p in lst), None)
            al = rep["alignment"].get(layer, {}).get(role, {})
            amps = " | ".join(
                f"{_fmt(al[r]['amplification'], 3)} ({_fmt(al[r]['amplification_random'], 3)} / "
                f"{_fmt(al[r]['amplification_random_delta'], 3)})" if r in al else "–"
                for r in al_ranks
            )
            name = meta["module_names"].get(f"{layer}/{role}", "?")
            L.append(f"| {layer} | {role} | `{name}` | {_spread(rank)} | {_spread(seed)} | {_fmt(base, 3)} | {amps} |")
    L.append("")

    focus = meta["focus_layer"]
    L.append(f"## 7.2 in detail, layer {focus}")
    L.append("")
    L.append("phi(i, j) = ‖U1[:, :i]^T U2[:, :j]‖_F^2 / min(i, j); random baseline max(i, j)/k. `others` = mean "
             "over i = 2..8 of the overlap of run 1's i-th direction alone with run 2's top-J subspace (baseline J/k).")
    L.append("")
    L.append("| pair | role | phi(1,1) | base | phi(1,J) | base | mean i,j<=8 | base | phi(8,J) | base | others | base |")
    L.append("|" + "---|" * 12)
    for role in ROLES:
        for label in ("rank", "seed"):
            for p in rep["phi"].get(focus, {}).get(role, {}).get(label, []):
                L.append(
                    f"| {p['desc']} (J={p['J']}) | {role} | {_fmt(p['phi_11'])} | {_fmt(p['base_11'])} | "
                    f"{_fmt(p['phi_1J'])} | {_fmt(p['base_1J'])} | {_fmt(p['mean_8x8'])} | "
                    f"{_fmt(p['base_mean_8x8'])} | {_fmt(p['phi_full'])} | {_fmt(p['base_full'])} | "
                    f"{_fmt(p['others_mean_1J'])} | {_fmt(p['base_1J'])} |"
                )
    L.append("")
    L.append(f"## 7.3 in detail, layer {focus} (Table 7 layout, seed 0)")
    L.append("")
    for role in ROLES:
        al = rep["alignment"].get(focus, {}).get(role, {})
        if not al:
            L.append(f"{role}: no runs for the amplification table.")
            L.append("")
            continue
        ranks = sorted(al)
        L.append(f"**{role}** (`{meta['module_names'].get(f'{focus}/{role}', '?')}`)")
        L.append("")
        L.append(f"| | {' | '.join(f'ours r={r}' for r in ranks)} | paper r=4 | paper r=64 |")
        L.append("|---|" + "---|" * (len(ranks) + 2))
        rows = (
            ("‖U^T W V^T‖_F, ΔW directions", "proj_delta"),
            ("‖U^T W V^T‖_F, W directions", "proj_weight"),
            ("‖U^T W V^T‖_F, random", "proj_random"),
            ("‖W‖_F", "weight_fro"),
            ("‖ΔW‖_F", "delta_fro"),
            ("amplification ‖ΔW‖_F / ‖U^T W V^T‖_F", "amplification"),
            ("control: ‖ΔW‖_F / random projection", "amplification_random"),
            ("control: amplification of a random ΔW, same norm", "amplification_random_delta"),
            ("ΔW-direction / random projection", "delta_over_random"),
        )
        for lab, key in rows:
            ours = " | ".join(_fmt(al[r][key]) for r in ranks)
            pv = PAPER.get(key)
            if isinstance(pv, dict):
                p4, p64 = _fmt(pv[4]), _fmt(pv[64])
            elif isinstance(pv, float):
                p4 = p64 = _fmt(pv)
            elif key == "amplification_random":
                p4, p64 = _fmt(6.91 / 0.02), _fmt(3.57 / 0.33)
            elif key == "delta_over_random":
                p4, p64 = _fmt(0.32 / 0.02), _fmt(1.90 / 0.33)
            else:
                p4 = p64 = "–"
            L.append(f"| {lab} | {ours} | {p4} | {p64} |")
        L.append("| alpha/r | " + " | ".join(_fmt(al[r]["scale"]) for r in ranks) + " | | |")
        L.append("")

    L.append("## Does the pattern reproduce?")
    L.append("")
    L.append(
        f"Per layer and role: amplification larger at the lowest rank than at the highest; top direction "
        f"phi(1,1) (mean over pairs) >= {TOP_FACTOR:g} x its baseline 1/k (and, separately, > 0.5 as in the "
        f"paper); other directions: mean single-direction overlap (i = 2..8 against top-J) <= "
        f"{OTHER_FACTOR:g} x baseline J/k. Counted over layers: `holds / computable`. A criterion holds for "
        "the model when it holds in more than half of the layers, for both roles."
    )
    L.append("")
    v = rep["verdict"]
    keys = list(v[ROLES[0]])
    L.append("| criterion | " + " | ".join(ROLES) + " |")
    L.append("|---|" + "---|" * len(ROLES))
    for k in keys:
        cells = [v[role].get(k, {"holds": 0, "of": 0}) for role in ROLES]
        L.append(f"| {k} | " + " | ".join(f"{c['holds']}/{c['of']}" if c["of"] else "–" for c in cells) + " |")
    L.append("")
    L.append("**Pattern as stated (amplification larger at low rank; rank-pair top direction well above "
             f"baseline; other directions near baseline; both roles): {v['overall']}.**")
    L.append("")
    L.append("Controls (a random ΔW also shows a larger amplification at low rank, because a random r-dim "
             "projection of W grows with r): amplification > 1, ΔW's directions projecting W > 2 x random "
             f"ones, amplification above that of a random ΔW of the same norm, at the lowest rank: **{v['controls']}**.")
    L.append("")
    if rep["figures"]:
        L.append("## Figures")
        L.append("")
        for f in rep["figures"]:
            L.append(f"- `{f}`")
        L.append("")
    return "\n".join(L)


__all__ = ["OTHER_FACTOR", "PAPER", "ROLES", "SUFFICE_TOL", "TOP_FACTOR", "rank_needed", "render_markdown",
           "verdict"]
