"""Engine before/after check on Li et al.'s MNIST FC: the same training at d = 750 (the paper's
d90) with the Fastfood layouts "global" (Li's single block) and "blocks" (the new default).

    python -m bench.engine_li [--seeds 0 1 2] [--epochs 1]

Settings as `experiments/li2018.py` (Adam lr 1e-3, betas (0.9, 0.99), batch 128, L2 1e-5 on
theta_D, validation accuracy on the 10k MNIST validation images).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from idlab.data.vision import mnist_task
from idlab.models import mnist_fc
from idlab.subspace import SubspaceModel
from idlab.training.loop import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=750)
    a = ap.parse_args()
    task = mnist_task()
    for layout in ("global", "blocks"):
        accs = []
        for seed in a.seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            sm = SubspaceModel(mnist_fc(), dim=a.d, projection="fastfood", seed=seed, layout=layout)
            cfg = TrainConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), batch_size=128, epochs=a.epochs,
                              seed=seed, device="cpu", progress=False, eval_batch_size=1000)
            res = train(sm, task, cfg, extra_loss=sm.penalty(1e-5))
            accs.append(res.metrics["accuracy"])
            print(f"{layout} d={a.d} seed={seed}: val acc {accs[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"{layout}: mean {statistics.mean(accs):.4f} sd {sd:.4f} over seeds {a.seeds}", flush=True)


if __name__ == "__main__":
    main()
