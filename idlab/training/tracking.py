"""Experiment tracking (``train.log_to``): each run's loss, learning rate, evaluation metrics,
throughput and memory streamed to TensorBoard, Weights & Biases and/or Trackio, through each
library's own API, named by study and run id.

One class per backend behind one interface (`Tracker`: ``log(values, step)``, ``close()``);
`open_trackers` opens the ones a run asks for. A backend whose package is missing is a
ConfigError naming ``pip install idlab[tracking]`` (`check_backends`, called when the study's
train block is read: before any run starts). Only rank 0 of a distributed run logs.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from idlab.errors import ConfigError

Backend = Literal["tensorboard", "wandb", "trackio"]
BACKENDS: tuple[str, ...] = ("tensorboard", "wandb", "trackio")


def check_backends(names: Sequence[str]) -> None:
    """Every backend in ``names`` is known and its package importable; else ConfigError naming the fix."""
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"train.log_to: got {name!r}; allowed: {', '.join(BACKENDS)}")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.log_to: {name!r} needs the package {name!r}, which is not installed; "
                              f"run `pip install idlab[tracking]` (or `pip install {name}`)")


@dataclass(frozen=True)
class TrackSpec:
    """What the loop streams to (`open_trackers`).

    Attributes:
        backends: ``train.log_to``.
        study: the study name (project / experiment).
        run_id: the run's name.
        folder: where file-based backends write (TensorBoard: ``<folder>/<run_id>/``).
        config: the run's config, recorded where a backend keeps one.
    """

    backends: tuple[str, ...]
    study: str
    run_id: str
    folder: Path
    config: Mapping[str, object] = field(default_factory=dict)


class Tracker(ABC):
    """One tracking backend (opened on a `TrackSpec`)."""

    def __init__(self, spec: TrackSpec | None = None) -> None:
        self.spec = spec

    @abstractmethod
    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record scalar ``values`` at optimizer step ``step``."""

    @abstractmethod
    def close(self) -> None:
        """Flush and finish."""


class TensorBoardTracker(Tracker):
    """`torch.utils.tensorboard.SummaryWriter` into ``<folder>/<run_id>/`` (one scalar per key)."""

    def __init__(self, spec: TrackSpec) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(spec.folder / spec.run_id))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """``wandb.init(project=<study>, name=<run id>)``, ``run.log(values, step=step)``."""

    def __init__(self, spec: TrackSpec) -> None:
        import wandb

        self.run = wandb.init(project=spec.study, name=spec.run_id, id=spec.run_id, resume="allow",
                              config=dict(spec.config), dir=str(spec.folder))

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    """``trackio.init(project=<study>, name=<run id>)``, ``trackio.log(values, step=step)``."""

    def __init__(self, spec: TrackSpec) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=spec.study, name=spec.run_id, config=dict(spec.config))

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.trackio.log(dict(values), step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "trackio": TrackioTracker}


class Trackers(Tracker):
    """Every tracker a run asked for (none: a no-op)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        super().__init__()
        self.trackers = list(trackers)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(values, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(spec: TrackSpec | None, rank: int = 0) -> Trackers:
    """The trackers of ``spec`` (rank 0 only; an empty `Trackers` elsewhere or without a spec)."""
    if spec is None or rank != 0 or not spec.backends:
        return Trackers()
    check_backends(spec.backends)
    return Trackers([_CLASSES[b](spec) for b in spec.backends])


__all__ = ["BACKENDS", "Backend", "TensorBoardTracker", "TrackSpec", "Tracker", "Trackers", "TrackioTracker",
           "WandbTracker", "check_backends", "open_trackers"]
