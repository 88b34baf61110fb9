"""Tasks: the data, loss and evaluation of a training run (see `idlab.data.base.Task`)."""

from idlab.data.base import Batch, ClassificationTask, Inputs, Task, call_model
from idlab.data.corpus import LMTask, text_corpus_task
from idlab.data.glue import glue_task, load_glue_split
from idlab.data.vision import ToyModel, ToyTask, digits_task, mnist_task

__all__ = [
    "Batch",
    "ClassificationTask",
    "Inputs",
    "LMTask",
    "Task",
    "ToyModel",
    "ToyTask",
    "call_model",
    "digits_task",
    "glue_task",
    "load_glue_split",
    "mnist_task",
    "text_corpus_task",
]
