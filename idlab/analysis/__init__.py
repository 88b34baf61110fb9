"""idlab.analysis: what fine-tuning updates look like.

Every function takes a `LowRankDelta` (Delta W = scale * B @ A, never formed densely when
avoidable) or a dense update Tensor (d_out, d_in) and computes in float64.

- spectra:    ``svd``, ``singular_values``, ``energy_rank``, ``effective_rank``,
              ``stable_rank``, ``nuclear_frobenius_ratio``, ``spectrum_summary``
- similarity: ``subspace_similarity`` (Hu et al. phi map), ``subspace_of``,
              ``random_baseline``, ``random_baseline_map``, ``sampled_random_baseline``
- alignment:  ``weight_alignment`` -> ``AlignmentResult`` (amplification factor)
- intruders:  ``intruder_dimensions`` -> ``IntruderResult``
- convert:    ``to_lora`` (Eckart-Young), ``deltas_to_adapter`` (PEFT folder)
- io:         ``save_deltas``, ``load_deltas``, ``load_delta_metadata``
- export:     ``analyze_runs`` (Parquet tables; rows in ``rows``, run folders in ``runinfo``,
              the report's use in ``pipeline``; command line: ``idlab analyze``)
"""

from __future__ import annotations

from idlab.analysis.alignment import AlignmentResult, weight_alignment, weight_singular_values
from idlab.analysis.convert import deltas_to_adapter, to_lora
from idlab.analysis.export import analyze_runs, parse_layer
from idlab.analysis.intruders import IntruderResult, intruder_dimensions, left_singular_basis
from idlab.analysis.similarity import (
    random_baseline,
    random_baseline_map,
    sampled_random_baseline,
    subspace_of,
    subspace_similarity,
)
from idlab.analysis.spectra import (
    SpectrumSummary,
    Svd,
    Update,
    check_update,
    effective_rank,
    energy_cumulative,
    energy_rank,
    factored_svd,
    nuclear_frobenius_ratio,
    num_singular_values,
    singular_values,
    spectrum_summary,
    stable_rank,
    svd,
)
from idlab.deltas.io import load_delta_metadata, load_deltas, save_deltas

__all__ = [
    "AlignmentResult",
    "IntruderResult",
    "SpectrumSummary",
    "Svd",
    "Update",
    "analyze_runs",
    "check_update",
    "deltas_to_adapter",
    "effective_rank",
    "energy_cumulative",
    "energy_rank",
    "factored_svd",
    "intruder_dimensions",
    "left_singular_basis",
    "load_delta_metadata",
    "load_deltas",
    "nuclear_frobenius_ratio",
    "num_singular_values",
    "parse_layer",
    "random_baseline",
    "random_baseline_map",
    "sampled_random_baseline",
    "save_deltas",
    "singular_values",
    "spectrum_summary",
    "stable_rank",
    "subspace_of",
    "subspace_similarity",
    "svd",
    "to_lora",
    "weight_alignment",
    "weight_singular_values",
]
