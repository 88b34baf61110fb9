"""Models: Li et al.'s networks (`li`), Hugging Face models by name or offline alias (`hub`), the
classification-head finder (`heads`) and tiny random models for tests (`tiny`)."""

from idlab.models.heads import (
    CLASSIFIER_HEADS,
    classifier_head_name,
    head_module_name,
    linear_weights,
)
from idlab.models.hub import (
    OFFLINE_ALIASES,
    ModelTask,
    idlab_cache_dir,
    load_model,
    minilm_dir,
    resolve_model_name,
    smollm2_dir,
    smollm2_gguf_path,
)
from idlab.models.li import MLP, LeNet, lenet, mnist_fc, num_parameters
from idlab.models.tiny import tiny_bert, tiny_llama

__all__ = [
    "CLASSIFIER_HEADS",
    "MLP",
    "OFFLINE_ALIASES",
    "LeNet",
    "ModelTask",
    "classifier_head_name",
    "head_module_name",
    "idlab_cache_dir",
    "lenet",
    "linear_weights",
    "load_model",
    "minilm_dir",
    "mnist_fc",
    "num_parameters",
    "resolve_model_name",
    "smollm2_dir",
    "smollm2_gguf_path",
    "tiny_bert",
    "tiny_llama",
]
