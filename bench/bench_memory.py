"""Benchmark: peak memory of one training step, each case in its own fresh subprocess.

    python -m bench.bench_memory [--quick] [--with-global] [--no-big]

Cases (CPU, float32, random batch of token ids, two steps; peak RSS = VmHWM, reset after the
model is built, so the figure is the step's memory *over the loaded model*; the RSS after load
is listed beside it):

- SmolLM2-135M (the real checkpoint, offline alias ``smollm2-135m``): full fine-tuning + Adam,
  and SAID d = 1,000 with the default Fastfood layout "blocks", with ``recompute`` (default: no
  copy of the weights kept through the step) and without (``--with-global``: also the old
  single-block layout "global", about 7 GiB);
- a TinyLlama-1.1B-shaped Llama (``transformers.LlamaConfig`` with TinyLlama's sizes, vocab
  32,000, random weights, nothing downloaded): SAID d = 2,000, layout "blocks" (``--no-big``
  skips it; it needs about 10 GiB free: check ``free -g`` first);
- Fastfood state bytes per parameter at the study models' D for each layout (in process).

Batch: 8 x 48 tokens (SmolLM2), 1 x 48 (TinyLlama). Targets (issue 13): SmolLM2 SAID step peak
<= 0.6x the full fine-tuning + Adam step; TinyLlama-1.1B SAID step under 14 GiB peak RSS.
``main(quick) -> str`` returns the markdown (for bench/run_all.py), also written to
``bench/results/memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine
from idlab.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory.md"
GIB = 1 << 30

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)

_CHILD = r"""
import json, sys, time, torch
from idlab.training.loop import _peak_memory, _reset_peak_rss
spec = json.loads(sys.argv[1])
torch.manual_seed(0)
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
if spec["model"] == "smollm2-135m":
    from idlab.models import load_model
    model = load_model("smollm2-135m")[0]
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.no_grad():
        model = LlamaForCausalLM(LlamaConfig(**spec["config"]))
model.train()
for m in model.modules():  # no dropout noise: same work in every case
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]))
D = sum(p.numel() for p in model.parameters())
if spec["method"] == "full":
    net = model
    params = [p for p in model.parameters()]
else:
    from idlab.subspace.hadamard import backend
    from idlab.subspace import SubspaceModel
    backend()
    net = SubspaceModel(model, dim=spec["d"], projection="fastfood", said=True, layout=spec["layout"],
                        recompute=spec.get("recompute", True))
    params = [p for p in net.parameters() if p.requires_grad]
opt = torch.optim.Adam(params, lr=1e-4)
after_load = rss()
_reset_peak_rss()
base = _peak_memory(torch.device("cpu"))
times = []
for _ in range(spec["steps"]):
    t0 = time.perf_counter()
    loss = net(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    times.append(time.perf_counter() - t0)
peak = _peak_memory(torch.device("cpu"))
state = net.projection.state_bytes() if spec["method"] != "full" else 0
print("RESULT " + json.dumps({"D": D, "after_load": after_load, "base": base, "peak": peak,
                              "times": times, "state_bytes": state, "loss": float(loss)}))
"""


def _run_case(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one case in a fresh interpreter; returns its RESULT dict, or {"error": ...}."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out: dict[str, Any] = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.perf_counter() - t0
            return out
    return {"error": (proc.stderr or proc.stdout)[-800:]}


def _study_segments() -> list[tuple[str, list[int]]]:
    """(name, projected tensor sizes) of the study models, built on the meta device (no weights)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from idlab.models import resolve_model_name

    out = []
    for name, alias in (("MiniLM-L6", "minilm-l6"), ("SmolLM2-135M", "smollm2-135m")):
        cfg = AutoConfig.from_pretrained(resolve_model_name(alias))
        with torch.device("meta"):
            m = AutoModelForSequenceClassification.from_config(cfg) if alias == "minilm-l6" else None
            if m is None:
                from transformers import AutoModelForCausalLM

                m = AutoModelForCausalLM.from_config(cfg)
        out.append((name, [p.numel() for p in m.parameters()]))
    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig(**TINYLLAMA))
    out.append(("TinyLlama-1.1B shape", [p.numel() for p in m.parameters()]))
    return out


def bench_state(d: int = 1000) -> list[str]:
    from idlab.subspace.projections import make_projection

    rows = [
        f"Fastfood state held between calls, d = {d}, every float parameter projected (tied embeddings once); "
        "'blocks' with one segment per tensor, as `SubspaceModel` builds it.",
        "",
        "| model | D | layout (fastfood_state) | state bytes | bytes / parameter |",
        "|---|---|---|---|---|",
    ]
    for name, sizes in _study_segments():
        D = sum(sizes)
        p = make_projection("fastfood", D, d, segments=sizes)
        b = p.state_bytes()
        rows.append(f"| {name} | {D:,} | blocks (none) | {b:,} | {b / D:.6f} |")
        del p
        if D < 50_000_000:  # global: 2-4 bytes per padded coordinate, drawing it ~28 (7 GiB at 2^28)
            for mode in ("all", "index"):
                g = make_projection("fastfood", D, d, layout="global", fastfood_state=mode)
                b = g.state_bytes()
                rows.append(f"| {name} | {D:,} | global ({mode}) | {b:,} | {b / D:.3f} |")
                del g
    return rows


def main(quick: bool = False, with_global: bool = False, big: bool = True) -> str:
    t_start = time.perf_counter()
    steps = 1 if quick else 2
    smol = {"model": "smollm2-135m", "batch": 8, "seq": 48, "steps": steps}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("SmolLM2-135M, full fine-tuning + Adam", {**smol, "method": "full"}),
        ("SmolLM2-135M, SAID d = 1,000, layout blocks", {**smol, "method": "said", "d": 1000, "layout": "blocks"}),
    ]
    cases.append(("SmolLM2-135M, SAID d = 1,000, layout blocks, recompute=False (autograd keeps the weights)",
                  {**smol, "method": "said", "d": 1000, "layout": "blocks", "recompute": False}))
    if with_global:
        cases.append(("SmolLM2-135M, SAID d = 1,000, layout global (old engine)",
                      {**smol, "method": "said", "d": 1000, "layout": "global"}))
    if big and not quick:
        cases.append(("TinyLlama-1.1B shape (random), SAID d = 2,000, layout blocks",
                      {"model": "tinyllama", "config": TINYLLAMA, "batch": 1, "seq": 48, "steps": 2,
                       "method": "said", "d": 2000, "layout": "blocks"}))
    rows = [
        "| case | D | RSS after load GiB | step peak over load GiB | peak RSS GiB | step s (each) | state bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    res: dict[str, dict[str, Any]] = {}
    for name, spec in cases:
        r = _run_case(spec)
        res[name] = r
        print(f"[memory] {name}: {r}", flush=True)
        if "error" in r:
            rows.append(f"| {name} | - | - | FAILED: {r['error'][-200:]!r} | - | - | - |")
            continue
        over = (r["peak"] - r["after_load"]) / GIB
        times = ", ".join(f"{t:.1f}" for t in r["times"])
        rows.append(f"| {name} | {r['D']:,} | {r['after_load'] / GIB:.2f} | {over:.2f} | {r['peak'] / GIB:.2f} "
                    f"| {times} | {r['state_bytes']:,} |")
    full, said = res.get(cases[0][0], {}), res.get(cases[1][0], {})
    summary = []
    if "peak" in full and "peak" in said:
        f_over, s_over = full["peak"] - full["after_load"], said["peak"] - said["after_load"]
        summary.append(f"SmolLM2-135M SAID / full fine-tuning + Adam: **{s_over / f_over:.2f}x** over the loaded "
                       f"model ({s_over / GIB:.2f} vs {f_over / GIB:.2f} GiB; target <= 0.6x), "
                       f"{said['peak'] / full['peak']:.2f}x in whole-process peak RSS.")
    for big_name in (n for n, _ in cases if n.startswith("TinyLlama")):
        if "peak" in res[big_name]:
            summary.append(f"{big_name}: **{res[big_name]['peak'] / GIB:.2f} GiB** peak RSS (target < 14 GiB).")
    md = [
        "## Memory of one training step (bench/bench_memory.py)",
        "",
        f"Machine: {machine()}.",
        "",
        "Each case runs in a fresh subprocess: build the model (and the wrapper), then reset the peak-RSS "
        "counter (VmHWM) and take the steps; the step peak over load is peak RSS minus RSS after load. "
        f"SmolLM2 batch 8 x 48 tokens, TinyLlama 1 x 48, {steps} step(s), causal-LM loss, Adam, float32.",
        "",
        *rows,
        "",
        *summary,
        "",
        "### Fastfood state at the study models' D",
        "",
        *bench_state(),
        "",
        f"Total bench time {time.perf_counter() - t_start:.0f} s.",
    ]
    text = "\n".join(md) + "\n"
    atomic_write_text(RESULTS, text)
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one step, SmolLM2 only")
    ap.add_argument("--with-global", action="store_true", help="also the old global layout (about 7 GiB)")
    ap.add_argument("--no-big", action="store_true", help="skip the TinyLlama-1.1B-shaped case")
    a = ap.parse_args()
    print(main(quick=a.quick, with_global=a.with_global, big=not a.no_big))
