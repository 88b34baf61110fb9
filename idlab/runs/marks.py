"""``kept: false`` marks: run files that a published study left out of git (`idlab.runs.keep`).

``idlab keep results/<study>`` writes ``results/<study>/keep.json``; its ``files`` entry maps a file's
path relative to the study folder (``runs/<run_id>/delta.safetensors``) to ``{"kept": false, "bytes",
"sha256", "why"}``. A clone of the repository has every run folder but not these files.

`left_out` is what the artefact check (`idlab.runs.store.artifact_problem`) asks when a file that
result.json lists is absent: the file counts as present-but-not-kept (the run stays complete, the sweep
does not rerun it) only when the study's keep.json marks exactly that file, with the size and sha256
result.json lists. A missing file without such a mark is still a broken run. `unkept_note` is the
one line the Delta W analysis and the report print for a run whose Delta W was left out.

This module reads only keep.json (no other part of idlab), so the store can ask it without a cycle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: the study-level manifest of what `idlab keep` left out of git
KEEP_FILE = "keep.json"
#: the file of a run holding its Delta W (`idlab.runs.store.DELTA_FILE`; repeated here to avoid a cycle)
_DELTA = "delta.safetensors"

_CACHE: dict[str, tuple[tuple[int, int], dict[str, tuple[int, str]]]] = {}


def study_of(run_dir: str | Path) -> Path | None:
    """The study folder of a run folder ``<study>/runs/<run_id>``, or None if it is not laid out so."""
    p = Path(run_dir)
    return p.parent.parent if p.parent.name == "runs" else None


def read_marks(study_dir: str | Path) -> dict[str, tuple[int, str]]:
    """``{path relative to the study: (bytes, sha256)}`` of every ``kept: false`` file of keep.json.

    Empty when the study has no keep.json. Cached per process by the file's size and mtime.

    Raises:
        ValueError: keep.json exists but is not a keep manifest (the message names the file and the fix).
    """
    path = Path(study_dir) / KEEP_FILE
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    stamp = (st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        files = raw["files"]
        marks = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items() if v.get("kept") is False}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a keep manifest ({type(e).__name__}: {e}); restore it from git "
                         f"(git checkout -- {path})") from None
    _CACHE[str(path)] = (stamp, marks)
    return marks


def _key(run_dir: Path, rel: str) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}/{rel}"


def left_out(run_dir: str | Path, rel: str, size: int, sha256: str) -> bool:
    """Whether file ``rel`` of ``run_dir`` (``size`` bytes, ``sha256`` as result.json lists it) is marked
    ``kept: false`` in its study's keep.json with that same size and checksum."""
    study = study_of(run_dir)
    if study is None:
        return False
    return read_marks(study).get(_key(Path(run_dir), rel)) == (size, sha256)


def unkept_files(run_dir: str | Path) -> list[str]:
    """The files of ``run_dir`` (relative to it) that keep.json marks ``kept: false`` and that are absent."""
    run = Path(run_dir)
    study = study_of(run)
    if study is None:
        return []
    prefix = _key(run, "")
    try:
        marks = read_marks(study)
    except ValueError:  # an unreadable keep.json: the artefact check names it
        return []
    return sorted(k[len(prefix):] for k in marks if k.startswith(prefix)
                  and not (run / k[len(prefix):]).is_file())


def unkept_note(run_dir: str | Path, rel: str = _DELTA) -> str | None:
    """One line for a run whose file ``rel`` (default its Delta W) was left out of git and is absent here:
    what is missing, why, and how to get it back; None when the file is here or not marked."""
    run = Path(run_dir)
    if rel not in unkept_files(run):
        return None
    study = study_of(run)
    return (f"run {run.name}: {rel} not kept (left out of git by `idlab keep`, marked kept: false in "
            f"{study / KEEP_FILE if study else KEEP_FILE}); its {'ΔW' if rel == _DELTA else rel} is skipped. "
            f"To regenerate it, retrain the run: `idlab runs {study} {run.name} --remove --yes`, then "
            f"`idlab sweep` the study again")


__all__ = ["KEEP_FILE", "left_out", "read_marks", "study_of", "unkept_files", "unkept_note"]
