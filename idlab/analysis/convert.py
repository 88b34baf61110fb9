"""Turn any update into a LoRA adapter by Eckart-Young truncation (docs/SCIENCE.md section 4).

With Delta W = U S Vh (thin SVD), the best rank-r approximation in Frobenius (and spectral)
norm is U_r S_r Vh_r. As LoRA factors::

    B = U_r diag(S_r)   (d_out, r),   A = Vh_r   (r, d_in),   scale = 1   (alpha = r)

and the residual ||Delta W - B A||_F^2 = sum_{i>r} s_i^2, reported as the fraction
sum_{i>r} s_i^2 / sum_i s_i^2 of the update's energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from idlab.analysis.spectra import Update, check_update, svd
from idlab.deltas.lowrank import LowRankDelta


def to_lora(delta: Update, r: int) -> tuple[LowRankDelta, float]:
    """Best rank-r LoRA factors of an update and the energy fraction they leave out.

    Args:
        delta: dense (d_out, d_in) or `LowRankDelta` (re-truncated through its factored SVD).
        r: target rank, 1 <= r <= min(d_out, d_in). When r exceeds the update's rank the
            extra columns of B / rows of A are zero and Delta W is reproduced exactly.

    Returns:
        (LowRankDelta(B (d_out, r), A (r, d_in), scale=1.0), residual_fraction) with factors
        in the update's dtype; ``name`` and ``base_weight`` are carried over from a
        `LowRankDelta`. residual_fraction is 0.0 for an all-zero update.
    """
    d_out, d_in = check_update(delta)
    if not isinstance(r, int) or not 1 <= r <= min(d_out, d_in):
        raise ValueError(
            f"r={r!r} must be an int in [1, {min(d_out, d_in)}] = [1, min(d_out, d_in)] for an "
            f"update of shape ({d_out}, {d_in}); pass a smaller r"
        )
    dtype = delta.B.dtype if isinstance(delta, LowRankDelta) else delta.dtype
    U, S, Vh = svd(delta)
    n = int(S.numel())
    m = min(r, n)
    B = torch.zeros(d_out, r, dtype=torch.float64)
    A = torch.zeros(r, d_in, dtype=torch.float64)
    B[:, :m] = U[:, :m] * S[:m][None, :]
    A[:m] = Vh[:m]
    energy = S**2
    total = float(energy.sum())
    residual = float(energy[m:].sum()) / total if total > 0 else 0.0
    name = delta.name if isinstance(delta, LowRankDelta) else ""
    base = delta.base_weight if isinstance(delta, LowRankDelta) else None
    return LowRankDelta(B.to(dtype), A.to(dtype), 1.0, base, name), residual


def deltas_to_adapter(
    deltas: Mapping[str, Update],
    r: int,
    path: str | Path,
    base_model_name_or_path: str | None = None,
) -> dict[str, float]:
    """Truncate every update to rank r and write a PEFT adapter folder at ``path``.

    Each entry goes through `to_lora` (B = U_r S_r, A = Vh_r, alpha = r so scale = 1), then
    ``idlab.methods.lora_peft.write_adapter`` writes ``adapter_config.json`` and
    ``adapter_model.safetensors``. Keys are the base model's module names
    (``model.layers.3.self_attn.q_proj``).

    Returns:
        module name -> residual energy fraction left out by the truncation.
    """
    if not deltas:
        raise ValueError("deltas is empty; pass at least one module name -> update")
    try:
        from idlab.methods.lora_peft import write_adapter
    except ImportError as e:  # pragma: no cover - depends on idlab.methods.lora_peft being present
        raise ImportError(
            "idlab.methods.lora_peft.write_adapter is needed to write a PEFT adapter but could not be "
            f"imported ({e}); make sure idlab/lora.py is present"
        ) from e
    converted: dict[str, LowRankDelta] = {}
    residuals: dict[str, float] = {}
    for name, delta in deltas.items():
        try:
            lr, res = to_lora(delta, r)
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from e
        lr.name = name
        lr.base_weight = None
        converted[name] = lr
        residuals[name] = res
    write_adapter(converted, path, base_model_name_or_path=base_model_name_or_path)
    return residuals
