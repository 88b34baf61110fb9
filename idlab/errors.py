"""The error type every configuration check raises (a leaf module: anything may import it)."""

from __future__ import annotations

__all__ = ["ConfigError", "NotWritableError"]


class ConfigError(ValueError):
    """An invalid study file, override or study; the message names the key, the value and the fix."""


class NotWritableError(ConfigError):
    """A folder idlab must write into is not writable; the message names the path and the fix."""
