"""Reproduce Hu et al. 2021 (LoRA), Section 7.2 / 7.3, on the LoRA query+value runs of a study.

    python -m experiments.hu2021_section7 --results results/hu2021_section7_minilm [--layers all]
                                          [--rank-pair 8,64] [--out results/hu2021_section7]

Works by module ROLE, not by name: the query and value projections are ``q_proj`` / ``v_proj``
in Llama-style models (target set ``qv``) and ``query`` / ``value`` in BERT and RoBERTa
(target set ``bert-qv``). Reads the LoRA runs of a study folder whose targets are exactly
the query and value projections (``<results>/runs/<run_id>/{result.json, delta.safetensors}``,
written by ``idlab sweep``) and, for every layer found (or those asked) and both roles:

- Section 7.2, subspace similarity phi (``idlab.analysis.subspace_similarity``) of the right
  singular vectors of the LoRA factor A, by the paper's definition (eq. 4; ``source="factor"``,
  the default). ``--source update`` takes the right singular vectors of Delta W = s B A instead:
  the same span, ordered by the update's singular values, invariant to the B/A split (what
  sessions 1-9 reported; docs/SCIENCE.md section 3 has both). r_lo vs r_hi (default 8 vs 64) at every seed present, and seed s vs seed t at
  r_hi for every pair of seeds present; i <= 8, j <= r_hi. Beside every number the random-
  subspace baseline E[phi(i, j)] = max(i, j) / k, k = d_in.
- Section 7.3, amplification (``idlab.analysis.weight_alignment``) at r = 4, r_lo, r_hi (seed
  0, those present): ||U^T W_0 V^T||_F for Delta W's top-r directions, W_0's own top-r and
  random orthonormal ones, ||W_0||_F, ||Delta W||_F and the amplification ||Delta W||_F /
  ||U^T W_0 V^T||_F, alpha / r folded into Delta W. Two controls beside it: the same ratio
  with random directions (``||Delta W||_F / random projection``) and the amplification of a
  random rank-r Delta W of the same Frobenius norm (Gaussian factors, seeded).
- Table 6 (how low a rank suffices): every rank's final validation score per seed, with its steps
  and convergence flag, and the smallest rank against the best (`hu2021_section7_report.rank_needed`).
  Of several runs at one (r, seed), a converged one wins over an unconverged one, then the latest.

W_0 is the pretrained projection weight, from ``idlab.models.load_model(model, task=
"classification")``. Writes ``<out>/section7.md`` and ``<out>/section7.json`` atomically
(`idlab.atomic`) and phi heatmaps of one focus layer (``--focus-layer``, default the middle one).
A folder with no usable LoRA query+value run of the asked ranks raises a ValueError naming
what is missing; other missing runs are named in the report and the rest is still written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from experiments.hu2021_section7_report import (
    ROLES,
    render_markdown,
    verdict,
)
from idlab.analysis import (
    load_deltas,
    random_baseline,
    random_baseline_map,
    subspace_of,
    subspace_similarity,
    weight_alignment,
)
from idlab.analysis.similarity import Source
from idlab.atomic import atomic_file, atomic_write_text
from idlab.deltas.lowrank import LowRankDelta
from idlab.runs import DELTA_FILE, Status, iter_results

ROLE_NAMES: dict[str, tuple[str, ...]] = {"query": ("q_proj", "query"), "value": ("v_proj", "value")}
"""Module names of each role: Llama/Mistral/SmolLM (q_proj, v_proj), BERT/RoBERTa (query, value)."""
QV_TARGET_SETS = ("qv", "bert-qv")
ALIGN_RANKS = (4,)  # Hu et al.'s Table 7 uses r = 4 and 64; r_lo and r_hi are added
PHI_MAX_I = 8
_SOURCE_TEXT = {"factor": "A", "update": "Delta W"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


BaseWeights = Callable[[str, Sequence[str]], Mapping[str, Tensor]]
"""``base_weights(model_name, module_names) -> {module_name: W_0 (d_out, d_in)}``."""


@dataclass
class Run:
    run_id: str
    path: Path
    r: int
    seed: int
    status: Status
    model: str
    task: str
    num_labels: int
    finished_at: str
    has_delta: bool
    converged: bool | None
    score: float | None = None  # final validation metric (idlab.runs.RunResult.score)
    steps: int | None = None  # optimizer steps taken


def module_role(name: str) -> tuple[int, str] | None:
    """``(layer, role)`` of a module name such as ``model.layers.3.self_attn.q_proj`` or
    ``bert.encoder.layer.3.attention.self.query``; None if it is no query/value projection."""
    last = name.rsplit(".", 1)[-1]
    role = next((r for r, names in ROLE_NAMES.items() if last in names), None)
    m = _LAYER_RE.search(name)
    if role is None or m is None:
        return None
    return int(m.group(1)), role


def is_query_value(cfg: Mapping[str, Any]) -> bool:
    """True when a run config's LoRA targets are exactly one query and one value projection."""
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        tm = [tm]
    if tm is None:
        return cfg.get("target_set") in QV_TARGET_SETS
    roles = [next((r for r, names in ROLE_NAMES.items() if t in names), None) for t in tm]
    return sorted(str(r) for r in roles) == sorted(ROLES)


def find_runs(results: Path) -> list[Run]:
    """Every LoRA query+value run under ``results/runs`` (or ``results`` itself if it holds run dirs).

    Read through `idlab.runs.iter_results`, the one reader: a run whose files are not whole is
    skipped with a one-line warning naming the file.
    """
    root = results / "runs" if (results / "runs").is_dir() else results
    runs = []
    for rj, res in iter_results(root):
        cfg = res.config
        if cfg.get("method") != "lora" or not is_query_value(cfg):
            continue
        runs.append(
            Run(
                run_id=res.run_id or rj.parent.name,
                path=rj.parent,
                r=int(cfg["r"]),
                seed=int(cfg.get("seed", 0)),
                status=res.status,
                model=str(cfg.get("model", "")),
                task=str(cfg.get("task", "")),
                num_labels=int(res.task_info.get("num_classes", 2)),
                finished_at=res.finished_at or "",
                has_delta=(rj.parent / DELTA_FILE).is_file(),
                converged=res.converged,
                score=res.score(),
                steps=res.steps,
            )
        )
    return runs


def select_runs(runs: Sequence[Run]) -> tuple[dict[tuple[int, int], Run], list[str]]:
    """The usable run per (r, seed) (status ok, delta present) + notes.

    Of several, a converged run wins over an unconverged one (a rerun with a higher step cap),
    then the latest.
    """
    notes: list[str] = []
    chosen: dict[tuple[int, int], Run] = {}
    for run in sorted(runs, key=lambda x: (x.converged is True, x.finished_at, x.run_id)):
        key = (run.r, run.seed)
        if run.status != "ok" or not run.has_delta:
            why = f"status {run.status}" if run.status != "ok" else "no delta.safetensors"
            notes.append(f"run {run.run_id} (r={run.r}, seed={run.seed}) skipped: {why}")
            continue
        if key in chosen:
            notes.append(
                f"r={run.r} seed={run.seed}: several runs ({chosen[key].run_id}, {run.run_id}); "
                f"using {run.run_id} ({'converged' if run.converged else 'the latest'})"
            )
        chosen[key] = run
    groups = {(x.model, x.task) for x in chosen.values()}
    if len(groups) > 1:
        notes.append(f"runs span several (model, task) pairs {sorted(groups)}; compare with care")
    return chosen, notes


def accuracy_by_rank(chosen: Mapping[tuple[int, int], Run]) -> dict[int, dict[str, Any]]:
    """Hu et al. Table 6 (rank needed) on these runs: per r, each seed's final score, steps, converged."""
    out: dict[int, dict[str, Any]] = {}
    for (r, seed), run in sorted(chosen.items()):
        row = out.setdefault(r, {"scores": {}, "steps": {}, "converged": {}})
        row["scores"][seed] = run.score
        row["steps"][seed] = run.steps
        row["converged"][seed] = run.converged
    for row in out.values():
        vals = [v for v in row["scores"].values() if v is not None]
        row["mean"] = sum(vals) / len(vals) if vals else None
    return out


def pretrained_base_weights(model_name: str, names: Sequence[str], num_labels: int = 2) -> dict[str, Tensor]:
    """W_0 of ``names`` from the pretrained model (sequence-classification wrapper, as trained)."""
    from idlab.models import load_model

    model, _ = load_model(model_name, task="classification", num_labels=num_labels)
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"{model_name} has no module {missing[0]!r} (of {len(missing)} asked); "
                         "the delta file and the model disagree on module names")
    out = {n: mods[n].weight.detach().float().cpu().clone() for n in names}
    del model, mods
    return out


def _phi_summary(phi: Tensor, k: int) -> dict[str, Any]:
    """Summary numbers of a phi map (p1, p2) and their random baselines."""
    p1, p2 = phi.shape
    base = random_baseline_map(p1, p2, k)
    i8, j8 = min(8, p1), min(8, p2)
    J = p2
    # overlap of run 1's i-th direction alone with run 2's top-J subspace (needs J >= i):
    # ||u_i^T U2[:, :J]||^2 = i phi(i, J) - (i - 1) phi(i - 1, J)
    single = [
        float(i * phi[i - 1, J - 1] - (i - 1) * phi[i - 2, J - 1]) if i > 1 else float(phi[0, J - 1])
        for i in range(1, min(p1, J) + 1)
    ]
    others = single[1:]
    return {
        "phi_11": float(phi[0, 0]),
        "base_11": random_baseline(1, 1, k),
        "phi_1J": float(phi[0, J - 1]),
        "base_1J": random_baseline(1, J, k),
        "mean_8x8": float(phi[:i8, :j8].mean()),
        "base_mean_8x8": float(base[:i8, :j8].mean()),
        "phi_full": float(phi[p1 - 1, J - 1]),
        "base_full": random_baseline(p1, J, k),
        "others_mean_1J": float(sum(others) / len(others)) if others else math.nan,
        "single_overlaps": single,
        "J": J,
        "k": k,
    }


def _heatmap(path: Path, phi: Tensor, k: int, title: str, ylabel: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = random_baseline_map(phi.shape[0], phi.shape[1], k)
    vmax = max(float(phi.max()), float(base.max()))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), constrained_layout=True)
    ext = (0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5)
    for ax, m, name in ((axes[0], phi, "phi"), (axes[1], base, f"random baseline max(i,j)/{k}")):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       extent=ext, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax, label="phi(i, j)")
    fig.suptitle(title, fontsize=9)
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _random_delta_like(delta: LowRankDelta | Tensor, r: int, seed: int) -> LowRankDelta:
    """A random rank-r Delta W (Gaussian factors, seeded) with the Frobenius norm of ``delta``."""
    d_out, d_in = (delta.shape if isinstance(delta, LowRankDelta) else tuple(delta.shape))
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    dense = delta.dense(torch.float64) if isinstance(delta, LowRankDelta) else delta.double()
    target = float(torch.linalg.norm(dense))
    scale = target / float(torch.linalg.norm(B @ A))
    return LowRankDelta(B, A, scale)


def _pairs(chosen: Mapping[tuple[int, int], Run], r_lo: int, r_hi: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(label, run 1, run 2): the rank pair at every seed, the seed pairs at r_hi."""
    seeds = sorted({s for (_, s) in chosen})
    out = [("rank", (r_lo, s), (r_hi, s)) for s in seeds if (r_lo, s) in chosen and (r_hi, s) in chosen]
    hi_seeds = [s for s in seeds if (r_hi, s) in chosen]
    out += [("seed", (r_hi, a), (r_hi, b)) for a, b in itertools.combinations(hi_seeds, 2)]
    return out


def analyse(
    results: str | Path,
    layers: str | int | Sequence[int] = "all",
    out: str | Path | None = None,
    base_weights: BaseWeights | None = None,
    figures: bool = True,
    *,
    rank_pair: tuple[int, int] = (8, 64),
    focus_layer: int | None = None,
    source: Source = "factor",
) -> dict[str, Any]:
    """Run the Section 7 analysis; returns the numbers (also written to ``out`` if given).

    Args:
        results: a study folder holding LoRA query+value runs.
        layers: "all" (every layer in the delta files), one index, or a list.
        out: output folder (None: nothing written).
        base_weights: ``base_weights(model_name, module_names)`` supplying W_0 (default: the
            pretrained model via `idlab.models.load_model`); tests pass small tensors.
        figures: write the phi heatmaps of the focus layer.
        rank_pair: (r_lo, r_hi) of the rank comparison (Hu et al.: 8 and 64).
        focus_layer: layer of the heatmaps and the detailed tables (default: the middle one).
        source: phi from the right singular vectors of A ("factor", Hu et al. eq. 4) or of
            Delta W ("update"); see `idlab.analysis.subspace_of`.

    Raises:
        ValueError: no usable query+value run at r_lo or r_hi (naming the missing ranks and
            the ranks found), or an asked layer that is not in the delta files.
    """
    results = Path(results)
    r_lo, r_hi = rank_pair
    runs = find_runs(results)
    chosen, notes = select_runs(runs)
    have_ranks = sorted({r for (r, _) in chosen})
    absent = [r for r in (r_lo, r_hi) if not any(rr == r for (rr, _) in chosen)]
    if absent:
        found = f"usable ranks found: {have_ranks}" if have_ranks else "no usable LoRA query+value run at all"
        raise ValueError(
            f"{results}: no usable LoRA query+value run (target set {' or '.join(QV_TARGET_SETS)}, status ok, "
            f"with delta.safetensors) at r={', r='.join(map(str, absent))}; {found} among {len(runs)} "
            "LoRA query+value runs. Run e.g. `idlab sweep experiments/configs/hu2021_section7_minilm.yaml` "
            "or pass rank_pair / --rank-pair with ranks that exist."
        )
    seeds = sorted({s for (_, s) in chosen})
    missing = [f"query+value r={r} seed={s}" for r in (r_lo, r_hi) for s in seeds if (r, s) not in chosen]
    if len([s for s in seeds if (r_hi, s) in chosen]) < 2:
        missing.append(f"query+value r={r_hi} at a second seed (for the seed pair)")
    align_ranks = sorted({r for r in (*ALIGN_RANKS, r_lo, r_hi) if (r, 0) in chosen})
    pairs = _pairs(chosen, r_lo, r_hi)
    wanted = {k for _, a, b in pairs for k in (a, b)} | {(r, 0) for r in align_ranks}

    deltas: dict[tuple[int, int], dict[tuple[int, str], Any]] = {}
    names: dict[tuple[int, str], str] = {}
    for key in sorted(wanted):
        d = load_deltas(chosen[key].path / "delta.safetensors")
        got: dict[tuple[int, str], Any] = {}
        for n, v in d.items():
            lr = module_role(n)
            if lr is not None:
                got[lr] = v
                names.setdefault(lr, n)
        deltas[key] = got
    all_layers = sorted({layer for (layer, _) in names})
    if layers == "all":
        use_layers = all_layers
    else:
        use_layers = [int(layers)] if isinstance(layers, (int, str)) else [int(x) for x in layers]
        bad = [x for x in use_layers if x not in all_layers]
        if bad:
            raise ValueError(f"layers {bad} are not in the delta files; layers present: {all_layers}")
    focus = focus_layer if focus_layer is not None else (all_layers[len(all_layers) // 2] if all_layers else None)
    ref = chosen[(r_hi, seeds[0])] if (r_hi, seeds[0]) in chosen else next(iter(chosen.values()))
    if source not in ("factor", "update"):
        raise ValueError(f"source={source!r} is unknown; use 'factor' (from A, Hu et al. eq. 4) or 'update' (from Delta W)")
    meta = {"model": ref.model, "task": ref.task, "layers": use_layers, "focus_layer": focus, "phi_source": source,
            "results": str(results), "rank_pair": [r_lo, r_hi],
            "module_names": {f"{layer}/{role}": names[(layer, role)] for (layer, role) in sorted(names)}}
    out_dir = Path(out) if out is not None else None
    used = sorted(wanted)
    report: dict[str, Any] = {
        "meta": meta,
        "runs_used": {f"r={r} seed={s}": chosen[(r, s)].run_id for (r, s) in used},
        "runs_converged": {f"r={r} seed={s}": chosen[(r, s)].converged for (r, s) in used},
        "runs_found": len(runs),
        "accuracy": accuracy_by_rank(chosen),
        "missing": missing,
        "notes": notes,
        "phi": {},  # phi[layer][role][label] = list of summaries (one per pair)
        "alignment": {},  # alignment[layer][role][r] = row
        "figures": [],
    }

    # ---- Section 7.2: phi maps
    for layer in use_layers:
        for role in ROLES:
            lr = (layer, role)
            for label, k1, k2 in pairs:
                if lr not in deltas[k1] or lr not in deltas[k2]:
                    continue
                U1 = subspace_of(deltas[k1][lr], side="right", source=source)
                U2 = subspace_of(deltas[k2][lr], side="right", source=source)
                p1, p2 = min(PHI_MAX_I, U1.shape[1]), U2.shape[1]
                phi = subspace_similarity(U1[:, :p1], U2[:, :p2])
                k = int(U1.shape[0])
                summ = _phi_summary(phi, k)
                summ["runs"] = [chosen[k1].run_id, chosen[k2].run_id]
                summ["desc"] = f"r={k1[0]} s={k1[1]} vs r={k2[0]} s={k2[1]}"
                summ["map"] = phi.tolist()
                first = not report["phi"].get(layer, {}).get(role, {}).get(label)
                if figures and out_dir is not None and layer == focus and first:
                    fig = out_dir / f"phi_{label}_layer{layer}_{role}.png"
                    title = (f"Hu et al. 7.2 phi, {meta['model']} on {meta['task']}, layer {layer} "
                             f"{names[lr]}, right singular vectors of {_SOURCE_TEXT[source]}: {summ['desc']}")
                    _heatmap(fig, phi, k, title, f"i (top-i directions, {summ['desc'].split(' vs ')[0]})",
                             f"j (top-j directions, {summ['desc'].split(' vs ')[1]})")
                    summ["figure"] = str(fig)
                    report["figures"].append(str(fig))
                report["phi"].setdefault(layer, {}).setdefault(role, {}).setdefault(label, []).append(summ)

    # ---- Section 7.3: amplification, with the random controls
    if align_ranks:
        need = sorted({names[(layer, role)] for layer in use_layers for role in ROLES if (layer, role) in names})
        if base_weights is None:
            run0 = chosen[(align_ranks[0], 0)]
            W0 = pretrained_base_weights(run0.model, need, run0.num_labels)
        else:
            W0 = dict(base_weights(meta["model"], need))
        for layer in use_layers:
            for role in ROLES:
                n = names.get((layer, role))
                if n is None or n not in W0:
                    notes.append(f"no base weight for layer {layer} {role}; amplification skipped")
                    continue
                for r in align_ranks:
                    delta = deltas[(r, 0)].get((layer, role))
                    if delta is None:
                        continue
                    res = weight_alignment(delta, W0[n], r=r)
                    ctrl = weight_alignment(_random_delta_like(delta, r, seed=1000 + layer), W0[n], r=r)
                    row: dict[str, Any] = dict(res.as_dict())
                    row["run_id"] = chosen[(r, 0)].run_id
                    row["scale"] = float(delta.scale) if isinstance(delta, LowRankDelta) else 1.0
                    pr = res.proj_random
                    row["amplification_random"] = res.delta_fro / pr if pr > 0 else math.inf
                    row["delta_over_random"] = res.proj_delta / pr if pr > 0 else math.inf
                    row["amplification_random_delta"] = ctrl.amplification
                    report["alignment"].setdefault(layer, {}).setdefault(role, {})[r] = row

    report["verdict"] = verdict(report, r_hi)
    md = render_markdown(report)
    report["markdown"] = md
    if out_dir is not None:
        atomic_write_text(out_dir / "section7.md", md)
        atomic_write_text(out_dir / "section7.json",
                          json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1, default=str))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--results", required=True, help="study folder, e.g. results/hu2021_section7_minilm")
    ap.add_argument("--layers", default="all", help="'all' (default) or comma-separated layer indices")
    ap.add_argument("--rank-pair", default="8,64", help="r_lo,r_hi of the rank comparison (default 8,64)")
    ap.add_argument("--focus-layer", type=int, default=None, help="layer of the heatmaps (default: middle)")
    ap.add_argument("--out", default="results/hu2021_section7", help="output folder")
    ap.add_argument("--no-figures", action="store_true", help="skip the PNG heatmaps")
    ap.add_argument("--source", choices=["factor", "update"], default="factor",
                    help="phi from the right singular vectors of A (Hu et al. eq. 4, default) or of Delta W")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers: str | list[int] = "all" if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    lo, hi = (int(x) for x in args.rank_pair.split(","))
    rep = analyse(args.results, layers, args.out, figures=not args.no_figures, rank_pair=(lo, hi),
                  focus_layer=args.focus_layer, source=args.source)
    print(rep["markdown"])
    if rep["missing"]:
        print(f"missing runs: {', '.join(rep['missing'])}")
    print(f"wrote {Path(args.out) / 'section7.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
