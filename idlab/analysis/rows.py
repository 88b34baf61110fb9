"""Row builders of the analysis tables (`TABLE_COLUMNS`): spectra and ranks, alignment,
intruders, similarity; `idlab.analysis.export.analyze_runs` calls them per run and module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import pandas as pd
import torch
from torch import Tensor

from idlab.analysis.alignment import weight_alignment
from idlab.analysis.intruders import intruder_dimensions
from idlab.analysis.runinfo import ModuleColumns, RunColumns, RunInfo, module_columns
from idlab.analysis.similarity import random_baseline_map, subspace_similarity
from idlab.analysis.spectra import (
    Svd,
    Update,
    effective_rank,
    energy_rank,
    nuclear_frobenius_ratio,
    stable_rank,
)
from idlab.deltas.lowrank import LowRankDelta

log = logging.getLogger("idlab.analysis.export")

#: the rows of each table (`TABLE_COLUMNS`) before `frame` makes them a DataFrame
Rows = dict[str, list[dict[str, object]]]

RUN_COLUMNS = ["run_id", "study", "model", "task", "method", "r", "d", "seed", "target_modules"]
MODULE_COLUMNS = ["module", "layer", "module_type"]
# A pair of runs compared on one module and side (the similarity tables).
PAIR_COLUMNS = ["run_a", "run_b", "pair_kind", "model", "task", "method", "r_a", "r_b",
                "seed_a", "seed_b", *MODULE_COLUMNS, "side", "source", "k"]
TABLE_COLUMNS: dict[str, list[str]] = {
    "spectra": [*RUN_COLUMNS, *MODULE_COLUMNS, "index", "singular_value", "energy_cumulative"],
    "ranks": [
        *RUN_COLUMNS,
        *MODULE_COLUMNS,
        "d_out",
        "d_in",
        "low_rank",
        "n_singular",
        "energy_p",
        "energy_rank",
        "effective_rank",
        "stable_rank",
        "fro_norm",
        "spectral_norm",
        "nuclear_fro_ratio",
    ],
    "similarity": [
        *PAIR_COLUMNS,
        "i",
        "j",
        "phi",
        "random_baseline",
    ],
    "similarity_summary": [
        *PAIR_COLUMNS,
        "p_a",
        "p_b",
        "phi_top",
        "phi_full",
        "phi_mean",
        "baseline_top",
        "baseline_mean",
    ],
    "alignment": [
        *RUN_COLUMNS,
        *MODULE_COLUMNS,
        "align_r",
        "proj_delta",
        "proj_weight",
        "proj_random",
        "weight_fro",
        "delta_fro",
        "amplification",
        "include_scale",
    ],
    "intruders": [
        *RUN_COLUMNS,
        *MODULE_COLUMNS,
        "k",
        "eps",
        "side",
        "count",
        "indices",
        "intruder_singular_values",
        "max_cos",
        "min_max_cos",
    ],
    "notes": ["run_id", "module", "table", "note"],
}


def lookup(weights: Mapping[str, Tensor], name: str) -> Tensor | None:
    if name in weights:
        return weights[name]
    return weights.get(f"{name}.weight")



def frame(name: str, rows: list[dict[str, object]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS[name])
    for col in ("r", "d", "seed", "layer", "r_a", "r_b", "seed_a", "seed_b"):
        if col in df.columns:
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
    return df



def spectrum_rows(
    rows: Rows,
    rc: RunColumns,
    mc: ModuleColumns,
    full: Svd,
    energy_p: float,
    d_out: int,
    d_in: int,
    low_rank: bool,
) -> None:
    s = full.S
    e = s**2
    total = float(e.sum())
    cum = (torch.cumsum(e, 0) / total) if total > 0 else torch.zeros_like(e)
    for i, (sv, c) in enumerate(zip(s.tolist(), cum.tolist())):
        rows["spectra"].append(
            {**rc, **mc, "index": i + 1, "singular_value": sv, "energy_cumulative": c}
        )
    fro = total**0.5
    rows["ranks"].append(
        {
            **rc,
            **mc,
            "d_out": d_out,
            "d_in": d_in,
            "low_rank": low_rank,
            "n_singular": int(s.numel()),
            "energy_p": energy_p,
            "energy_rank": energy_rank(s, energy_p),
            "effective_rank": effective_rank(s),
            "stable_rank": stable_rank(s),
            "fro_norm": fro,
            "spectral_norm": float(s[0]) if s.numel() else 0.0,
            "nuclear_fro_ratio": nuclear_frobenius_ratio(s),
        }
    )


def alignment_rows(
    rows: Rows,
    rc: RunColumns,
    mc: ModuleColumns,
    delta: Update,
    W0: Tensor,
    full: Svd,
    s0: Tensor,
    alignment_r: int | None,
    include_scale: bool,
    seed: int,
    note: Callable[[str, str, str, str], None],
) -> None:
    r = alignment_r
    if r is not None:
        r = min(r, full.S.numel())
    try:
        res = weight_alignment(
            delta,
            W0,
            r=r,
            include_scale=include_scale,
            seed=seed,
            weight_svals=s0,
            delta_svd=full if (include_scale or not isinstance(delta, LowRankDelta)) else None,
        )
    except ValueError as e:
        note(rc["run_id"], mc["module"], "alignment", str(e))
        return
    rows["alignment"].append(
        {
            **rc,
            **mc,
            "align_r": res.r,
            "proj_delta": res.proj_delta,
            "proj_weight": res.proj_weight,
            "proj_random": res.proj_random,
            "weight_fro": res.weight_fro,
            "delta_fro": res.delta_fro,
            "amplification": res.amplification,
            "include_scale": res.include_scale,
        }
    )


def intruder_rows(
    rows: Rows,
    rc: RunColumns,
    mc: ModuleColumns,
    delta: Update,
    W0: Tensor,
    U0: Tensor,
    k: int,
    eps: float,
    note: Callable[[str, str, str, str], None],
) -> None:
    try:
        ft = (
            delta
            if isinstance(delta, LowRankDelta)
            else W0.to(torch.float64) + delta.to(torch.float64)
        )
        res = intruder_dimensions(W0, ft, k=min(k, min(W0.shape)), eps=eps, base_basis=U0)
    except ValueError as e:
        note(rc["run_id"], mc["module"], "intruders", str(e))
        return
    rows["intruders"].append(
        {
            **rc,
            **mc,
            "k": res.k,
            "eps": res.eps,
            "side": res.side,
            "count": res.count,
            "indices": list(res.indices),
            "intruder_singular_values": res.singular_values.tolist(),
            "max_cos": res.max_cos.tolist(),
            "min_max_cos": float(res.max_cos.min()),
        }
    )


def similarity_rows(
    rows: Rows,
    a: RunInfo,
    b: RunInfo,
    kind: str,
    subspaces: Mapping[tuple[str, str], tuple[Tensor, str]],
    side: str,
    max_i: int,
    max_j: int,
    note: Callable[[str, str, str, str], None],
) -> None:
    ca, cb = a.columns(), b.columns()
    base = {
        "run_a": a.run_id,
        "run_b": b.run_id,
        "pair_kind": kind,
        "model": ca["model"],
        "task": ca["task"],
        "method": ca["method"],
        "r_a": ca["r"],
        "r_b": cb["r"],
        "seed_a": ca["seed"],
        "seed_b": cb["seed"],
        "side": side,
    }
    modules_a = {m for (rid, m) in subspaces if rid == a.run_id}
    modules_b = {m for (rid, m) in subspaces if rid == b.run_id}
    for name in sorted(modules_a ^ modules_b):
        note(f"{a.run_id}|{b.run_id}", name, "similarity", "module in only one run of the pair")
    for name in sorted(modules_a & modules_b):
        (Ua, src_a), (Ub, src_b) = subspaces[(a.run_id, name)], subspaces[(b.run_id, name)]
        mc = {**module_columns(name), "source": src_a if src_a == src_b else f"{src_a}/{src_b}"}
        try:
            phi = subspace_similarity(Ua, Ub, orthonormalize=True)
        except ValueError as e:
            note(f"{a.run_id}|{b.run_id}", name, "similarity", str(e))
            continue
        k = int(Ua.shape[0])
        p_a, p_b = phi.shape
        ni, nj = min(p_a, max_i), min(p_b, max_j)
        base_map = random_baseline_map(p_a, p_b, k)
        sub, sub_base = phi[:ni, :nj], base_map[:ni, :nj]
        for i in range(ni):
            for j in range(nj):
                rows["similarity"].append(
                    {
                        **base,
                        **mc,
                        "k": k,
                        "i": i + 1,
                        "j": j + 1,
                        "phi": float(sub[i, j]),
                        "random_baseline": float(sub_base[i, j]),
                    }
                )
        rows["similarity_summary"].append(
            {
                **base,
                **mc,
                "k": k,
                "p_a": p_a,
                "p_b": p_b,
                "phi_top": float(phi[0, 0]),
                "phi_full": float(phi[-1, -1]),
                "phi_mean": float(sub.mean()),
                "baseline_top": 1.0 / k,
                "baseline_mean": float(sub_base.mean()),
            }
        )




__all__ = ["MODULE_COLUMNS", "PAIR_COLUMNS", "RUN_COLUMNS", "TABLE_COLUMNS", "Rows", "alignment_rows", "frame", "intruder_rows",
           "lookup", "similarity_rows", "spectrum_rows"]
