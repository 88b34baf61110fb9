"""Benchmark: LoRA through idlab vs PEFT directly, and full fine-tuning vs LoRA, on SmolLM2-135M.

    python -m bench.bench_lora [--quick]

(a) Overhead of idlab's path (``apply_lora`` + the step `idlab.training.loop.train` runs:
    ``task.loss`` -> zero_grad -> backward -> AdamW step -> scheduler step) against PEFT
    used directly (``get_peft_model`` + ``model(input_ids, labels=...).loss``), same model
    (SmolLM2-135M, LoRA r=8 on q_proj, v_proj), same batch. Timed interleaved in one
    process (A, B, A, B, ...) so machine noise hits both alike; target ratio <= 1.05.
(b) Full fine-tuning vs LoRA r=8 (q_proj, v_proj) vs LoRA r=64 (all-linear): step time,
    tokens/s, peak RSS. Each configuration runs in its own subprocess so peak memory
    (the process's ru_maxrss, model load included) is not contaminated by the others.

Writes ``bench/results/lora.md`` atomically and returns the markdown from ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine
from idlab.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "lora.md"
MODEL = "smollm2-135m"

CONFIGS: dict[str, str] = {
    "full": "full fine-tuning (all 134.5M parameters)",
    "lora-qv-r8": "LoRA r=8 on q_proj, v_proj (idlab.apply_lora)",
    "lora-all-r64": "LoRA r=64 on all-linear (idlab.apply_lora)",
    "peft-qv-r8": "LoRA r=8 on q_proj, v_proj (PEFT directly)",
}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024



def _setup(quick: bool) -> tuple[Any, Any, Any]:
    """SmolLM2 (causal LM), its tokenizer and a fixed batch (inputs, targets)."""
    import torch

    from idlab.data.corpus import text_corpus_task
    from idlab.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(MODEL)
    bs, block = (2, 32) if quick else (4, 64)
    task = text_corpus_task(tok, block_size=block, max_blocks=64, seed=0)
    x, y = task.train_batch(torch.arange(bs))
    return model, task, (x, y)


def _idlab_step(model: Any, task: Any, batch: Any) -> Any:
    """One step exactly as idlab.training.loop.train does it (optimizer/scheduler built by the caller)."""
    import torch

    from idlab.training.loop import TrainConfig, _lr_lambda, _optimizer, trainable_parameters

    cfg = TrainConfig(lr=1e-4, optimizer="adamw")
    opt = _optimizer(trainable_parameters(model), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, 1000))

    def step() -> float:
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    return step


def _peft_step(model: Any, batch: Any) -> Any:
    import torch

    x, y = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=x["input_ids"], labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def _build(name: str, model: Any, task: Any, batch: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    from idlab.methods.lora_peft import apply_lora

    if name == "full":
        model.requires_grad_(True)
        return model, _idlab_step(model, task, batch)
    if name == "lora-qv-r8":
        m = apply_lora(model, r=8, target_modules=("q_proj", "v_proj"))
        return m, _idlab_step(m, task, batch)
    if name == "lora-all-r64":
        m = apply_lora(model, r=64, target_modules="all-linear")
        return m, _idlab_step(m, task, batch)
    if name == "peft-qv-r8":
        cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        m = get_peft_model(model, cfg)
        return m, _peft_step(m, batch)
    raise ValueError(f"unknown config {name!r}; one of {list(CONFIGS)}")


def _time(step: Any, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def worker(name: str, quick: bool) -> dict[str, Any]:
    """Run one configuration in this process: step times and peak RSS."""
    from idlab.methods.lora_peft import count_parameters

    model, task, batch = _setup(quick)
    rss_loaded = _rss_now()
    m, step = _build(name, model, task, batch)
    m.train()
    times = _time(step, warmup=1, repeats=2 if quick else 4)
    total, trainable = count_parameters(m)
    x, _ = batch
    return {
        "name": name,
        "times": times,
        "tokens": int(x["input_ids"].numel()),
        "batch": list(x["input_ids"].shape),
        "rss_loaded": rss_loaded,
        "peak_rss": _peak_rss(),
        "trainable": trainable,
        "total": total,
    }


def interleaved(quick: bool) -> dict[str, Any]:
    """idlab vs PEFT step time on identical model copies and batch, timed A/B alternately."""
    model, task, batch = _setup(quick)
    a, step_a = _build("lora-qv-r8", model, task, batch)
    b, step_b = _build("peft-qv-r8", _fresh(), task, batch)
    a.train()
    b.train()
    reps = 3 if quick else 6
    for s in (step_a, step_b):
        s()
    ta, tb = [], []
    for _ in range(reps):
        for s, out in ((step_a, ta), (step_b, tb)):
            t0 = time.perf_counter()
            s()
            out.append(time.perf_counter() - t0)
    return {"idlab": ta, "peft": tb}


def _fresh() -> Any:
    from idlab.models import load_model

    return load_model(MODEL)[0]


def _run_sub(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_lora", *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mmm(xs: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v * scale) for v in (min(xs), statistics.median(xs), max(xs)))



def main(quick: bool = False) -> str:
    """Run the benchmark, write bench/results/lora.md atomically, return its markdown."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    inter = _run_sub(["--interleaved", *(["--quick"] if quick else [])])
    rows = {name: _run_sub(["--worker", name, *(["--quick"] if quick else [])]) for name in CONFIGS}
    paired = [a / b for a, b in zip(inter["idlab"], inter["peft"])]
    ratio_pairs = statistics.median(paired)
    ratio_min = min(inter["idlab"]) / min(inter["peft"])
    r0 = rows["lora-qv-r8"]
    gib = 1 / 2**30
    lines = [
        "# LoRA benchmark (bench/bench_lora.py)",
        "",
        f"Machine: {machine()}. Model: {MODEL} (SmolLM2-135M-Instruct, float32, CPU). "
        f"Batch {r0['batch'][0]} x {r0['batch'][1]} tokens of the pydoc corpus, AdamW. "
        f"{'Quick mode. ' if quick else ''}Times are min / median / max over "
        f"{len(r0['times'])} timed steps after one warmup step (load average at start: "
        f"{load_start:.1f}, at end {os.getloadavg()[0]:.1f}, on this shared machine: expect noise).",
        "",
        "## (a) idlab path vs PEFT directly (LoRA r=8, q_proj + v_proj), interleaved A/B",
        "",
        "| path | step time s (min / median / max) |",
        "|---|---|",
        f"| idlab: apply_lora + idlab.train step | {_mmm(inter['idlab'])} |",
        f"| PEFT: get_peft_model + plain step | {_mmm(inter['peft'])} |",
        "",
        f"Step-time ratio idlab / PEFT: **{ratio_min:.3f}** (fastest step vs fastest step, the "
        f"estimate least affected by other load on a shared machine; target <= 1.05); median of "
        f"the {len(paired)} paired A/B ratios {ratio_pairs:.3f} "
        f"(range {min(paired):.2f}-{max(paired):.2f}). "
        f"Separate-process runs: idlab {statistics.median(rows['lora-qv-r8']['times']):.3f} s, "
        f"PEFT {statistics.median(rows['peft-qv-r8']['times']):.3f} s per step; "
        f"peak RSS idlab {rows['lora-qv-r8']['peak_rss'] * gib:.2f} GiB, "
        f"PEFT {rows['peft-qv-r8']['peak_rss'] * gib:.2f} GiB.",
        "",
        "## (b) full fine-tuning vs LoRA (each in its own process)",
        "",
        "| config | trainable params | step time s (min / median / max) | tokens/s (median) | "
        "peak RSS GiB | RSS after load GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("full", "lora-qv-r8", "lora-all-r64", "peft-qv-r8"):
        r = rows[name]
        med = statistics.median(r["times"])
        lines.append(
            f"| {CONFIGS[name]} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
            f"{_mmm(r['times'])} | {r['tokens'] / med:,.0f} | {r['peak_rss'] * gib:.2f} | "
            f"{r['rss_loaded'] * gib:.2f} |"
        )
    lines += [
        "",
        "Peak RSS is the process's high-water mark (model load included); the difference "
        "between configurations is the optimizer state and gradients of the trainable "
        "parameters plus activations kept for backward.",
        "",
        f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    md = "\n".join(lines)
    atomic_write_text(RESULTS, md)
    return md


def _cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
    elif args.interleaved:
        print(json.dumps(interleaved(args.quick)))
    else:
        print(main(args.quick))


if __name__ == "__main__":
    _cli()
