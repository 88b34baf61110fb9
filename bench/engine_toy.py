"""Engine before/after check on Li et al.'s toy (intrinsic dimension exactly 10), both Fastfood layouts.

    python -m bench.engine_toy

Exact subspace least squares over d (find_d90, seeds 0-2) and LBFGS training at d = 9, 10, 11.
"""

from __future__ import annotations

import time

import torch

from idlab.d90 import find_d90
from idlab.data.vision import ToyModel, ToyTask, toy_subspace_min_loss
from idlab.subspace import SubspaceModel
from idlab.subspace.projections import make_projection


def _d90(layout: str, theta0: torch.Tensor) -> str:
    def solved(d: int, seed: int) -> float:
        p = make_projection("fastfood", 1000, d, seed=seed, layout=layout)
        return float(toy_subspace_min_loss(p, theta0, d) < 1e-12)

    res = find_d90(solved, baseline=1.0, threshold=1.0, seeds=(0, 1, 2), d_min=1, d_max=1000)
    return f"toy exact least squares, fastfood {layout}: d90 = {res.d90}, interpolated {res.d90_interp}"


def _lbfgs(layout: str, d: int, task: ToyTask) -> str:
    x, y = task.train_batch(torch.zeros(1, dtype=torch.long))
    sm = SubspaceModel(ToyModel(seed=0), dim=d, projection="fastfood", seed=0, layout=layout)
    opt = torch.optim.LBFGS([sm.theta_d], lr=1, max_iter=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss(sm, (x, y))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    ev = task.evaluate(sm)
    return f"toy LBFGS fastfood {layout} d={d}: loss {ev['loss']:.3g} solved {ev['solved']}"


def main() -> None:
    t0 = time.time()
    theta0 = ToyModel(seed=0).theta.detach()
    task = ToyTask()
    for layout in ("global", "blocks"):
        print(_d90(layout, theta0))
    for layout in ("global", "blocks"):
        for d in (9, 10, 11):
            print(_lbfgs(layout, d, task))
    print(f"took {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
