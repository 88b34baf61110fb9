"""Reproduce Li et al. 2018, Table 1, MNIST rows: d90 of the FC 784-200-200-10 (D = 199,210)
and LeNet (D = 44,426) networks, Fastfood and dense projections, 3 seeds, seed bootstrap.

    python -m experiments.li2018 [--quick] [--models fc,lenet] [--projections fastfood,dense]
                                 [--seeds 0,1,2] [--epochs N] [--out results/li2018]
                                 [--until converged --patience 3 --tol 0.002]
    python -m experiments.li2018 --paper-training     # Table 1 at the paper's training, one command

Per (model, projection): the direct-training runs (one per seed) give the local
baseline (their mean validation accuracy); `idlab.d90.find_d90` searches d with
that baseline; the same evaluations are re-analysed with the global baseline 1.0.
Every training run is a run folder ``<out>/runs/<tag>/`` written atomically by `idlab.runs.RunStore`
and skipped when it is whole (resumable). Summaries go to ``<out>/<model>_<projection>.json``
and the figure to ``<out>/li2018.png``.

Training (the authors' scripts): Adam lr 1e-3, betas (0.9, 0.99), batch 128, L2 on
theta_D (``--l2``, default 1e-5), performance = accuracy on the 10k MNIST validation
split. The paper trains far longer; ``--epochs`` sets the cut (default 1). With
``--until converged`` every run is evaluated once per epoch and stops by the rule of
`idlab.training.convergence` (patience ``--patience`` epochs without a ``--tol`` gain), ``--epochs``
being the cap; each run JSON records ``converged`` and its curve, and each summary lists
the runs that hit the cap unconverged. ``--paper-training`` = ``--until converged --epochs 100
--d-start fc=700,lenet=290 --rtol 0.2 --projections fastfood --out results/li2018_converged``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idlab.atomic import atomic_file, atomic_write_text
from idlab.d90 import analyze_d90, find_d90
from idlab.data.base import ClassificationTask
from idlab.data.vision import mnist_task
from idlab.models import lenet, mnist_fc, num_parameters
from idlab.runs import RunResult, RunStore, iter_results
from idlab.subspace import SubspaceModel
from idlab.training.convergence import run_converged
from idlab.training.loop import TrainConfig, train

MODELS: dict[str, Callable[[], nn.Module]] = {"fc": mnist_fc, "lenet": lenet}
PAPER = {"fc": {"d90": 750, "bootstrap": "786 ± 66", "D": 199_210},
         "lenet": {"d90": 290, "bootstrap": "290 ± 0", "D": 44_426}}
D_START = {"fc": 256, "lenet": 128}


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def run_once(out: Path, tag: str, build: Callable[[], tuple[nn.Module, int]], task: ClassificationTask,
             cfg: TrainConfig, l2: float, meta: dict[str, Any]) -> float:
    """One training run, kept as the run folder ``<out>/runs/<tag>/`` (`idlab.runs.RunStore`: written
    atomically, reused when whole); returns validation accuracy."""
    store = RunStore(out)
    if store.is_done(tag):
        done = store.result(tag)
        assert done is not None
        return LiRun.of(done).score
    model, d = build()
    extra = model.penalty(l2) if isinstance(model, SubspaceModel) and l2 > 0 else None
    if extra is None and l2 > 0:
        def extra() -> torch.Tensor:
            return l2 * sum((p.pow(2).sum() for p in model.parameters()), torch.zeros(()))
    t0 = time.perf_counter()
    res = train(model, task, cfg, extra_loss=extra, desc=tag)
    score = float("nan") if res.diverged else res.metrics["accuracy"]
    # the li2018 record layout: RunResult's config, wall_time_s, converged; the rest kept as extra keys
    store.write(tag, RunResult.from_dict({"tag": tag, "score": score, "d": d, **meta,
                                          "wall_time_s": time.perf_counter() - t0, "converged": res.converged,
                                          "train": res.to_dict(), "config": {**cfg.__dict__, "l2": l2}}))
    print(f"[li2018] {tag}: val acc {score:.4f}, {res.steps} steps, converged {res.converged} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return score


@dataclass(frozen=True)
class LiRun:
    """One training run of this script as its result.json records it (`idlab.runs.RunResult` with the
    extra keys tag, score, d, model, method, seed and train, the `TrainResult` as a dict)."""

    tag: str
    score: float  # validation accuracy (NaN: diverged)
    d: int  # subspace dimension, or D for direct training
    method: str  # "direct" or "subspace/<projection>"
    seed: int
    converged: bool | None
    wall_time_s: float
    curve: tuple[Mapping[str, float], ...]  # the per-evaluation curve of the training loop

    @classmethod
    def of(cls, res: RunResult) -> LiRun:
        x = res.extra
        score = x.get("score")
        train = x.get("train") or {}
        return cls(tag=str(x.get("tag", "")), score=math.nan if score is None else float(score), d=int(x.get("d", 0)),
                   method=str(x.get("method", "")), seed=int(x.get("seed", 0)), converged=run_converged(res),
                   wall_time_s=float(res.wall_time_s or 0.0), curve=tuple(train.get("curve") or ()))


def _records(out: Path, model_name: str) -> list[LiRun]:
    """The whole run records of ``model_name`` under ``<out>/runs`` (through `idlab.runs.iter_results`)."""
    runs = [LiRun.of(res) for _, res in iter_results(out / "runs")]
    return [r for r in runs if r.tag.startswith(f"{model_name}_")]


def measure(model_name: str, kind: str, args: argparse.Namespace, task: ClassificationTask) -> dict[str, Any]:
    out = Path(args.out)
    t_start = time.perf_counter()
    fn = MODELS[model_name]

    per_epoch = math.ceil(task.num_train / 128)

    def cfg(seed: int) -> TrainConfig:
        conv = {"until": "converged", "eval_every": per_epoch, "patience": args.patience, "tol": args.tol}
        return TrainConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), batch_size=128, epochs=args.epochs,
                           seed=seed, device="cpu", progress=False, eval_batch_size=1000,
                           **(conv if args.until == "converged" else {}))

    def direct(seed: int) -> float:
        def build() -> tuple[nn.Module, int]:
            torch.manual_seed(seed)
            m = fn()
            return m, num_parameters(m)
        return run_once(out, f"{model_name}_direct_s{seed}", build, task, cfg(seed), args.l2,
                        {"model": model_name, "method": "direct", "seed": seed})

    def evaluate(d: int, seed: int) -> float:
        def build() -> tuple[nn.Module, int]:
            torch.manual_seed(seed)
            opts = {"dense_cache_limit": args.dense_cache_mb << 18} if kind == "dense" else {}
            # layout "global": Li et al.'s single Fastfood block, as in the paper's code
            return SubspaceModel(fn(), dim=d, projection=kind, seed=seed, projection_options=opts,
                                 layout="global"), d
        return run_once(out, f"{model_name}_{kind}_d{d}_s{seed}", build, task, cfg(seed), args.l2,
                        {"model": model_name, "method": f"subspace/{kind}", "seed": seed})

    baseline = [direct(s) for s in args.seeds]
    res = find_d90(evaluate, baseline, 0.9, seeds=args.seeds, d_min=args.d_min, d_max=min(args.d_max or PAPER[model_name]["D"], PAPER[model_name]["D"]),
                   d_start=args.d_start.get(model_name, D_START[model_name]), rtol=args.rtol,
                   on_nan="fail", n_bootstrap=1000,
                   log=lambda s: print(f"[li2018] {model_name}/{kind} {s}", flush=True))
    glob = analyze_d90(res.evaluations, 1.0, 0.9, n_bootstrap=1000)
    records = _records(out, model_name)
    records = [r for r in records if r.method in ("direct", f"subspace/{kind}")]
    unconverged = [r.tag for r in records if r.converged is False]
    summary = {
        "model": model_name, "projection": kind, "D": PAPER[model_name]["D"], "paper": PAPER[model_name],
        "local": res.to_dict(), "global": {k: v for k, v in glob.to_dict().items() if k != "evaluations"},
        "epochs": args.epochs, "l2": args.l2, "seeds": list(args.seeds), "until": args.until,
        "patience": args.patience, "tol": args.tol, "unconverged_runs": unconverged,
        "training_wall_time_s": sum(r.wall_time_s for r in records),
        "n_training_runs": len(res.evaluations) + len(baseline),
        "wall_time_s_this_invocation": time.perf_counter() - t_start,
    }
    write_json(out / f"{model_name}_{kind}.json", summary)
    return summary


def plot(out: Path) -> Path | None:
    """Accuracy against d (log x): seed means and spread, baseline, 90% line, d90."""
    files = sorted(p for p in out.glob("*_*.json") if not p.name.startswith("."))
    summaries = [json.loads(p.read_text()) for p in files]
    if not summaries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 4), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        loc = s["local"]
        df = pd.DataFrame(loc["evaluations"])
        g = df.groupby("d")["score"].agg(["mean", "min", "max"]).reset_index()
        ax.scatter(df["d"], df["score"], s=8, alpha=0.5, color="C0", label="runs (seeds)")
        ax.plot(g["d"], g["mean"], "-o", ms=3, color="C0", label="seed mean")
        ax.fill_between(g["d"], g["min"], g["max"], alpha=0.2, color="C0")
        ax.axhline(loc["baseline"], color="k", lw=1, label=f"local baseline {loc['baseline']:.4f}")
        ax.axhline(loc["target"], color="C3", ls="--", lw=1, label="90% of local baseline")
        ax.axhline(0.9, color="C2", ls=":", lw=1, label="90% of global 1.0")
        if loc["d90"] is not None:
            ax.axvline(loc["d90_interp"], color="C3", lw=1, label=f"d90 = {loc['d90']} (interp {loc['d90_interp']:.0f})")
        ax.axvline(s["paper"]["d90"], color="gray", ls="-.", lw=1, label=f"paper d90 = {s['paper']['d90']}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("subspace dimension d")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"MNIST {s['model']} / {s['projection']} ({s.get('until', 'steps')}, {s['epochs']:g} epoch cap)")
        ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    path = out / "li2018.png"
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _at_epoch(curve: Sequence[Mapping[str, float]], step: int) -> tuple[float, bool]:
    """Accuracy of a run after ``step`` optimizer steps, read off its per-epoch curve, and whether
    the run reached that step (else: its last evaluation, the run having stopped before)."""
    pts = [c for c in curve if c["step"] <= step]
    return (float(pts[-1]["accuracy"]) if pts else float("nan")), curve[-1]["step"] >= step


def cut_table(out: Path, model_name: str, kind: str, cuts: tuple[int, ...] = (1, 5, 10, 20)) -> list[dict[str, Any]]:
    """d90 had training been cut at ``cuts`` epochs, from the per-epoch curves of the converged runs.

    With a constant learning rate and a fixed data order per seed, the first k epochs of a
    longer run are the k-epoch run, so a cut needs no new training (exact while every run
    reached the cut; otherwise the row says how many runs had already stopped, by the rule).
    """
    runs = _records(out, model_name)
    per_epoch = math.ceil(50_000 / 128)
    rows = []
    for k in (*cuts, None):
        def score(r: LiRun, k: int | None = k) -> tuple[float, bool]:
            if k is None:
                return r.score, True
            return _at_epoch(r.curve, k * per_epoch)
        direct = [score(r) for r in runs if r.method == "direct"]
        sub = {(r.d, r.seed): score(r) for r in runs if r.method == f"subspace/{kind}"}
        res = analyze_d90({key: v for key, (v, _) in sub.items()}, [v for v, _ in direct], 0.9, n_bootstrap=1000)
        stopped = sum(not ok for _, ok in direct) + sum(not ok for _, ok in sub.values())
        rows.append({"epochs": "converged (rule)" if k is None else k, "baseline": res.baseline,
                     "d90": res.d90, "d90_interp": res.d90_interp, "ci": res.ci,
                     "runs_stopped_before_cut": stopped, "n_runs": len(direct) + len(sub),
                     "means": {int(d): float(m) for d, m in res.curve()[["d", "mean"]].itertuples(index=False)}})
    return rows


def plot_curves(out: Path, model_name: str, kind: str) -> Path | None:
    """Validation accuracy against epoch for every run of one search (seed colour, d panel)."""
    runs = _records(out, model_name)
    runs = [r for r in runs if r.method in ("direct", f"subspace/{kind}")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_epoch = math.ceil(50_000 / 128)
    fig, ax = plt.subplots(figsize=(8, 5))
    ds = sorted({r.d for r in runs if r.method != "direct"})
    colours = {d: f"C{i}" for i, d in enumerate(ds)}
    for r in runs:
        c = r.curve
        x = [p["step"] / per_epoch for p in c]
        y = [p["accuracy"] for p in c]
        direct = r.method == "direct"
        col = "k" if direct else colours[r.d]
        lab = ("direct" if direct else f"d = {r.d}") if r.seed == 0 else None
        ax.plot(x, y, color=col, lw=1, alpha=0.8, label=lab)
        ax.plot(x[-1:], y[-1:], "o" if r.converged else "x", color=col, ms=4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"MNIST {model_name} / {kind}: every run (3 seeds), o = converged by the rule, x = cap")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / f"curves_{model_name}_{kind}.png"
    atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2k train images, 0.2 epoch, 2 seeds")
    ap.add_argument("--models", default="fc,lenet")
    ap.add_argument("--projections", default="fastfood,dense")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs (the cap with --until converged)")
    ap.add_argument("--until", choices=("steps", "converged"), default="steps",
                    help="converged: evaluate every epoch and stop by idlab.training.convergence's rule")
    ap.add_argument("--patience", type=int, default=3, help="epochs without a --tol gain that stop a run")
    ap.add_argument("--tol", type=float, default=0.002, help="smallest validation-accuracy gain that counts")
    ap.add_argument("--paper-training", action="store_true",
                    help="Table 1 at the paper's training: until converged, 100-epoch cap, Fastfood")
    ap.add_argument("--l2", type=float, default=1e-5, help="L2 on theta_D (Li et al.: 1e-4 or 1e-5)")
    ap.add_argument("--rtol", type=float, default=0.1, help="bisection tolerance (hi - lo) / hi")
    ap.add_argument("--d-min", type=int, default=10)
    ap.add_argument("--d-start", default="", help="e.g. fc=256,lenet=128")
    ap.add_argument("--d-max", type=int, default=0, help="largest d to try (default: D, the model's size)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--dense-cache-mb", type=int, default=2048,
                    help="hold a dense P up to this size as a matrix (faster); larger ones are regenerated")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--out", default="results/li2018")
    args = ap.parse_args(argv)
    if args.paper_training:
        defaults = {"until": "converged", "epochs": 100.0, "d_start": "fc=700,lenet=290", "rtol": 0.2,
                    "projections": "fastfood", "out": "results/li2018_converged"}
        for k, v in defaults.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.seeds = tuple(int(s) for s in args.seeds.split(","))
    args.d_start = {k: int(v) for k, v in (kv.split("=") for kv in args.d_start.split(",") if kv)}
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.plot_only:
        print(plot(out))
        for f in sorted(out.glob("*_*.json")):
            m, kind = f.stem.split("_", 1)
            print(plot_curves(out, m, kind))
            table = cut_table(out, m, kind)
            write_json(out / "cuts" / f"{m}_{kind}.json", table)
            for row in table:
                print(f"[li2018] {m}/{kind} cut {row['epochs']}: d90 {row['d90']} (interp {row['d90_interp']}, "
                      f"ci {row['ci']}), baseline {row['baseline']:.4f}, stopped before cut "
                      f"{row['runs_stopped_before_cut']}/{row['n_runs']}; means {row['means']}")
        return
    if args.quick:
        args.epochs, args.seeds = min(args.epochs, 0.2), args.seeds[:2]
        args.out = str(out / "quick")
        out = Path(args.out)
    task = mnist_task("val", max_train=2000 if args.quick else None)
    t0 = time.perf_counter()
    for m in args.models.split(","):
        for kind in args.projections.split(","):
            s = measure(m, kind, args, task)
            loc, glob = s["local"], s["global"]
            print(f"[li2018] {m}/{kind}: d90 local {loc['d90']} (interp {loc['d90_interp']}, ci {loc['ci']}), "
                  f"global {glob['d90']}; paper {PAPER[m]['d90']}; runs {s['n_training_runs']}", flush=True)
    print(f"[li2018] total wall {time.perf_counter() - t0:.0f}s; figure {plot(out)}")


if __name__ == "__main__":
    main()
