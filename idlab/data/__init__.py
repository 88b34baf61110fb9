"""Tasks: the data, loss and evaluation of a training run (see `idlab.data.base.Task`)."""

from idlab.data.base import Batch, ClassificationTask, Inputs, Task, call_model
from idlab.data.text import LMTask, glue_task, load_glue_split, text_corpus_task

__all__ = [
    "Batch",
    "ClassificationTask",
    "Inputs",
    "LMTask",
    "Task",
    "call_model",
    "glue_task",
    "load_glue_split",
    "text_corpus_task",
]
