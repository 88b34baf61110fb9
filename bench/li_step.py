"""Time of one training step of Li et al.'s MNIST networks under a dense and a Fastfood projection
(layout "global", as `experiments/li2018.py` builds them): the cost behind the converged searches.

    OMP_NUM_THREADS=1 python -m bench.li_step --model fc --d 700

A step is forward, backward and Adam on a batch of 128 random images; the median of ``--steps``
steps after ``--warmup`` is printed per projection, with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.li2018 import MODELS
from idlab.subspace import SubspaceModel


def step_ms(model_name: str, kind: str, d: int, steps: int, warmup: int) -> float:
    """Median milliseconds of one Adam step of ``model_name`` in a ``kind`` subspace of dimension ``d``."""
    torch.manual_seed(0)
    opts = {"dense_cache_limit": 1 << 31} if kind == "dense" else {}
    m = SubspaceModel(MODELS[model_name](), dim=d, projection=kind, seed=0, projection_options=opts,
                      layout="global")
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-3)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))  # (B, 1, 28, 28), (B,)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="fc")
    ap.add_argument("--d", type=int, default=700)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    ms = {k: step_ms(a.model, k, a.d, a.steps, a.warmup) for k in ("dense", "fastfood")}
    print(f"{a.model} d={a.d}: dense {ms['dense']:.1f} ms/step, fastfood {ms['fastfood']:.1f} ms/step, "
          f"dense / fastfood {ms['dense'] / ms['fastfood']:.1f}x")


if __name__ == "__main__":
    main()
