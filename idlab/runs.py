"""Run directories: stable run ids, atomic writes, completeness, loading.

Layout (see docs/CONTRACTS.md)::

    <results_dir>/<study>/runs/<run_id>/result.json      the marker of completeness
                                        delta.safetensors  Delta W per module (save_deltas)
                                        adapter/           LoRA runs, PEFT format
                                        subspace.safetensors  subspace runs (theta_d, lambda, head)

A run directory is built under ``runs/.tmp-<run_id>-<pid>-<nonce>/`` and renamed
into place as the last step, so a directory named by a run id is always complete;
``result.json`` itself is also written atomically (temp file, fsync, os.replace).
Leftover ``.tmp-*`` / ``.trash-*`` folders from a killed process are removed by
`RunStore.clean_stale`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlab.atomic import atomic_write_text, fsync_dir

if TYPE_CHECKING:
    from idlab.config.run import RunConfig

RESULT_FILE = "result.json"
DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
SUBSPACE_FILE = "subspace.safetensors"
STATUSES = ("ok", "diverged", "failed")
#: seconds a leftover temp folder must sit untouched before a sweep removes it (writing a
#: run's folder takes seconds; a younger one may belong to a sweep still running)
STALE_AFTER_S = 600.0


def canonical_json(obj: Any) -> str:
    """Key-sorted, compact JSON: the same text for the same config on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id(config: RunConfig | Mapping[str, Any]) -> str:
    """First 12 hex digits of sha256 of the canonical JSON of a resolved run config.

    A `idlab.config.RunConfig` is hashed through its ``to_dict()`` (the layout stored as the
    ``config`` of result.json), so ``run_id(RunConfig.from_dict(c)) == run_id(c)``.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return hashlib.sha256(canonical_json(cfg).encode()).hexdigest()[:12]



def _jsonable(obj: Any) -> Any:
    """Replace NaN/inf floats by None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj



def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN -> null), indented, written atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The parsed JSON object at ``path``, or None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def git_commit(repo: str | Path | None = None) -> str | None:
    """The checked-out commit of the idlab source tree (read-only git call), or None."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    """Versions of torch, transformers, peft and idlab (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "idlab"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class RunStore:
    """The run directories of one study: ``<results_dir>/<study>/runs/``."""

    def __init__(self, study_dir: str | Path) -> None:
        self.study_dir = Path(study_dir)
        self.runs_dir = self.study_dir / "runs"

    def run_dir(self, rid: str) -> Path:
        """Final folder of run ``rid``."""
        return self.runs_dir / rid

    def result(self, rid: str) -> dict[str, Any] | None:
        """The parsed result.json of ``rid`` or None if the run is not complete."""
        return read_json(self.run_dir(rid) / RESULT_FILE)

    def is_done(self, rid: str, retry_failed: bool = True) -> bool:
        """Whether ``rid`` has a complete result (status 'failed' counts as not done if ``retry_failed``)."""
        res = self.result(rid)
        if res is None:
            return False
        return not (retry_failed and res.get("status") == "failed")

    def clean_stale(self, min_age_s: float = STALE_AFTER_S) -> list[Path]:
        """Remove leftovers of killed processes (``.tmp-*``, ``.trash-*``, run folders without result.json).

        Only leftovers untouched for ``min_age_s`` seconds go: a second sweep started on the
        same study (another terminal, a slice of the grid given by overrides) must not delete
        the temp folder a running sweep is writing (which takes seconds). Pass 0 to remove
        every leftover when nothing else writes into the study.
        """
        removed: list[Path] = []
        if not self.runs_dir.is_dir():
            return removed
        now = time.time()
        for p in sorted(self.runs_dir.iterdir()):
            stale = p.name.startswith((".tmp-", ".trash-")) or (p.is_dir() and not (p / RESULT_FILE).exists())
            if p.name.startswith(".") and p.is_file() and p.name.endswith(".tmp"):
                stale = True
            if not stale:
                continue
            try:
                young = now - p.stat().st_mtime < min_age_s
            except FileNotFoundError:  # its writer renamed or removed it meanwhile
                continue
            if not young:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def write(self, rid: str, result: Mapping[str, Any], artifacts: Callable[[Path], None] | None = None) -> Path:
        """Write run ``rid`` atomically: artifacts and result.json into a temp folder, renamed last.

        An existing folder for ``rid`` (a failed run being retried) is replaced. If
        another process completed ``rid`` meanwhile, its result is kept.
        """
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.runs_dir / f".tmp-{rid}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            if artifacts is not None:
                artifacts(tmp)
            atomic_write_json(tmp / RESULT_FILE, dict(result))
            fsync_dir(tmp)
            final = self.run_dir(rid)
            if final.exists():
                trash = self.runs_dir / f".trash-{rid}-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another writer won the race: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(self.runs_dir)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def iter_result_files(results_dir: str | Path) -> Iterator[Path]:
    """Every complete ``result.json`` under ``results_dir`` (a results root, study or runs folder), sorted."""
    root = Path(results_dir)
    for p in sorted(root.rglob(RESULT_FILE)):
        if any(part.startswith((".tmp-", ".trash-")) for part in p.relative_to(root).parts):
            continue
        yield p


__all__ = [
    "ADAPTER_DIR",
    "DELTA_FILE",
    "RESULT_FILE",
    "STATUSES",
    "SUBSPACE_FILE",
    "RunStore",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "git_commit",
    "iter_result_files",
    "package_versions",
    "read_json",
    "run_id",
]
