"""Delta W: the low-rank update (`LowRankDelta`) and its file format (`save_deltas` / `load_deltas`).

This is the contract between the methods (which write a run's Delta W) and the analysis
(which reads it); both import it, it imports neither.
"""

from idlab.deltas.io import Update, dense_of, load_delta_metadata, load_deltas, save_deltas
from idlab.deltas.lowrank import LowRankDelta

__all__ = ["LowRankDelta", "Update", "dense_of", "load_delta_metadata", "load_deltas", "save_deltas"]
