"""Which tensors a `idlab.subspace.SubspaceModel` projects (include / exclude globs, tied aliases)
and which of the wrapped model's tensors its state_dict keeps (`drop_frozen_from_state`).

A pattern matches a parameter when it matches its qualified name or one of its module prefixes
(``encoder.*`` matches ``encoder.layer.0.weight``); tied tensors (Hugging Face tied embeddings)
form one group, projected once, named by their first name.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

__all__ = ["Slot", "as_patterns", "drop_frozen_from_state", "forgive_frozen_missing", "select_tensors"]

Group = tuple[list[str], nn.Parameter]  # (names of one tensor, first first; the tensor)


@dataclass(frozen=True)
class Slot:
    """One projected tensor: its name, aliases (tied names), shape and slice of the offset."""

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    start: int
    numel: int


def as_patterns(patterns: str | Iterable[str] | None, arg: str) -> tuple[str, ...] | None:
    """One glob or a list of them as a tuple (None stays None); TypeError names ``arg`` otherwise."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    out = tuple(patterns)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"SubspaceModel: {arg} must be a glob string or a list of them, got {patterns!r}")
    return out


def _candidates(name: str) -> list[str]:
    """``a.b.weight`` -> [``a.b.weight``, ``a.b``, ``a``]: the name and its module prefixes."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _matches(names: Sequence[str], pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(c, pattern) for n in names for c in _candidates(n))


def select_tensors(model: nn.Module, include: tuple[str, ...] | None,
                   exclude: tuple[str, ...] | None) -> tuple[list[Group], list[Group]]:
    """(every float tensor group, the groups to project), in the model's parameter order.

    Raises ValueError naming the fix when the model has no float parameters, ``include`` matches
    nothing, or include / exclude leave nothing; warns for a pattern that matches nothing.
    """
    # Group aliases of tied tensors: id(tensor) -> names, first name first.
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    floats = [(names, p) for p, names in groups.values() if p.is_floating_point()]
    if not floats:
        raise ValueError(
            f"SubspaceModel: {type(model).__name__} has no floating-point parameters to project "
            f"({len(groups)} parameter tensors in all); wrap a model with float weights"
        )
    all_names = [n for names, _ in floats for n in names]
    if include is not None:
        selected = [(n, p) for n, p in floats if any(_matches(n, pat) for pat in include)]
        if not selected:
            raise ValueError(
                f"SubspaceModel: include={list(include)} matches no float parameter; "
                f"names look like {all_names[:8]} ({len(all_names)} in all)"
            )
        for pat in include:
            if not any(_matches(n, pat) for n, _ in floats):
                warnings.warn(f"SubspaceModel: include pattern {pat!r} matches nothing", stacklevel=3)
    else:
        selected = list(floats)
    if exclude is not None:
        for pat in exclude:
            if not any(_matches(n, pat) for n, _ in floats):
                warnings.warn(f"SubspaceModel: exclude pattern {pat!r} matches nothing", stacklevel=3)
        selected = [(n, p) for n, p in selected if not any(_matches(n, pat) for pat in exclude)]
    if not selected:
        raise ValueError(
            f"SubspaceModel: include={include} / exclude={exclude} leave no tensor to "
            f"project; names look like {all_names[:8]}"
        )

    return floats, selected


def _wrapped(module: nn.Module) -> nn.Module:
    inner = module.model
    assert isinstance(inner, nn.Module)
    return inner


def _frozen_prefixes(module: nn.Module) -> tuple[set[str], str]:
    keep = {f"model.{n}" for n, p in _wrapped(module).named_parameters(remove_duplicate=False) if p.requires_grad}
    return keep, "projection."


def drop_frozen_from_state(module: nn.Module, state_dict: dict[str, object], prefix: str,
                           local_metadata: Mapping[str, object]) -> None:
    """state_dict keeps theta_d, lambdas, extra state, buffers and directly trained tensors.

    theta_0 (frozen model parameters) and the projection (regenerated from the seed)
    are dropped: a fresh wrap of the same base model restores the exact model.
    """
    keep, proj = _frozen_prefixes(module)
    frozen = {f"model.{n}" for n, _ in _wrapped(module).named_parameters(remove_duplicate=False)} - keep
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        local = key[len(prefix) :]
        if local.startswith(proj) or local in frozen:
            del state_dict[key]


class IncompatibleKeys(Protocol):
    """What `forgive_frozen_missing` edits of ``load_state_dict``'s result (torch's ``_IncompatibleKeys``)."""

    @property
    def missing_keys(self) -> list[str]: ...


def forgive_frozen_missing(module: nn.Module, incompatible: IncompatibleKeys) -> None:
    """Missing theta_0 / projection keys are expected (see `drop_frozen_from_state`).

    The hook sees the whole load's keys (with any outer prefix), so keys are
    matched on their suffix after a ``.`` boundary.
    """
    keep, proj = _frozen_prefixes(module)
    frozen = {f"model.{n}" for n, _ in _wrapped(module).named_parameters(remove_duplicate=False)} - keep

    def expected(key: str) -> bool:
        parts = key.split(".")
        for k in range(len(parts)):
            local = ".".join(parts[k:])
            if local in frozen or local.startswith(proj):
                return True
        return False

    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not expected(k)]
