"""THE registry of fine-tuning methods: name -> `idlab.methods.base.Method`.

Everything that needs to know about a method asks here (`get`, `names`, `baseline_method`,
`axes_from_config`, `variant`); nothing outside `idlab/methods/` names one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idlab.methods.base import A, Axes, Method, S

_REGISTRY: dict[str, Method[Any, Any]] = {}


def register(method: Method[S, A], replace: bool = False) -> Method[S, A]:
    """Add ``method`` under ``method.name`` (a second method of one name is an error unless ``replace``)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered "
                         f"({type(_REGISTRY[method.name]).__name__}); pick another name")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register their own)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method[Any, Any]:
    """The method called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(_REGISTRY)}") from None


def baseline_method() -> Method[Any, Any]:
    """The method whose runs are the reference of every crossing (full fine-tuning)."""
    for m in _REGISTRY.values():
        if m.baseline:
            return m
    raise LookupError("no registered method is marked baseline=True")


def axes_from_config(cfg: Mapping[str, object]) -> Axes:
    """The axes of a stored run config (``result.json["config"]``)."""
    return get(str(cfg["method"])).axes_type.from_dict(cfg)


def variant(cfg: Mapping[str, object]) -> str:
    """The report's curve label of a stored run config (its method's `Axes.variant`)."""
    try:
        return axes_from_config(cfg).variant()
    except (KeyError, ValueError, TypeError):
        return str(cfg.get("method"))


__all__ = ["axes_from_config", "baseline_method", "get", "names", "register", "unregister", "variant"]
