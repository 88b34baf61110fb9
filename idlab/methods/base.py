"""The method interface: everything idlab knows about one fine-tuning method lives behind it.

A method (`Method`) owns

- its study block (``settings_type``, a frozen dataclass: the YAML block of the method's name,
  e.g. ``lora: {r: [1, 4], target_modules: [qv]}``) and the value checks on it (`Method.check`;
  `Method.check_model`: against the study's model, built once on the meta device);
- its grid cells (`Method.cells`: one `Axes` per point of its axes; the sweep adds learning
  rates and seeds), and how many sweep stages its grid needs (`Method.stages`);
- its run axes (``axes_type``: the frozen dataclass a `idlab.config.run.RunConfig` carries,
  serialised into the run id by `Axes.to_dict`);
- how it wraps a model to train (`Method.prepare` -> `Prepared`: the model with
  ``requires_grad`` on what trains, how its Delta W is read out, which files it saves);
- its terms in ``idlab plan`` (`Method.plan_model`, `Method.plan_terms`);
- its label and style in the report (`Axes.variant`, `Method.style`), and the crossing read on
  its size axis (``size_key`` and ``quantity``: d -> d90, r -> r90).

The sweep, the plan, the report and the analysis ask the registry (`idlab.methods.get`) and
never name a method. The trainable-parameter count is the training loop's (every entry the
optimiser updates), so a method gets it right by setting ``requires_grad``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from idlab.d90 import Crossing
from idlab.deltas import LowRankDelta
from idlab.jsontypes import JsonObject

#: Delta W of one module: dense (d_out, d_in), or low-rank factors
Delta = Tensor | LowRankDelta
#: ``{lr: {seed: score}}`` of one grid cell (a diverged or unscored run scores NaN)
CellScores = dict[float, dict[int, float]]


@dataclass(frozen=True)
class Axes:
    """The point of a method's axes that one run trains at (none for full fine-tuning).

    Subclasses are frozen dataclasses; `to_dict` gives the keys that enter the run id
    (`idlab.runs.run_id`) and `from_dict` reads them back from a stored config.
    """

    def to_dict(self) -> JsonObject:
        """The run-id keys of these axes (JSON values)."""
        return {}

    @classmethod
    def from_dict(cls, cfg: Mapping[str, object]) -> Axes:
        """The axes stored in a run config (``result.json["config"]``)."""
        return cls()

    def label(self) -> str:
        """A short label of the point, e.g. ``r=4 qv`` (empty when there are no axes)."""
        return ""

    def variant(self) -> str:
        """The curve this run belongs to in the report (its axes other than the size axis)."""
        raise NotImplementedError

    def size(self) -> int | None:
        """The value on the method's size axis (``Method.size_key``), or None."""
        return None


@dataclass
class Prepared:
    """A model ready for `idlab.training.train` plus what to read out of it afterwards.

    Attributes:
        model: the module to train (``requires_grad`` set on what trains).
        info: recorded as ``result.json["method_info"]`` (head handling, layout, kernel, ...).
        extract: Delta W per module name after training (`Delta`).
        save: writes the method's own files into a run folder (adapter, theta_d, ...).
        load: the inverse of ``save``: reads a finished run's folder back into ``model`` (the trained
            state, on a model prepared with the run's axes and seed); `idlab.sweep.restore`.
        merged: the trained model as a plain module of the base model's class (adapters merged,
            theta_0 + P theta_d written into the weights), for code that wants the bare model.
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    extract: Callable[[], Mapping[str, Delta]] = field(default=lambda: {})
    save: Callable[[Path], None] = field(default=lambda p: None)
    load: Callable[[Path], None] | None = None
    merged: Callable[[], nn.Module] | None = None

    def deltas(self) -> dict[str, Delta]:
        """Delta W per module name, float32 on the CPU."""
        out: dict[str, Delta] = {}
        for k, v in self.extract().items():
            out[k] = (v.detach().cpu().float() if isinstance(v, Tensor)
                      else v.to(dtype=torch.float32, device="cpu"))
        return out


@dataclass(frozen=True)
class PlanTerms:
    """What a method adds to ``idlab plan``'s memory model (`idlab.sweep.plan.plan_memory`).

    Attributes:
        extra_trainable: trained entries that are not parameters of the planned model (theta_d).
        extra_trainable_bytes: their bytes (float32: 4 each).
        method_bytes: device bytes of the method's own machinery (the subspace offset, ...).
        host_copies: host bytes a run keeps beside the model (W_0 for Delta W, Delta W in float32).
    """

    extra_trainable: int = 0
    extra_trainable_bytes: int = 0
    method_bytes: int = 0
    host_copies: int = 0


@dataclass(frozen=True)
class Style:
    """How the method's curves look in the report's figures."""

    marker: str = "o"
    size: float = 5.0


@dataclass(frozen=True)
class GridContext:
    """What a method's grid may read back from a study's stored runs (refinement stages).

    Attributes:
        target: the d90 / r90 target score (threshold x baseline), None until it is known.
        scores: ``scores(axes, lrs)`` -> `CellScores` of one cell once every run of it is stored,
            else None.
    """

    target: Callable[[], float | None]
    scores: Callable[[Axes, Sequence[float]], CellScores | None]


S = TypeVar("S")
A = TypeVar("A", bound=Axes)


class Method(ABC, Generic[S, A]):
    """One fine-tuning method (see the module docstring). Register an instance in `idlab.methods`."""

    #: the name in a study's ``methods`` list, in ``result.json["config"]["method"]`` and the YAML block
    name: ClassVar[str]
    #: the study block (frozen dataclass; every field has a default)
    settings_type: ClassVar[type]
    #: the axes of one run (an `Axes` subclass)
    axes_type: ClassVar[type[Axes]] = Axes
    #: one line of help (``idlab sweep --help-config``)
    help: ClassVar[str] = ""
    #: how the report names the method in labels ("LoRA", "full FT")
    title: ClassVar[str] = ""
    #: the column of the size axis a crossing is read on ("d", "r"), None: no curve of its own
    size_key: ClassVar[str | None] = None
    #: what the crossing on the size axis is called (d90, r90)
    quantity: ClassVar[str | None] = None
    #: the size is the trainable count itself (d; plus a directly trained head): the report marks the
    #: crossing at size + head on the parameter axis, and reads it in parameters, not grid points
    size_counts_parameters: ClassVar[bool] = False
    #: the reference of the d90 / r90 target (full fine-tuning)
    baseline: ClassVar[bool] = False
    #: it trains the model's own weights, so FSDP2 can shard them (``train.distributed: auto`` picks fsdp2
    #: on several processes; fsdp2 on a method that is not shardable is refused)
    shardable: ClassVar[bool] = False
    style: ClassVar[Style] = Style()
    #: in a study's ``methods`` when the study names none (False: its block has nothing to run by default)
    listed_by_default: ClassVar[bool] = True
    #: modules a run of this method loads beyond torch / transformers / idlab (``idlab plan``'s runtime term)
    runtime_imports: ClassVar[tuple[str, ...]] = ()
    #: old study keys of this block -> the message naming the new key
    renamed: ClassVar[dict[str, str]] = {}

    def default_settings(self) -> S:
        """The block with every default (a study that lists the method without its block)."""
        settings: S = self.settings_type()
        return settings

    def check(self, settings: S, where: str) -> None:
        """Value checks beyond the types (raise `idlab.errors.ConfigError` naming key and fix)."""

    def check_model(self, settings: S, model: nn.Module, where: str) -> None:
        """Checks of the block against the study's base model (default: none), before any run starts.

        ``model`` is built once per study on the ``meta`` device (shapes, no weights; the model every
        run of the study starts from, classification head included); do not change it. Raise
        `idlab.errors.ConfigError` naming the key, the value and the fix (a d above the model's
        parameter count, a target module the model does not have).
        """

    def learning_rates(self, settings: S) -> tuple[float, ...]:
        """The learning rates searched per cell (``<method>.lr``)."""
        lrs: tuple[float, ...] = getattr(settings, "lr")  # noqa: B009 - every block has lr
        return lrs

    def learning_rates_for(self, settings: S, axes: A) -> tuple[float, ...]:
        """The learning rates searched at one cell (default: the block's `learning_rates`; a method whose
        cells carry their own, e.g. one list per PEFT method, overrides it)."""
        return self.learning_rates(settings)

    @abstractmethod
    def cells(self, settings: S, ctx: GridContext | None = None) -> list[A]:
        """The grid points of one study, in order; ``ctx`` gives stored results for refinement."""

    def stages(self, settings: S) -> int:
        """How many times the sweep expands the grid (refinement stages need earlier results)."""
        return 1

    def describe(self, settings: S, cells: Sequence[A]) -> str:
        """The axes in one line of the sweep's plan table."""
        return f"lr {list(self.learning_rates(settings))}"

    @abstractmethod
    def prepare(self, model: nn.Module, axes: A, seed: int) -> Prepared:
        """Turn a base model into the model to train (seeded by ``seed`` where it draws)."""

    def warm_up(self, axes: A) -> None:
        """One-time work a run at ``axes`` needs (compiling a kernel, ...), done before the run's clock
        starts so that it does not count in its ``wall_time_s``; default none. May raise: the run
        then fails in `prepare` as it would have."""

    def claims(self, found: Mapping[str, Crossing]) -> list[str]:
        """Markdown lines testing published claims about this method's crossings on one study (``found``:
        variant -> its `idlab.d90.Crossing`, e.g. "SAID fastfood" -> d90); default none."""
        return []

    def plan_model(self, model: nn.Module, axes: A, seed: int) -> nn.Module:
        """The model ``idlab plan`` measures on the meta device (default: the model, all floats trainable)."""
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
        return model

    def plan_terms(self, model: nn.Module, axes: A, precision: str,
                   loaded: Mapping[int, torch.dtype]) -> PlanTerms:
        """The method's memory terms, after the activation probe (``loaded``: dtype by id(parameter)).

        May change ``requires_grad`` (a subspace run trains theta_d, not the weights it builds).
        """
        return PlanTerms()


def settings_fields(settings_type: type) -> list[dataclasses.Field[object]]:
    """The fields of a settings dataclass."""
    return list(dataclasses.fields(settings_type))


__all__ = ["Axes", "CellScores", "Delta", "GridContext", "Method", "PlanTerms", "Prepared", "Style",
           "settings_fields"]
