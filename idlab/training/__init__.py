"""Training: the one loop every method trains through (`loop`: `train`, `TrainConfig`,
`TrainResult`), devices and precision (`devices`), the convergence rule (`convergence`)."""

from idlab.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
