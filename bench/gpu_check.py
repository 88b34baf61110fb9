"""Every pending GPU check in one command (``make gpu-check``), at most 8 minutes on one H100/H200.

    python -m bench.gpu_check [--reduced] [--out FILE] [--only NAME ...]

Each check runs in its own subprocess under its own time limit (a hang or a crash costs that check
only) and reports one markdown section; the report goes to ``bench/results/gpu-<date>.md`` (or
``--out``) and a one-line-per-check summary to stdout. Exit status 1 when a check failed or ran out
of time.

Checks (CUDA; ``--reduced``: tiny sizes on CPU, the Triton kernels interpreted, so `make test`
runs the same code and it cannot rot -- tests/test_gpu_check.py):

1. ``test-gpu``: ``pytest -m gpu`` and tests/test_triton.py on the device.
2. ``fastfood``: Fastfood forward+backward (layout "blocks", d = 1,000) at D = 2^24 and 2^28 for
   each kernel (triton, torch) against a device memcpy of D floats (min / median / max).
3. ``steps``: step time and peak memory of full fine-tuning, LoRA (r = 8, q/v) and SAID
   (d = 1,000) on SmolLM2-135M (offline alias ``smollm2-135m``), fp32 and bf16-mixed, Adam,
   batch 8 x 128.
4. ``said-llama``: SAID d = 1,000 on TinyLlama-1.1B- and Llama-2-7B-shaped models (random bf16
   weights from a transformers config), bf16-mixed, 3 steps of 4 x 128 tokens: measured peak
   against `idlab.sweep.plan.plan_memory`'s projection (what ``idlab plan`` prints).
5. ``sweep``: a two-run smoke sweep end to end on the device (``idlab sweep smoke``, subspace
   d = 30, seeds 0 and 1), result.json checked (kernel recorded), then ``idlab report``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GIB = 1 << 30

#: (name, time limit s on the GPU, time limit s reduced); the GPU limits sum to 470 s (< 8 min)
CHECKS: list[tuple[str, int, int]] = [
    ("test-gpu", 140, 60), ("fastfood", 70, 60), ("steps", 100, 60), ("said-llama", 110, 60), ("sweep", 50, 90),
]

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _emit(row: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def _ms(ts: list[float]) -> str:
    ms = [t * 1000 for t in ts]
    return f"{min(ms):.2f} / {statistics.median(ms):.2f} / {max(ms):.2f}"


def _device(reduced: bool) -> str:
    import torch

    if reduced:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --reduced (the CPU mode) or on a GPU machine")
    return "cuda"


def _timed(fn: Callable[[], object], dev: str, reps: int) -> list[float]:
    import torch

    out = []
    for _ in range(reps):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- the checks (children)


def check_test_gpu(reduced: bool) -> None:
    env = {**os.environ}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    runs = ([*args, "-m", "gpu", "tests/test_hadamard.py", "tests/test_fastfood.py"] if reduced
            else [*args, "-m", "gpu"], [*args, "tests/test_triton.py", *(["-k", "explicit"] if reduced else [])])
    for cmd in runs:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        tail = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        _emit({"command": " ".join(cmd[2:]), "rc": p.returncode, "summary": tail})
        if p.returncode not in (0, 5):  # 5: nothing collected (no gpu tests selected)
            print(p.stdout[-3000:], p.stderr[-2000:], file=sys.stderr)
            raise SystemExit(1)


def _use_kernel(name: str, reduced: bool) -> None:
    from idlab.subspace import hadamard

    if name == "triton" and reduced:
        os.environ["TRITON_INTERPRET"] = "1"
    hadamard.set_backend(name)


def check_fastfood(reduced: bool) -> None:
    import torch

    from idlab.subspace import hadamard
    from idlab.subspace.projections import make_projection

    dev = _device(reduced)
    d = 100 if reduced else 1000
    for bits in ((12, 14) if reduced else (24, 28)):
        D = 1 << bits
        src, dst = torch.randn(D, device=dev), torch.empty(D, device=dev)
        copy = _timed(lambda s=src, t=dst: t.copy_(s), dev, 5)
        del src, dst
        for kernel in ("triton", "torch"):
            try:
                _use_kernel(kernel, reduced)
                used = hadamard.backend(dev)
            except RuntimeError as e:
                _emit({"D": f"2^{bits}", "kernel": kernel, "error": str(e)[:200]})
                continue
            proj = make_projection("fastfood", D, d, seed=0, device=dev)
            theta = torch.zeros(d, device=dev, requires_grad=True)
            g = torch.randn(D, device=dev)

            def step(p: Any = proj, x: torch.Tensor = theta, gg: torch.Tensor = g) -> None:
                p(x).backward(gg)

            _timed(step, dev, 1)  # compiles the kernels
            ts = _timed(step, dev, 2 if reduced else 5)
            _emit({"D": f"2^{bits}", "kernel": used, "fwd+bwd ms": _ms(ts), "memcpy ms": _ms(copy),
                   "ratio (median)": round(statistics.median(ts) / statistics.median(copy), 1)})
            del proj, theta, g
            if dev == "cuda":
                torch.cuda.empty_cache()


def _llama(cfg: dict[str, Any], dev: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(old)


def _wrap(model: Any, method: str, d: int) -> tuple[Any, list[Any]]:
    if method == "full":
        return model, [p for p in model.parameters()]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        return net, [p for p in net.parameters() if p.requires_grad]
    from idlab.subspace import SubspaceModel

    net = SubspaceModel(model, dim=d, projection="fastfood", said=True)
    return net, [p for p in net.parameters() if p.requires_grad]


def _steps(net: Any, params: list[Any], ids: Any, precision: str, dev: str, n: int) -> tuple[list[float], int]:
    import torch

    opt = torch.optim.Adam(params, lr=1e-5)

    def step() -> None:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = net(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = _timed(step, dev, n)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    return ts, peak


def check_steps(reduced: bool) -> None:
    import torch

    from idlab.subspace import hadamard

    dev = _device(reduced)
    batch, seq, d = (2, 16, 50) if reduced else (8, 128, 1000)
    for precision in ("fp32", "bf16-mixed"):
        for method in ("full", "lora", "said"):
            torch.manual_seed(0)
            if reduced:
                model = _llama(TINY, dev, torch.float32)
            else:
                from idlab.models import load_model

                model = load_model("smollm2-135m")[0].to(dev)
            model.train()
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
            net, params = _wrap(model, method, d)
            ts, peak = _steps(net, params, ids, precision, dev, 3 if reduced else 4)
            _emit({"model": "tiny llama" if reduced else "SmolLM2-135M", "method": method, "precision": precision,
                   "kernel": hadamard.backend(dev) if method == "said" else "-",
                   "step ms (1st; then min / median / max)": f"{ts[0] * 1000:.0f}; {_ms(ts[1:])}",
                   "peak GiB": round(peak / GIB, 2) if dev == "cuda" else "n/a (CPU)"})
            del net, params, model
            if dev == "cuda":
                torch.cuda.empty_cache()


def check_said_llama(reduced: bool) -> None:
    import torch

    from idlab.methods.subspace import SubspaceAxes
    from idlab.subspace import SubspaceModel, hadamard
    from idlab.sweep.plan import plan_memory

    dev = _device(reduced)
    batch, seq, d = (2, 16, 50) if reduced else (4, 128, 1000)
    shapes = [("tiny llama", TINY)] if reduced else [("TinyLlama-1.1B shape", TINYLLAMA), ("Llama-2-7B shape", LLAMA2_7B)]
    for name, cfg in shapes:
        meta = _llama(cfg, "meta", torch.bfloat16)
        ids_meta = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        axes = SubspaceAxes(d=d, projection="fastfood", said=True, head="project", layout="blocks")
        plan = plan_memory(meta, ids_meta, ids_meta, method="subspace", axes=axes, precision="bf16-mixed",
                           device="cuda" if dev == "cuda" else "cpu", loss="causal-lm")
        del meta
        torch.manual_seed(0)
        model = _llama(cfg, dev, torch.bfloat16).train()
        net = SubspaceModel(model, dim=d, projection="fastfood", said=True)
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=dev)
        ts, peak = _steps(net, [p for p in net.parameters() if p.requires_grad], ids, "bf16-mixed", dev, 3)
        _emit({"model": name, "D": f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B",
               "kernel": hadamard.backend(dev), "step s (1st; then min / median / max)":
               f"{ts[0]:.2f}; " + " / ".join(f"{t:.2f}" for t in (min(ts[1:]), statistics.median(ts[1:]), max(ts[1:]))),
               "measured peak GiB": round(peak / GIB, 2) if dev == "cuda" else "n/a (CPU)",
               "plan peak GiB": round(plan.peak_bytes / GIB, 2),
               "measured / plan": round(peak / plan.peak_bytes, 2) if dev == "cuda" else "n/a"})
        del net, model
        if dev == "cuda":
            torch.cuda.empty_cache()


def check_sweep(reduced: bool) -> None:
    dev = _device(reduced)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="idlab-gpu-check-") as tmp:
        sweep = [sys.executable, "-m", "idlab.cli", "sweep", "smoke", f"results_dir={tmp}", f"device={dev}",
                 "methods=[subspace]", "subspace.d=[30]", "seeds=[0,1]", "train.steps=20"]
        t0 = time.perf_counter()
        p = subprocess.run(sweep, capture_output=True, text=True, cwd=REPO, env=env)
        if p.returncode != 0:
            print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"idlab sweep exited {p.returncode}")
        results = sorted(Path(tmp).rglob("result.json"))
        kernels = sorted({str(json.loads(r.read_text()).get("method_info", {}).get("kernel")) for r in results})
        _emit({"step": "idlab sweep smoke (2 runs)", "s": round(time.perf_counter() - t0, 1), "runs": len(results),
               "kernel": ", ".join(kernels)})
        if len(results) != 2:
            raise SystemExit(f"expected 2 result.json, found {len(results)}")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "idlab.cli", "report", tmp], capture_output=True, text=True,
                           cwd=REPO, env=env)
        report = next(iter(Path(tmp).rglob("REPORT.md")), None)
        _emit({"step": "idlab report", "s": round(time.perf_counter() - t0, 1), "rc": r.returncode,
               "REPORT.md": "yes" if report else "no"})
        if r.returncode != 0 or report is None:
            print(r.stdout[-2000:], r.stderr[-3000:], file=sys.stderr)
            raise SystemExit("idlab report failed")


CHILDREN: dict[str, Callable[[bool], None]] = {
    "test-gpu": check_test_gpu, "fastfood": check_fastfood, "steps": check_steps, "said-llama": check_said_llama,
    "sweep": check_sweep,
}


# ----------------------------------------------------------------------------- the parent


def _table(rows: list[dict[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def run_check(name: str, limit: int, reduced: bool) -> tuple[str, float, list[dict[str, Any]], str]:
    """(status, seconds, rows, error tail) of one check in its own subprocess under ``limit`` seconds."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--child", name, *(["--reduced"] if reduced else [])]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=limit)
        out, err, status = p.stdout, p.stderr, "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"TIMEOUT ({limit} s)"
    rows = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
    return status, time.perf_counter() - t0, rows, "" if status == "ok" else err[-1500:]


def main(reduced: bool = False, out: Path | None = None, only: list[str] | None = None) -> tuple[str, bool]:
    """Run the checks; write the markdown to ``out`` (default bench/results/gpu-<date>.md); (markdown, all ok)."""
    from bench.common import machine
    from idlab.atomic import atomic_write_text

    day = datetime.date.today().isoformat()
    out = out or RESULTS / f"gpu-{day}{'-reduced' if reduced else ''}.md"
    lines = [f"# GPU checks{' (reduced: tiny sizes on CPU)' if reduced else ''}, {day}", "",
             f"`python -m bench.gpu_check{' --reduced' if reduced else ''}` (`make gpu-check`). Machine: {machine()}.",
             "", "| check | status | seconds | limit |", "|---|---|---|---|"]
    sections: list[str] = []
    ok = True
    for name, limit_gpu, limit_red in CHECKS:
        if only and name not in only:
            continue
        limit = limit_red if reduced else limit_gpu
        status, secs, rows, err = run_check(name, limit, reduced)
        ok &= status == "ok"
        print(f"gpu-check {name}: {status} in {secs:.0f} s ({len(rows)} rows)", flush=True)
        lines.append(f"| {name} | {status} | {secs:.0f} | {limit} |")
        sections += ["", f"## {name}", "", *(_table(rows) if rows else ["(no rows)"])]
        if err:
            sections += ["", "```", err.strip(), "```"]
    md = "\n".join([*lines, *sections, ""])
    atomic_write_text(out, md)
    print(f"gpu-check: {'all ok' if ok else 'FAILURES'}; report {out}", flush=True)
    return md, ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reduced", action="store_true", help="tiny sizes on CPU (what make test runs)")
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default bench/results/gpu-<date>.md)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these checks")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        CHILDREN[a.child](a.reduced)
    else:
        sys.exit(0 if main(a.reduced, a.out, a.only)[1] else 1)
