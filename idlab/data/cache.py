"""Tokenised data cached on disk by content hash (`cached_tensors`, `tokenizer_fingerprint`).

A tokenised set depends on the raw text, the tokenizer (its vocabulary, merges, normaliser and
chat template) and the options that shape it (lengths, template, packing). `cached_tensors` hashes
all of them (sha256 of a canonical JSON) and keeps the tensors under
``$IDLAB_CACHE/data/<what>-<hash>.pt`` (``~/.cache/idlab`` without ``$IDLAB_CACHE``, the root
`idlab.models.idlab_cache_dir` uses), written atomically, so a second run with the same content
loads in milliseconds and any change of content, tokenizer or option builds a new entry.
``IDLAB_DATA_CACHE=0`` turns the cache off (builds every time, writes nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from idlab.atomic import atomic_file

#: bump when the layout of the cached tensors changes (old entries are then never read)
CACHE_VERSION = 1


def data_cache_dir() -> Path:
    """``$IDLAB_CACHE/data`` (else ``~/.cache/idlab/data``)."""
    env = os.environ.get("IDLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "idlab") / "data"


def content_hash(parts: object) -> str:
    """sha256 (hex) of the canonical JSON of ``parts`` (sorted keys, no whitespace)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: object) -> str:
    """sha256 of what decides a tokenizer's output: its serialised fast tokenizer (vocabulary, merges,
    normaliser, pre-tokeniser) or sorted vocabulary, its special tokens and its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    else:  # a stand-in without a vocabulary: its type (tests)
        h.update(type(tokenizer).__qualname__.encode())
    special = {k: str(getattr(tokenizer, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    h.update(json.dumps(special, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode("utf-8"))
    return h.hexdigest()


def _enabled() -> bool:
    return os.environ.get("IDLAB_DATA_CACHE", "1") not in ("0", "false", "no", "")


def cached_tensors(what: str, parts: object, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors ``build()`` makes, from the cache when an entry for ``parts`` exists.

    Args:
        what: a short name for the file (``instruct``, ``corpus``).
        parts: everything the tensors depend on (text or its hash, tokenizer fingerprint, options);
            hashed by `content_hash` together with `CACHE_VERSION`.
        build: makes the tensors (a dict of CPU tensors) on a miss.

    A cache folder that cannot be written (read-only home) is not an error: the tensors are built
    and returned. A damaged entry is rebuilt.
    """
    if not _enabled():
        return build()
    path = data_cache_dir() / f"{what}-{content_hash({'v': CACHE_VERSION, 'parts': parts})[:32]}.pt"
    if path.exists():
        try:
            out = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(out, dict) and all(isinstance(v, Tensor) for v in out.values()):
                return out
        except Exception:  # damaged or from another torch: rebuild
            pass
    out = build()
    try:
        atomic_file(path, lambda tmp: torch.save(out, tmp))
    except OSError:
        pass
    return out


__all__ = ["CACHE_VERSION", "cached_tensors", "content_hash", "data_cache_dir", "tokenizer_fingerprint"]
