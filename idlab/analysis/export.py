"""Analyse finished runs and write long-format Parquet tables.

`analyze_runs` reads each run directory (``result.json`` + ``delta.safetensors``,
docs/CONTRACTS.md "Run directory" / "Delta files") and writes, atomically, to ``out_dir``:

- ``spectra.parquet``: one row per singular value -- run columns, module, layer, module_type,
  index (1-based), singular_value, energy_cumulative (sum_{i<=index} s_i^2 / sum s^2);
- ``ranks.parquet``: one row per run x module -- n_singular, energy_rank (at ``energy_p``),
  effective_rank, stable_rank, fro_norm, spectral_norm, nuclear_fro_ratio;
- ``similarity.parquet``: phi maps (Hu et al. 7.2) between paired runs of one module, rows
  i <= ``similarity_max_i``, j <= ``similarity_max_j``, with the random baseline max(i, j)/k;
- ``similarity_summary.parquet``: per pair x module -- phi_top = phi(1, 1), phi_full =
  phi(p_a, p_b), phi_mean over the stored map, baseline_top = 1/k, baseline_mean;
- ``alignment.parquet``: Hu et al. 7.3 amplification with W and random controls (needs W_0);
- ``intruders.parquet``: intruder dimensions of W_0 + Delta W (needs W_0);
- ``notes.parquet``: what was skipped and why (run, module, table, note).

Run columns on every table: run_id, study, model, task, method, r, d, seed, target_modules.
Layer is parsed from the module name (``layers.(\\d+)``, also ``layer.``/``h.``/``blocks.``;
missing -> <NA>), module_type is its last component (``q_proj``).

Pairs for similarity (``pairs="auto"``): runs with equal (model, task, method,
target_modules, d) and either a different r at the same seed ("rank", smaller r first) or the
same r at a different seed ("seed"). Subspaces are the ``similarity_side`` singular vectors of
Delta W (default right, as Hu et al.): all r of a low-rank update, the top
``dense_subspace_dim`` of a dense one.

W_0 comes from ``base_weights(model_name) -> {module_name: weight (d_out, d_in)}`` (called
once per model; ``module_name`` or ``module_name + ".weight"`` keys); without it the
alignment and intruder tables are empty and a note says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from idlab.analysis.alignment import weight_alignment
from idlab.analysis.intruders import intruder_dimensions, left_singular_basis
from idlab.analysis.io import load_deltas
from idlab.analysis.similarity import random_baseline_map, subspace_similarity
from idlab.analysis.spectra import (
    Svd,
    Update,
    check_update,
    effective_rank,
    energy_rank,
    nuclear_frobenius_ratio,
    stable_rank,
    svd,
)
from idlab.atomic import atomic_file
from idlab.lowrank import LowRankDelta

log = logging.getLogger(__name__)

BaseWeights = Callable[[str], Mapping[str, Tensor]]

RUN_COLUMNS = ["run_id", "study", "model", "task", "method", "r", "d", "seed", "target_modules"]
MODULE_COLUMNS = ["module", "layer", "module_type"]
# A pair of runs compared on one module and side (the similarity tables).
PAIR_COLUMNS = ["run_a", "run_b", "pair_kind", "model", "task", "method", "r_a", "r_b",
                "seed_a", "seed_b", *MODULE_COLUMNS, "side", "k"]
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

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def parse_layer(module: str) -> int | None:
    """Layer index of a qualified module name (``model.layers.3.self_attn.q_proj`` -> 3)."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def module_type(module: str) -> str:
    """Last component of a qualified module name (``...self_attn.q_proj`` -> ``q_proj``)."""
    return module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs from one run directory."""

    path: Path
    run_id: str
    study: str
    status: str
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))

    def columns(self) -> dict[str, Any]:
        """The run columns shared by every table."""
        c = self.config
        targets = c.get("target_modules")
        if isinstance(targets, list | tuple):
            targets = ",".join(str(t) for t in targets)
        return {
            "run_id": self.run_id,
            "study": self.study,
            "model": self.model,
            "task": str(c.get("task", "")),
            "method": str(c.get("method", "")),
            "r": c.get("r"),
            "d": c.get("d"),
            "seed": c.get("seed"),
            "target_modules": None if targets is None else str(targets),
        }


def read_run(path: str | Path) -> RunInfo:
    """Read ``result.json`` of a run directory into a `RunInfo`."""
    path = Path(path)
    rj = path / "result.json"
    if not rj.is_file():
        raise FileNotFoundError(f"{rj} does not exist; pass run directories holding result.json")
    data = json.loads(rj.read_text())
    return RunInfo(
        path=path,
        run_id=str(data.get("run_id") or path.name),
        study=str(data.get("study", "")),
        status=str(data.get("status", "ok")),
        config=dict(data.get("config") or {}),
    )


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (holding ``result.json``) found at or below each path: a run dir, a
    study dir, or a whole results folder; in-flight ``.tmp-*`` / ``.trash-*`` folders are
    skipped. Sorted within each given path, duplicates dropped."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "result.json").is_file():
            found = [p]
        else:
            if not p.is_dir():
                raise FileNotFoundError(f"{p} is not a run directory, study directory or folder")
            found = sorted(
                q.parent for q in p.rglob("result.json")
                if not any(part.startswith((".tmp-", ".trash-")) for part in q.relative_to(p).parts)
            )
            if not found:
                raise FileNotFoundError(f"no run directories (with result.json) under {p}")
        out.extend(q for q in found if q not in out)
    return out


def auto_pairs(runs: Sequence[RunInfo]) -> list[tuple[RunInfo, RunInfo, str]]:
    """Pairs for subspace similarity: same (model, task, method, target_modules, d) and
    different r at equal seed ("rank", smaller r first) or equal r at different seeds ("seed")."""
    pairs: list[tuple[RunInfo, RunInfo, str]] = []
    for a_i, a in enumerate(runs):
        for b in runs[a_i + 1 :]:
            ca, cb = a.columns(), b.columns()
            key = ("model", "task", "method", "target_modules", "d")
            if any(ca[k] != cb[k] for k in key):
                continue
            if ca["r"] != cb["r"] and ca["seed"] == cb["seed"]:
                lo, hi = (a, b) if (ca["r"] or 0) <= (cb["r"] or 0) else (b, a)
                pairs.append((lo, hi, "rank"))
            elif ca["r"] == cb["r"] and ca["seed"] != cb["seed"]:
                pairs.append((a, b, "seed"))
    return pairs


def _lookup(weights: Mapping[str, Tensor], name: str) -> Tensor | None:
    if name in weights:
        return weights[name]
    return weights.get(f"{name}.weight")


def _to_parquet(df: pd.DataFrame, tmp: Path) -> None:
    df.to_parquet(tmp, index=False)


def _write_tables(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        atomic_file(out_dir / f"{name}.parquet", partial(_to_parquet, df))


def _frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS[name])
    for col in ("r", "d", "seed", "layer", "r_a", "r_b", "seed_a", "seed_b"):
        if col in df.columns:
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
    return df


def analyze_runs(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path | None,
    base_weights: BaseWeights | None = None,
    *,
    energy_p: float = 0.9,
    pairs: Literal["auto", "none"] | Sequence[tuple[str, str]] = "auto",
    similarity_side: Literal["right", "left"] = "right",
    similarity_max_i: int = 8,
    similarity_max_j: int = 64,
    dense_subspace_dim: int = 64,
    alignment_r: int | None = None,
    include_scale: bool = True,
    intruder_k: int = 10,
    intruder_eps: float = 0.5,
    seed: int = 0,
    num_threads: int | None = 1,
) -> dict[str, pd.DataFrame]:
    """Analyse run directories and write the Parquet tables listed in the module docstring.

    Args:
        run_dirs: run directories (or study directories / folders of runs, see
            `expand_run_dirs`).
        out_dir: where to write ``<table>.parquet`` (None: only return the tables).
        base_weights: ``model_name -> {module_name: W_0}``; None skips alignment/intruders.
        energy_p: p of the energy rank.
        pairs: "auto" (see `auto_pairs`), "none", or explicit (run_id_a, run_id_b) pairs.
        similarity_side: "right" (Hu et al., from A) or "left" (from B) singular vectors.
        similarity_max_i, similarity_max_j: extent of the stored phi maps (Hu et al.: 8, 64).
        dense_subspace_dim: directions kept from a dense update for similarity.
        alignment_r: directions for the amplification (None: the LoRA rank, or the
            ``energy_p`` energy rank for dense updates).
        include_scale: fold the LoRA scale into Delta W (default; see alignment.py).
        intruder_k, intruder_eps: Shuttleworth et al.'s k and eps.
        seed: seed of the random alignment control.
        num_threads: torch threads while analysing (restored afterwards; None: leave as is).
            Default 1: the matrices are small (<= a few thousand), threads gain little, and
            on a shared 2-core machine a 2-thread float64 eigh of 576 x 576 was measured
            ~100x slower (8-17 s) than with 1 thread (0.09 s) through OpenMP oversubscription.

    Returns:
        table name -> DataFrame (the same tables that were written).
    """
    with torch_threads(num_threads):
        return _analyze_runs(
            run_dirs,
            out_dir,
            base_weights,
            energy_p=energy_p,
            pairs=pairs,
            similarity_side=similarity_side,
            similarity_max_i=similarity_max_i,
            similarity_max_j=similarity_max_j,
            dense_subspace_dim=dense_subspace_dim,
            alignment_r=alignment_r,
            include_scale=include_scale,
            intruder_k=intruder_k,
            intruder_eps=intruder_eps,
            seed=seed,
        )


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (no change when n is None)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads={n} must be >= 1 (or None to keep torch's setting)")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _analyze_runs(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path | None,
    base_weights: BaseWeights | None,
    *,
    energy_p: float,
    pairs: Literal["auto", "none"] | Sequence[tuple[str, str]],
    similarity_side: Literal["right", "left"],
    similarity_max_i: int,
    similarity_max_j: int,
    dense_subspace_dim: int,
    alignment_r: int | None,
    include_scale: bool,
    intruder_k: int,
    intruder_eps: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    t0 = time.perf_counter()
    runs = [read_run(p) for p in expand_run_dirs(run_dirs)]
    ids = [r.run_id for r in runs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"run ids {sorted(dup)} appear twice; pass each run directory once")
    by_id = {r.run_id: r for r in runs}
    if pairs == "auto":
        pair_list = auto_pairs(runs)
    elif pairs == "none":
        pair_list = []
    else:
        pair_list = []
        for id_a, id_b in pairs:
            if id_a not in by_id or id_b not in by_id:
                raise ValueError(f"pair ({id_a!r}, {id_b!r}) names a run not among {sorted(by_id)}")
            pair_list.append((by_id[id_a], by_id[id_b], "given"))
    in_pairs = {r.run_id for p in pair_list for r in p[:2]}
    model_count: dict[str, int] = {}
    for r in runs:
        model_count[r.model] = model_count.get(r.model, 0) + 1

    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in TABLE_COLUMNS}
    subspaces: dict[tuple[str, str], Tensor] = {}
    base_cache: dict[str, Mapping[str, Tensor] | None] = {}
    basis_cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    def note(run_id: str, module: str, table: str, text: str) -> None:
        log.warning("analyze_runs: %s %s [%s]: %s", run_id, module, table, text)
        rows["notes"].append({"run_id": run_id, "module": module, "table": table, "note": text})

    if base_weights is None:
        note("", "", "alignment,intruders", "no base_weights given: W_0 unknown, tables left empty")

    for run in runs:
        if run.status != "ok":
            note(run.run_id, "", "all", f"status {run.status!r}: skipped")
            continue
        delta_path = run.path / "delta.safetensors"
        if not delta_path.is_file():
            note(run.run_id, "", "all", f"no {delta_path.name} in {run.path}: skipped")
            continue
        deltas = load_deltas(delta_path)
        rc = run.columns()
        weights: Mapping[str, Tensor] | None = None
        if base_weights is not None:
            if run.model not in base_cache:
                try:
                    base_cache[run.model] = base_weights(run.model)
                except Exception as e:  # a loader failure should not lose the other tables
                    base_cache[run.model] = None
                    note(
                        run.run_id,
                        "",
                        "alignment,intruders",
                        f"base_weights({run.model!r}) failed: {e}",
                    )
            weights = base_cache[run.model]
        for name, delta in deltas.items():
            mc = {"module": name, "layer": parse_layer(name), "module_type": module_type(name)}
            try:
                d_out, d_in = check_update(delta, f"module {name!r}")
                full = svd(delta)
            except ValueError as e:
                note(run.run_id, name, "all", str(e))
                continue
            _spectrum_rows(
                rows, rc, mc, full, energy_p, d_out, d_in, isinstance(delta, LowRankDelta)
            )
            if run.run_id in in_pairs:
                p = (
                    full.S.numel()
                    if isinstance(delta, LowRankDelta)
                    else min(dense_subspace_dim, full.S.numel())
                )
                vecs = full.Vh[:p].T if similarity_side == "right" else full.U[:, :p]
                subspaces[(run.run_id, name)] = vecs.to(torch.float32).contiguous()
            if weights is None:
                continue
            W0 = _lookup(weights, name)
            if W0 is None:
                note(run.run_id, name, "alignment,intruders", "module not in base_weights")
                continue
            if tuple(W0.shape) != (d_out, d_in):
                note(
                    run.run_id,
                    name,
                    "alignment,intruders",
                    f"base weight shape {tuple(W0.shape)} != update shape {(d_out, d_in)}",
                )
                continue
            key = (run.model, name)
            if key in basis_cache:
                U0, s0 = basis_cache[key]
            else:
                U0, s0 = left_singular_basis(W0)
                if model_count[run.model] > 1:
                    basis_cache[key] = (U0.to(torch.float32), s0)
            _alignment_rows(
                rows, rc, mc, delta, W0, full, s0, alignment_r, include_scale, seed, note
            )
            _intruder_rows(rows, rc, mc, delta, W0, U0, intruder_k, intruder_eps, note)

    for run_a, run_b, kind in pair_list:
        _similarity_rows(
            rows,
            run_a,
            run_b,
            kind,
            subspaces,
            similarity_side,
            similarity_max_i,
            similarity_max_j,
            note,
        )

    tables = {name: _frame(name, rows[name]) for name in TABLE_COLUMNS}
    if out_dir is not None:
        _write_tables(tables, Path(out_dir))
    log.info("analyze_runs: %d runs in %.1f s", len(runs), time.perf_counter() - t0)
    return tables


def _spectrum_rows(
    rows: dict[str, list[dict[str, Any]]],
    rc: dict[str, Any],
    mc: dict[str, Any],
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


def _alignment_rows(
    rows: dict[str, list[dict[str, Any]]],
    rc: dict[str, Any],
    mc: dict[str, Any],
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


def _intruder_rows(
    rows: dict[str, list[dict[str, Any]]],
    rc: dict[str, Any],
    mc: dict[str, Any],
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


def _similarity_rows(
    rows: dict[str, list[dict[str, Any]]],
    a: RunInfo,
    b: RunInfo,
    kind: str,
    subspaces: Mapping[tuple[str, str], Tensor],
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
        Ua, Ub = subspaces[(a.run_id, name)], subspaces[(b.run_id, name)]
        mc = {"module": name, "layer": parse_layer(name), "module_type": module_type(name)}
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


def analyze_main(argv: Sequence[str] | None = None, base_weights: BaseWeights | None = None) -> int:
    """Command-line entry: ``idlab analyze RUN_DIR... --out DIR [options]``.

    ``base_weights`` is supplied by the caller (the CLI), since loading W_0 needs the model
    loader; without it alignment and intruders are skipped with a note. Returns 0.
    """
    ap = argparse.ArgumentParser(prog="idlab analyze", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "run_dirs", nargs="+", help="run directories, study directories or folders of runs"
    )
    ap.add_argument("--out", required=True, help="folder for the Parquet tables")
    ap.add_argument(
        "--energy-p", type=float, default=0.9, help="p of the energy rank (default 0.9)"
    )
    ap.add_argument("--no-similarity", action="store_true", help="skip subspace similarity")
    ap.add_argument(
        "--side",
        choices=["right", "left"],
        default="right",
        help="singular vectors compared by phi (right = from A, Hu et al.)",
    )
    ap.add_argument("--max-i", type=int, default=8, help="rows of the stored phi maps")
    ap.add_argument("--max-j", type=int, default=64, help="columns of the stored phi maps")
    ap.add_argument(
        "--dense-subspace-dim",
        type=int,
        default=64,
        help="directions kept from dense updates for phi",
    )
    ap.add_argument(
        "--alignment-r",
        type=int,
        default=None,
        help="directions for the amplification (default: LoRA rank / energy rank)",
    )
    ap.add_argument(
        "--exclude-scale",
        action="store_true",
        help="use B @ A instead of (alpha/r) B @ A for the amplification",
    )
    ap.add_argument("--intruder-k", type=int, default=10)
    ap.add_argument("--intruder-eps", type=float, default=0.5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, see analyze_runs)"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tables = analyze_runs(
        args.run_dirs,
        args.out,
        base_weights,
        energy_p=args.energy_p,
        pairs="none" if args.no_similarity else "auto",
        similarity_side=args.side,
        similarity_max_i=args.max_i,
        similarity_max_j=args.max_j,
        dense_subspace_dim=args.dense_subspace_dim,
        alignment_r=args.alignment_r,
        include_scale=not args.exclude_scale,
        intruder_k=args.intruder_k,
        intruder_eps=args.intruder_eps,
        num_threads=args.threads,
    )
    for name, df in tables.items():
        print(f"{name:20s} {len(df):8d} rows -> {Path(args.out) / (name + '.parquet')}")
    for _, row in tables["notes"].iterrows():
        print(f"note: {row['run_id']} {row['module']} [{row['table']}]: {row['note']}")
    print(f"analysed in {time.perf_counter() - t0:.1f} s")
    return 0
