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

The row builders live in `idlab.analysis.rows`, the run reader in `idlab.analysis.runinfo`;
``idlab analyze`` (idlab/cli.py) is the command line.

Run columns on every table: run_id, study, model, task, method, r, d, seed, target_modules.
Layer is parsed from the module name (``layers.(\\d+)``, also ``layer.``/``h.``/``blocks.``;
missing -> <NA>), module_type is its last component (``q_proj``).

Pairs for similarity (``pairs="auto"``): runs with equal (model, task, method,
target_modules, d) and either a different r at the same seed ("rank", smaller r first) or the
same r at a different seed ("seed"). Subspaces (``similarity_side`` right by default, as Hu et al.):
with ``similarity_source="factor"`` (default; Hu et al. eq. 4) the right-singular vectors of the
LoRA factor A (left: of B), all r of them; with ``"update"`` the singular vectors of
Delta W = s B A itself, which span the same r-dimensional space but order it by Delta W's
singular values and do not depend on how the update is split into B and A (reparameterisation-
invariant). A dense update (full fine-tuning, a subspace run, a merged PEFT update) has no
factor: its top ``dense_subspace_dim`` singular vectors of Delta W are used under either
setting, and the similarity rows say which (column ``source``: factor, update, or
"factor/update" for a mixed pair).

W_0 comes from ``base_weights(model_name) -> {module_name: weight (d_out, d_in)}`` (called
once per model; ``module_name`` or ``module_name + ".weight"`` keys); without it the
alignment and intruder tables are empty and a note says so.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from torch import Tensor

from idlab.analysis.intruders import left_singular_basis
from idlab.analysis.rows import (
    TABLE_COLUMNS,
    Rows,
    alignment_rows,
    frame,
    intruder_rows,
    lookup,
    similarity_rows,
    spectrum_rows,
)
from idlab.analysis.runinfo import (
    auto_pairs,
    expand_run_dirs,
    module_columns,
    parse_layer,
    read_run,
)
from idlab.analysis.similarity import Source, subspace_of
from idlab.analysis.spectra import (
    check_update,
    svd,
)
from idlab.atomic import atomic_file
from idlab.deltas.io import load_deltas
from idlab.deltas.lowrank import LowRankDelta

log = logging.getLogger(__name__)

BaseWeights = Callable[[str], Mapping[str, Tensor]]


def _to_parquet(df: pd.DataFrame, tmp: Path) -> None:
    df.to_parquet(tmp, index=False)


def _write_tables(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        atomic_file(out_dir / f"{name}.parquet", partial(_to_parquet, df))



def analyze_runs(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path | None,
    base_weights: BaseWeights | None = None,
    *,
    energy_p: float = 0.9,
    pairs: Literal["auto", "none"] | Sequence[tuple[str, str]] = "auto",
    similarity_side: Literal["right", "left"] = "right",
    similarity_source: Source = "factor",
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
        similarity_source: "factor" (Hu et al. eq. 4: singular vectors of A, or of B on the
            left side) or "update" (singular vectors of Delta W, invariant to the B/A split).
            Dense updates always use "update" (they have no factor).
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
            similarity_source=similarity_source,
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
    similarity_source: Source,
    similarity_max_i: int,
    similarity_max_j: int,
    dense_subspace_dim: int,
    alignment_r: int | None,
    include_scale: bool,
    intruder_k: int,
    intruder_eps: float,
    seed: int,
) -> dict[str, pd.DataFrame]:
    if similarity_source not in ("factor", "update"):
        raise ValueError(f"similarity_source={similarity_source!r} is unknown; use 'factor' (Hu et al. "
                         "eq. 4, from A or B) or 'update' (from Delta W)")
    t0 = time.perf_counter()
    runs = []
    for run_dir in expand_run_dirs(run_dirs):
        try:
            runs.append(read_run(run_dir))
        except ValueError as e:  # a run whose files are not whole: skipped, as the report does
            print(f"warning: skipping {e}", file=sys.stderr)
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

    rows: Rows = {k: [] for k in TABLE_COLUMNS}
    subspaces: dict[tuple[str, str], tuple[Tensor, str]] = {}  # (run, module) -> (basis (k, p), source)
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
            mc = module_columns(name)
            try:
                d_out, d_in = check_update(delta, f"module {name!r}")
                full = svd(delta)
            except ValueError as e:
                note(run.run_id, name, "all", str(e))
                continue
            spectrum_rows(
                rows, rc, mc, full, energy_p, d_out, d_in, isinstance(delta, LowRankDelta)
            )
            if run.run_id in in_pairs:
                low = isinstance(delta, LowRankDelta)
                p = full.S.numel() if low else min(dense_subspace_dim, full.S.numel())
                if low and similarity_source == "factor":  # Hu et al. eq. 4: from A (right) or B (left)
                    vecs, src = subspace_of(delta, similarity_side, r=p, source="factor"), "factor"
                else:  # singular vectors of Delta W (the only choice for a dense update)
                    vecs = full.Vh[:p].T if similarity_side == "right" else full.U[:, :p]
                    src = "update"
                subspaces[(run.run_id, name)] = (vecs.to(torch.float32).contiguous(), src)
            if weights is None:
                continue
            W0 = lookup(weights, name)
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
            alignment_rows(
                rows, rc, mc, delta, W0, full, s0, alignment_r, include_scale, seed, note
            )
            intruder_rows(rows, rc, mc, delta, W0, U0, intruder_k, intruder_eps, note)

    for run_a, run_b, kind in pair_list:
        similarity_rows(
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

    tables = {name: frame(name, rows[name]) for name in TABLE_COLUMNS}
    if out_dir is not None:
        _write_tables(tables, Path(out_dir))
    log.info("analyze_runs: %d runs in %.1f s", len(runs), time.perf_counter() - t0)
    return tables



__all__ = ["BaseWeights", "analyze_runs", "auto_pairs", "expand_run_dirs", "parse_layer", "read_run",
           "torch_threads"]
