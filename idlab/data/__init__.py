"""Tasks: the data, loss and evaluation of a training run (see `idlab.data.base.Task`)."""

from idlab.data.base import Batch, ClassificationTask, Inputs, Task, call_model

__all__ = ["Batch", "ClassificationTask", "Inputs", "Task", "call_model"]
