"""THE head finder: which module of a model is its new sequence-classification head.
"""

from __future__ import annotations

from torch import Tensor, nn

CLASSIFIER_HEADS: dict[str, str] = {
    "llama": "score",
    "mistral": "score",
    "qwen2": "score",
    "gpt2": "score",
    "bert": "classifier",
    "roberta": "classifier",
    "deberta-v2": "classifier",
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", ""))


def head_module_name(model: nn.Module) -> str | None:
    """THE head finder: name of a sequence-classification head (``score``: Llama, ``classifier``: BERT), or None.

    By ``config.model_type`` (`CLASSIFIER_HEADS`) when the model has that module, else the first
    top-level ``score`` / ``classifier`` module. LoRA puts it in ``modules_to_save``; subspace
    runs with ``head: train`` train it directly.
    """
    name = CLASSIFIER_HEADS.get(_model_type(model))
    if name is not None and isinstance(getattr(model, name, None), nn.Module):
        return name
    for cand in ("score", "classifier"):
        if isinstance(getattr(model, cand, None), nn.Module):
            return cand
    return None


def classifier_head_name(model: nn.Module) -> str:
    """`head_module_name`, raising when the model has no classification head.

    Pass it as ``modules_to_save`` to `idlab.methods.lora_peft.apply_lora` so the new head trains.
    """
    name = head_module_name(model)
    if name is None:
        raise ValueError(f"classifier_head_name: cannot tell the head of model_type {_model_type(model)!r}; "
                         "it has neither a 'score' nor a 'classifier' module")
    return name


def linear_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: weight}`` of every ``nn.Linear`` (2-D weights) in ``model``: the weights whose
    Delta W a run records."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.ndim == 2}
