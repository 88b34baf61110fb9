"""Help text of a config dataclass field: ``field(default=..., metadata=doc("..."))``.

Every study option carries one; ``idlab sweep --help-config`` and ``idlab schema`` print them.
"""

from __future__ import annotations


def doc(text: str) -> dict[str, str]:
    """Field metadata holding the option's help text."""
    return {"help": text}


__all__ = ["doc"]
