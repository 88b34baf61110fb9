"""Benchmark of the random projections (idlab.subspace.projections) on this machine.

    python -m bench.bench_projections [--quick]

Measures, in one run, and writes markdown to bench/results/projections.md (atomically):

1. Fastfood forward+backward (d = 1000) at D = 2^20, 2^22, 2^24, layouts "blocks" (C++ and
   torch kernels) and "global", against the floor (``copy_``
   of D floats into a preallocated buffer) and against a naive pure-torch Fastfood (radix-2
   butterflies one stage at a time, materialised padding, autograd through everything --
   what common reimplementations do). min / median / max over repeats.
2. Exactness of the float32 Fastfood against a float64 reference (same B, Pi, G).
3. Persistent projection state in bytes per parameter, per kind.
4. Dense at D = 2^22, d = 1000 (quick: D = 2^18, d = 100): peak resident memory of
   construction + forward + backward in a fresh subprocess (VmHWM after a reset).

``main(quick) -> str`` returns the markdown (for bench/run_all.py).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from bench.common import machine
from idlab.atomic import atomic_write_text
from idlab.subspace.fastfood import FastfoodProjection
from idlab.subspace.projections import make_projection

RESULTS = Path(__file__).resolve().parent / "results" / "projections.md"


# ----------------------------------------------------------------------------- naive baseline


def naive_fwht(x: Tensor) -> Tensor:
    """Radix-2 Walsh-Hadamard, one butterfly stage per loop, autograd through each stage."""
    L = x.shape[-1]
    h = 1
    while h < L:
        v = x.view(-1, 2, h)  # (L / 2h, 2, h): pairs (i, i + h) inside each block of 2h
        x = torch.stack([v[:, 0] + v[:, 1], v[:, 0] - v[:, 1]], dim=1).reshape(L)
        h *= 2
    return x


class NaiveFastfood:
    """Li et al.'s Fastfood the common way: B, G float32 and Pi int64 held, full-length H twice."""

    def __init__(self, p: FastfoodProjection, dtype: torch.dtype = torch.float32) -> None:
        b_full, perm, _ = p.factors()
        self.B = b_full.to(dtype)  # (L,)
        self.Pi = perm  # (L,) int64
        self.G = p.diag_g().to(dtype)  # (L,) the same G as ours
        self.L, self.D = p.L, p.D
        self.scale = 1.0 / (float(self.G.double().norm()) * math.sqrt(p.D))

    def __call__(self, theta: Tensor) -> Tensor:
        x = torch.cat([theta, theta.new_zeros(self.L - theta.numel())])  # pad_L, materialised
        x = naive_fwht(self.B * x)
        x = naive_fwht(self.G * x[self.Pi])
        return x[: self.D] * self.scale

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.B, self.Pi, self.G))


# ----------------------------------------------------------------------------- timing helpers


def _timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fmt(ts: list[float]) -> str:
    ms = [t * 1e3 for t in ts]
    return f"{min(ms):.1f} / {statistics.median(ms):.1f} / {max(ms):.1f}"


def _fwd_bwd(fn: Callable[[Tensor], Tensor], d: int, g: Tensor) -> Callable[[], None]:
    theta = torch.zeros(d, requires_grad=True)

    def step() -> None:
        theta.grad = None
        fn(theta).backward(g)

    return step



# ----------------------------------------------------------------------------- sections


def _timeit_kernel(name: str, fn: Callable[[], object], repeats: int) -> list[float]:
    """`_timeit` with the Walsh-Hadamard kernel ``name`` forced (then back to "auto")."""
    from idlab.subspace.hadamard import set_backend

    set_backend(name)
    try:
        return _timeit(fn, repeats)
    finally:
        set_backend("auto")


def bench_fastfood_speed(quick: bool) -> tuple[list[str], dict[int, float]]:
    from idlab.subspace.hadamard import backend

    d = 1000
    sizes = [1 << 18, 1 << 20] if quick else [1 << 20, 1 << 22, 1 << 24]
    kernel = backend()
    rows = [
        f"Layout 'blocks' (default; blocks of 2^20, hashed B, Pi, G) with the C++ kernel (`backend()` = "
        f"{kernel!r}) and with the plain-torch one; layout 'global' (Li et al.'s single block, plain torch, "
        "fastfood_state 'all' / 'index' / 'none').",
        "",
        "| D | copy_ floor | blocks fwd+bwd | blocks, torch kernel | global fwd+bwd | global 'index' "
        "| global 'none' | naive fwd+bwd | blocks/copy | global/copy | naive/blocks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[int, float] = {}
    for D in sizes:
        reps = 3 if quick else (7 if D < (1 << 24) else 5)
        naive_reps = 1 if quick else (2 if D >= (1 << 22) else 3)
        g = torch.randn(D)
        buf = torch.empty(D)
        t_copy = _timeit(lambda: buf.copy_(g), reps * 3)  # noqa: B023
        blocks = make_projection("fastfood", D, d, seed=0)
        t_blocks = _timeit(_fwd_bwd(blocks, d, g), reps)
        t_btorch = _timeit_kernel("torch", _fwd_bwd(blocks, d, g), max(2, reps // 2))
        del blocks
        ours = make_projection("fastfood", D, d, seed=0, layout="global")
        assert isinstance(ours, FastfoodProjection)
        t_ours = _timeit(_fwd_bwd(ours, d, g), reps)
        idx_mode = make_projection("fastfood", D, d, seed=0, layout="global", fastfood_state="index")
        t_index = _timeit(_fwd_bwd(idx_mode, d, g), reps)
        del idx_mode
        if quick:
            nocache = "skipped (--quick)"
        else:
            lean = make_projection("fastfood", D, d, seed=0, layout="global", fastfood_state="none")
            nocache = _fmt(_timeit(_fwd_bwd(lean, d, g), 2 if D >= (1 << 22) else 3, warmup=0))
            del lean
        naive = NaiveFastfood(ours)
        t_naive = _timeit(
            _fwd_bwd(naive, d, g), naive_reps, warmup=0 if quick or D >= (1 << 22) else 1
        )
        del naive
        med = statistics.median
        r_copy = med(t_blocks) / med(t_copy)
        ratios[D] = r_copy
        rows.append(
            f"| 2^{D.bit_length() - 1} | {_fmt(t_copy)} | {_fmt(t_blocks)} | {_fmt(t_btorch)} | {_fmt(t_ours)} "
            f"| {_fmt(t_index)} | {nocache} | {_fmt(t_naive)} | {r_copy:.1f}x | {med(t_ours) / med(t_copy):.1f}x "
            f"| {med(t_naive) / med(t_blocks):.1f}x |"
        )
        del ours
    return rows, ratios


def _relative_errors(f32: Callable[[Tensor], Tensor], f64: Callable[[Tensor], Tensor], theta: Tensor,
                     gy: Tensor) -> tuple[float, float]:
    """max |f32 - f64| / max |f64| of the forward y and of the backward P^T gy (theta, gy float64)."""
    t32, t64 = theta.float().requires_grad_(), theta.clone().requires_grad_()
    y32, y64 = f32(t32), f64(t64)
    y32.backward(gy.float())
    y64.backward(gy)
    assert t32.grad is not None and t64.grad is not None
    ey = float((y32.detach().double() - y64.detach()).abs().max() / y64.detach().abs().max())
    eg = float((t32.grad.double() - t64.grad).abs().max() / t64.grad.abs().max())
    return ey, eg


def bench_exactness(quick: bool) -> list[str]:
    D, d = ((1 << 18) + 12345, 1000) if quick else ((1 << 20) + 12345, 1000)
    p = make_projection("fastfood", D, d, seed=1, layout="global")
    assert isinstance(p, FastfoodProjection)
    ref = NaiveFastfood(p, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    gy = torch.randn(D, dtype=torch.float64)
    ey, eg = _relative_errors(p, ref, theta, gy)
    # blocks: float32 (C++ kernel when built) against the same P in float64
    eby, ebg = _relative_errors(make_projection("fastfood", D, d, seed=1),
                                make_projection("fastfood", D, d, seed=1, dtype=torch.float64), theta, gy)
    return [
        f"D = {D} (L = 2^{p.L.bit_length() - 1}), d = {d}; global: float32 ours vs float64 naive reference with "
        "the same B, Pi, G; blocks: float32 vs the same blocks in float64; error = max|ours - ref| / max|ref|.",
        "",
        "| quantity | global | blocks | target |",
        "|---|---|---|---|",
        f"| forward y (D,) | {ey:.2e} | {eby:.2e} | <= 1e-5 |",
        f"| backward P^T g (d,) | {eg:.2e} | {ebg:.2e} | <= 1e-5 |",
    ]


def bench_state(quick: bool) -> list[str]:
    D, d = (1 << 18 if quick else 1 << 20), 1000
    rows = [
        f"D = 2^{D.bit_length() - 1}, d = {d}. Persistent state = buffers held between calls (fastfood's reusable "
        "scratch is listed separately).",
        "",
        "| projection | state bytes | bytes / parameter |",
        "|---|---|---|",
    ]
    ff = make_projection("fastfood", D, d, layout="global")
    assert isinstance(ff, FastfoodProjection)
    ff(torch.zeros(d, requires_grad=True)).sum().backward()
    items: list[tuple[str, int]] = [
        ("fastfood blocks (default; one float64 scale per 2^20 block)", make_projection("fastfood", D, d).state_bytes()),
        ("fastfood global (packed idx+G int32 word)", ff.state_bytes()),
        (
            "fastfood global, fastfood_state='index' (idx int16; G redrawn per call)",
            make_projection("fastfood", D, d, layout="global", fastfood_state="index").state_bytes(),
        ),
        (
            "fastfood global, fastfood_state='none'",
            make_projection("fastfood", D, d, layout="global", fastfood_state="none").state_bytes(),
        ),
        ("fastfood global scratch (keep_workspace, not state)", ff.workspace_bytes()),
        ("naive fastfood (B, G float32; Pi int64)", NaiveFastfood(ff).state_bytes()),
        (
            "dense (regenerated blocks; d column norms)",
            make_projection("dense", D, d).state_bytes(),
        ),
        ("sparse (int32 signed rows + col_ptr)", make_projection("sparse", D, d).state_bytes()),
    ]
    for name, b in items:
        rows.append(f"| {name} | {b:,} | {b / D:.3f} |")
    rows.append("| Li et al. code (3 length-L vectors, float/int64) | - | ~24 (SCIENCE.md) |")
    rows.append("| Aghajanyan et al. code (BERT-base) | - | ~34 (SCIENCE.md) |")
    rows.append("")
    rows.append("The study models' D for each layout: see the memory benchmark (bench/bench_memory.py).")
    return rows


_DENSE_CHILD = """
import sys, time, torch
from idlab.subspace.projections import make_projection
from idlab.training.loop import _peak_memory, _reset_peak_rss
D, d = int(sys.argv[1]), int(sys.argv[2])
torch.zeros(1).sum()
def hwm():  # peak RSS in KiB since the last reset (VmHWM), else the process's peak
    return _peak_memory(torch.device("cpu")) // 1024
_reset_peak_rss()  # after imports
base = hwm()
t0 = time.perf_counter()
p = make_projection("dense", D, d, seed=0)
t1 = time.perf_counter()
theta = torch.zeros(d, requires_grad=True)
y = p(theta)
t2 = time.perf_counter()
y.backward(torch.ones(D))
t3 = time.perf_counter()
peak = hwm()
print(base, peak, t1 - t0, t2 - t1, t3 - t2, p.state_bytes(), int(p.cached))
"""


def bench_dense_memory(quick: bool) -> list[str]:
    D, d = (1 << 18, 100) if quick else (1 << 22, 1000)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", _DENSE_CHILD, str(D), str(d)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    base, peak = int(out[0]) * 1024, int(out[1]) * 1024  # KiB on Linux
    t_build, t_fwd, t_bwd = (float(x) for x in out[2:5])
    mib = 1 << 20
    full = D * d * 4
    return [
        f"D = 2^{D.bit_length() - 1}, d = {d}, float32, fresh subprocess; peak RSS = VmHWM, reset "
        "after imports via /proc/self/clear_refs (ru_maxrss where unavailable).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| materialised P would need | {full / mib:,.0f} MiB |",
        f"| RSS after import torch (peak counter reset) | {base / mib:,.0f} MiB |",
        f"| peak RSS after build + forward + backward | {peak / mib:,.0f} MiB |",
        f"| increase (projection's peak working memory) | {(peak - base) / mib:,.0f} MiB |",
        f"| state held (d column norms) | {int(out[5]):,} bytes |",
        f"| time: build (norm pass) / forward / backward | {t_build:.1f} s / {t_fwd:.1f} s / {t_bwd:.1f} s |",
    ]


def main(quick: bool = False) -> str:
    """Run every section and return the markdown report."""
    t0 = time.perf_counter()
    speed, _ = bench_fastfood_speed(quick)
    parts = [
        "# Projection benchmark" + (" (--quick)" if quick else ""),
        "",
        f"Machine: {machine()}.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Times in ms as min / median / max "
        "over repeats; ratios use medians. The machine may be shared: compare ratios from one run.",
        "",
        "## Fastfood forward + backward, d = 1000",
        "",
        "blocks = `make_projection('fastfood', D, 1000)` (the default layout); global = "
        "`make_projection('fastfood', D, 1000, layout='global')` (packed state, reused scratch); naive = radix-2 "
        "butterflies per stage over the global layout's B, Pi, G, materialised padding, autograd through "
        "everything (this file). Target at 2^24 (issue 13): blocks/copy <= 20x.",
        "",
        *speed,
        "",
        "## Exactness",
        "",
        *bench_exactness(quick),
        "",
        "## Persistent state",
        "",
        *bench_state(quick),
        "",
        "## Dense projection memory (regenerated row blocks)",
        "",
        *bench_dense_memory(quick),
        "",
        f"Total bench time {time.perf_counter() - t0:.0f} s.",
        "",
    ]
    md = "\n".join(parts)
    atomic_write_text(RESULTS, md)
    return md



if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats (under a minute)"
    )
    args = ap.parse_args()
    md = main(args.quick)
    print(md)
    print(f"wrote {RESULTS}")
