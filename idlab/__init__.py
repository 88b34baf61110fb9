"""idlab: how many parameters does fine-tuning really need?

Intrinsic dimension (d90, random-subspace training) and LoRA rank, measured on
the same models and tasks and put on one axis. Public API (imported lazily, so
``import idlab`` stays fast):

- projections: ``make_projection``            (idlab.subspace.projections)
- subspace training: ``SubspaceModel``        (idlab.subspace)
- d90 search: ``find_d90``, ``D90Result``     (idlab.d90)
- LoRA: ``apply_lora``, ``lora_deltas``, ``save_adapter``, ``load_adapter``,
  ``count_parameters``                         (idlab.methods.lora_peft)
- ``LowRankDelta``                             (idlab.deltas.lowrank)
- models and tasks: ``load_model``, ``mnist_fc``, ``lenet``, ``Task``,
  ``ClassificationTask``                       (idlab.models, idlab.data)
- the training loop: ``train``, ``TrainConfig``, ``TrainResult`` (idlab.training.loop)
- ``analysis``: spectra, subspace similarity, amplification, intruders (idlab.analysis)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "make_projection": "idlab.subspace.projections",
    "SubspaceModel": "idlab.subspace",
    "find_d90": "idlab.d90",
    "D90Result": "idlab.d90",
    "apply_lora": "idlab.methods.lora_peft",
    "lora_deltas": "idlab.methods.lora_peft",
    "save_adapter": "idlab.methods.lora_peft",
    "load_adapter": "idlab.methods.lora_peft",
    "count_parameters": "idlab.methods.lora_peft",
    "LowRankDelta": "idlab.deltas.lowrank",
    "load_model": "idlab.models",
    "mnist_fc": "idlab.models",
    "lenet": "idlab.models",
    "Task": "idlab.data.base",
    "ClassificationTask": "idlab.data.base",
    "train": "idlab.training.loop",
    "TrainConfig": "idlab.training.loop",
    "TrainResult": "idlab.training.loop",
}

if TYPE_CHECKING:  # pragma: no cover
    from idlab import analysis as analysis
    from idlab.d90 import D90Result as D90Result
    from idlab.d90 import find_d90 as find_d90
    from idlab.data.base import ClassificationTask as ClassificationTask
    from idlab.data.base import Task as Task
    from idlab.deltas.lowrank import LowRankDelta as LowRankDelta
    from idlab.methods.lora_peft import apply_lora as apply_lora
    from idlab.methods.lora_peft import count_parameters as count_parameters
    from idlab.methods.lora_peft import load_adapter as load_adapter
    from idlab.methods.lora_peft import lora_deltas as lora_deltas
    from idlab.methods.lora_peft import save_adapter as save_adapter
    from idlab.models import lenet as lenet
    from idlab.models import load_model as load_model
    from idlab.models import mnist_fc as mnist_fc
    from idlab.subspace import SubspaceModel as SubspaceModel
    from idlab.subspace.projections import make_projection as make_projection
    from idlab.training.loop import TrainConfig as TrainConfig
    from idlab.training.loop import TrainResult as TrainResult
    from idlab.training.loop import train as train


def __getattr__(name: str) -> Any:
    if name == "analysis":
        return importlib.import_module("idlab.analysis")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'idlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_EXPORTS, "analysis", "__version__"])


__all__ = sorted([*_EXPORTS, "analysis"])
