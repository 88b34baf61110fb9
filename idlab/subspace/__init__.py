"""The subspace engine: theta = theta_0 + P theta_d (+ SAID's lambda per tensor).

- `base`: the `Projection` interface every kind implements; `dense`, `sparse`, `fastfood`
  (layout "blocks", hashed and streamed per tensor) and `fastfood_global` (Li et al.'s single
  block) are the kinds; `projections.make_projection` is the one factory above them.
- `hadamard` (Walsh-Hadamard transform, kernel choice) and `_kernels` (the compiled CPU path).
- `model.SubspaceModel` wraps a model; `streamed` builds its weights just in time;
  `selection` says which tensors it projects.
"""

from idlab.subspace.base import Projection
from idlab.subspace.model import SubspaceModel
from idlab.subspace.projections import KINDS, make_projection

__all__ = ["KINDS", "Projection", "SubspaceModel", "make_projection"]
