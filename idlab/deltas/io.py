"""Delta files: one safetensors file holding every module's update (docs/CONTRACTS.md).

Layout of ``delta.safetensors``:

- low-rank entries: ``<module>.lora_A`` (r, d_in) and ``<module>.lora_B`` (d_out, r), with
  their scales in the file metadata, JSON under key ``"scales"`` ({module: scale});
- dense entries: ``<module>.delta`` (d_out, d_in);
- caller metadata (optional), JSON under key ``"metadata"``.

Module names are the base model's qualified names (``model.layers.3.self_attn.q_proj``,
``net.0``), never PEFT's ``base_model.model.`` prefix. Tensors are written contiguous, on the
CPU, in their own dtype. Writes are atomic (temporary file in the same folder + os.replace).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from idlab.atomic import atomic_file
from idlab.deltas.lowrank import LowRankDelta, Update, check_update
from idlab.jsontypes import JsonObject, JsonValue

_SUFFIXES = (".lora_A", ".lora_B", ".delta")
_PEFT_PREFIX = "base_model.model."


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"module name {name!r} must be a non-empty str")
    if name.startswith(_PEFT_PREFIX):
        raise ValueError(
            f"module name {name!r} carries PEFT's {_PEFT_PREFIX!r} prefix; strip it and use the "
            "base model's qualified module name"
        )
    if name.endswith(_SUFFIXES):
        raise ValueError(f"module name {name!r} must not end in one of {_SUFFIXES}")
    return name



def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def save_deltas(
    path: str | Path,
    deltas: Mapping[str, Update],
    metadata: Mapping[str, JsonValue] | None = None,
) -> Path:
    """Write ``deltas`` (module name -> `LowRankDelta` or dense (d_out, d_in)) to ``path``.

    ``metadata`` must be JSON-serialisable; read it back with `load_delta_metadata`.
    NaN/inf updates are refused (ValueError). Returns the path written.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    scales: dict[str, float] = {}
    for name, delta in deltas.items():
        _check_name(name)
        check_update(delta, f"delta for module {name!r}")
        if isinstance(delta, LowRankDelta):
            tensors[f"{name}.lora_A"] = _cpu(delta.A)
            tensors[f"{name}.lora_B"] = _cpu(delta.B)
            scales[name] = float(delta.scale)
        else:
            tensors[f"{name}.delta"] = _cpu(delta)
    meta = {"scales": json.dumps(scales), "format": "idlab.deltas/1"}
    if metadata is not None:
        try:
            meta["metadata"] = json.dumps(dict(metadata))
        except TypeError as e:
            raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"delta file {path} does not exist")
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta


def load_delta_metadata(path: str | Path) -> JsonObject:
    """The caller metadata stored by `save_deltas` ({} when none)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta["metadata"])) if "metadata" in meta else {}


def load_deltas(path: str | Path) -> dict[str, Update]:
    """Read a file written by `save_deltas`: module name -> `LowRankDelta` or dense Tensor.

    Low-rank entries get ``name`` set and ``scale`` from the ``"scales"`` metadata (1.0 when
    the file has none for that module). Entry order follows the file's sorted keys.
    """
    path = Path(path)
    tensors, meta = _read(path)
    scales: dict[str, float] = json.loads(meta.get("scales", "{}"))
    out: dict[str, Update] = {}
    for key in sorted(tensors):
        if key.endswith(".delta"):
            out[key[: -len(".delta")]] = tensors[key]
        elif key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            if f"{name}.lora_B" not in tensors:
                raise ValueError(
                    f"{path}: {key} has no matching {name}.lora_B; the file is incomplete"
                )
            out[name] = LowRankDelta(
                tensors[f"{name}.lora_B"], tensors[key], float(scales.get(name, 1.0)), name=name
            )
        elif key.endswith(".lora_B"):
            if key[: -len(".lora_B")] + ".lora_A" not in tensors:
                raise ValueError(f"{path}: {key} has no matching lora_A; the file is incomplete")
        else:
            raise ValueError(
                f"{path}: tensor {key!r} ends in none of {_SUFFIXES}; not a delta file written "
                "by idlab.analysis.save_deltas"
            )
    return out


def dense_of(delta: Update, dtype: torch.dtype | None = None) -> Tensor:
    """The dense (d_out, d_in) matrix of an update (forms scale * B @ A for low-rank)."""
    if isinstance(delta, LowRankDelta):
        return delta.dense(dtype)
    return delta if dtype is None else delta.to(dtype)
