"""``idlab keep STUDY_DIR``: publish a study folder into git, leaving out its large files with a mark.

A study is published by three small files, all rewritten atomically by every call (`keep_study`):

- ``<study>/keep.json``: the files left out of git, each ``{"kept": false, "bytes", "sha256", "why"}`` under
  its path relative to the study (``runs/<run_id>/delta.safetensors``), the size limit, and the totals of
  what is kept and left out. The artefact check (`idlab.runs.marks.left_out`) accepts an absent file only
  when this marks it with the size and sha256 that the run's result.json lists.
- ``<study>/.gitignore``: what git must not track in this study: in-flight writes, claims and checkpoints
  (``runs/.*``), logs (``slurm/``, ``tensorboard/``), a local ``analysis/``, hidden files, every file marked
  ``kept: false``, and the folders of runs whose files are not whole.
- one line ``!/<study>/`` in the results folder's own ``.gitignore`` (``results/.gitignore``, which ignores
  everything else there: unpublished studies and everything ``idlab report`` writes).

A file is kept when it is at most ``max_file_mb`` (10^6 bytes) large: result.json (config, metrics, curve),
LoRA / PEFT adapters, ``subspace.safetensors`` (theta_d) and LoRA-factor ``delta.safetensors``; the dense
Delta W of a full fine-tuning or subspace run (tens of MB on MiniLM) is typically left out. A file that an
earlier call left out and that is absent here (a clone) stays left out whatever the limit.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from idlab.atomic import atomic_write_text
from idlab.jsontypes import JsonObject, JsonValue
from idlab.runs.marks import KEEP_FILE, read_marks
from idlab.runs.store import (
    RESULT_FILE,
    artifact_problem,
    atomic_write_json,
    file_sha256,
    read_result,
)

#: default of ``--max-file-mb``: the largest file kept in git, in MB (10^6 bytes)
DEFAULT_MAX_FILE_MB = 10.0
#: default of ``--max-study-mb``: the most a study may add to the repository, in MB
DEFAULT_MAX_STUDY_MB = 50.0
GITIGNORE = ".gitignore"
#: study-level paths never published (gitignore patterns, anchored at the study folder)
NEVER_PUBLISHED = ("/runs/.*", "/slurm/", "/tensorboard/", "/analysis/", "/.*", "!/.gitignore")
#: the head of a results folder's .gitignore when `keep_study` creates it (the repository's results/.gitignore)
RESULTS_GITIGNORE = """\
# results/: git tracks this file, README.md and the study folders that `idlab keep results/<study>`
# published (one `!/<study>/` line each, appended by that command). Everything else here stays
# untracked: unpublished studies, and what `idlab report` regenerates (summary/curves/cells.parquet,
# analysis/, figures/, REPORT.md). Each published study's own .gitignore leaves out its in-flight
# folders, logs and the files marked kept: false in its keep.json.
/*
!/.gitignore
!/README.md
!/.gitkeep
"""
#: folders `idlab report` writes into a results folder (regenerated, never published)
_REPORT_FOLDERS = ("analysis", "figures")
_BAD_NAME_CHARS = set("*?[]\\!#") | {" ", "\t", "\n"}


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


@dataclass(frozen=True)
class LeftOut:
    """A file left out of git: its path relative to the study, size, checksum and the reason."""

    path: str
    bytes: int
    sha256: str
    why: str


@dataclass
class KeepSummary:
    """What `keep_study` published: kept files and bytes (what git tracks), files left out, runs not published."""

    study_dir: Path
    max_file_mb: float
    kept_files: int = 0
    kept_bytes: int = 0
    left_out: list[LeftOut] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    largest: list[tuple[str, int]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The command's report, one line each."""
        s = self.study_dir
        out = [f"{s}: {self.kept_files} files kept in git ({_mb(self.kept_bytes)}); "
               f"{len(self.left_out)} left out ({_mb(sum(f.bytes for f in self.left_out))}, marked kept: false "
               f"in {s / KEEP_FILE}); limit --max-file-mb {self.max_file_mb:g}"]
        out += [f"  left out: {f.path} ({f.why})" for f in self.left_out]
        out += [f"  not published (files not whole; the next sweep reruns it): {r}" for r in self.incomplete]
        if self.largest:
            out.append("  largest kept: " + ", ".join(f"{p} ({_mb(n)})" for p, n in self.largest))
        out.append(f"  git add {s.parent / GITIGNORE} {s} && git commit  (a clone then resumes the study and redraws it without retraining)")
        return out


def _run_files(run_dir: Path) -> Iterator[tuple[str, int, str, bool]]:
    """``(path in the run, bytes, sha256, present here)`` of every artefact of a whole run: those its
    result.json lists, or (results from before the list) the files on disk."""
    res = read_result(run_dir / RESULT_FILE)
    listed = res.artifacts if res is not None else None
    if listed is not None:
        for e in listed:
            yield e.path, e.bytes, e.sha256, (run_dir / e.path).is_file()
        return
    for f in sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != RESULT_FILE):
        yield f.relative_to(run_dir).as_posix(), f.stat().st_size, file_sha256(f), True


def _decide(study: Path, max_file_mb: float, leave_out: Sequence[str]) -> tuple[list[LeftOut], list[str], list[str]]:
    """Files left out, descriptions of incomplete runs and their folder names, for every run of ``study``."""
    limit = int(max_file_mb * 1e6)
    left: list[LeftOut] = []
    incomplete: list[str] = []
    bad_dirs: list[str] = []
    for p in sorted((study / "runs").iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        res = read_result(p / RESULT_FILE)
        problem = "no result.json, or it does not parse" if res is None else artifact_problem(p, res)
        if problem is not None:
            incomplete.append(f"{p.name}: {problem}")
            bad_dirs.append(p.name)
            continue
        for rel, size, sha, present in _run_files(p):
            key = f"runs/{p.name}/{rel}"
            pattern = next((g for g in leave_out if fnmatch.fnmatchcase(rel, g)), None)
            if size > limit:
                left.append(LeftOut(key, size, sha, f"{_mb(size)} > --max-file-mb {max_file_mb:g}"))
            elif pattern is not None:
                left.append(LeftOut(key, size, sha, f"--leave-out {pattern}"))
            elif not present:  # whole per artefact_problem, so marked by an earlier call
                left.append(LeftOut(key, size, sha, "absent here, left out by an earlier `idlab keep`"))
    return left, incomplete, bad_dirs


def _tracked(study: Path, left: set[str], bad_dirs: set[str]) -> Iterator[tuple[str, int]]:
    """``(path relative to the study, bytes)`` of every file git tracks once the study's .gitignore is written
    (the same rules, applied here; the tests compare with ``git ls-files``)."""
    for dirpath, dirnames, filenames in os.walk(study):
        here = Path(dirpath)
        rel_dir = here.relative_to(study).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("slurm", "tensorboard",
                                                                                      "analysis")]
            filenames = [f for f in filenames if not f.startswith(".") or f == GITIGNORE]
        elif rel_dir == "runs":
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in bad_dirs]
            filenames = [f for f in filenames if not f.startswith(".")]
        for f in filenames:
            rel = f if rel_dir == "." else f"{rel_dir}/{f}"
            if rel not in left and (here / f).is_file():
                yield rel, (here / f).stat().st_size


def _study_gitignore(left: list[LeftOut], bad_dirs: list[str], max_file_mb: float) -> str:
    lines = ["# written by `idlab keep` (see results/README.md); every call rewrites it: do not edit",
             "# never published: in-flight writes, claims, checkpoints, logs, a local analysis, hidden files",
             *NEVER_PUBLISHED]
    if left:
        lines += [f"# left out of git (over --max-file-mb {max_file_mb:g}, --leave-out, or absent here): kept: false in "
                  f"{KEEP_FILE}", *(f"/{f.path}" for f in left)]
    if bad_dirs:
        lines += ["# runs whose files are not whole: not published (the next sweep reruns them)",
                  *(f"/runs/{d}/" for d in bad_dirs)]
    return "\n".join(lines) + "\n"


def _publish_in_results(study: Path) -> Path:
    """Add ``!/<study>/`` to the results folder's .gitignore (created with `RESULTS_GITIGNORE` if absent)."""
    gi = study.parent / GITIGNORE
    line = f"!/{study.name}/"
    text = gi.read_text(encoding="utf-8") if gi.is_file() else RESULTS_GITIGNORE
    if line not in text.splitlines():
        text = text + ("" if text.endswith("\n") else "\n") + line + "\n"
        atomic_write_text(gi, text)
    elif not gi.is_file():
        atomic_write_text(gi, text)
    return gi


def keep_study(study_dir: str | Path, max_file_mb: float = DEFAULT_MAX_FILE_MB, leave_out: Sequence[str] = (),
               max_study_mb: float | None = DEFAULT_MAX_STUDY_MB) -> KeepSummary:
    """Publish ``study_dir`` into git (see the module docstring): decide per file, write keep.json, the
    study's .gitignore and its line in the results folder's .gitignore. Reads and writes no run file.

    Args:
        study_dir: the study folder (``results/<study>``).
        max_file_mb: files larger than this (MB of 10^6 bytes) are left out.
        leave_out: glob patterns of paths inside a run folder (``adapter/*``) left out whatever their size.
        max_study_mb: refuse, writing nothing, when the kept files would exceed this (None: no limit).

    Raises:
        FileNotFoundError: ``study_dir`` is not a study folder (no ``runs/`` in it).
        ValueError: a limit is not positive, the kept files exceed ``max_study_mb``, the study's name cannot
            be a gitignore line, or an existing keep.json does not parse (each message names the fix).
    """
    study = Path(study_dir)
    if not (study / "runs").is_dir():
        raise FileNotFoundError(f"{str(study)!r} is not a study folder (no runs/ in it); pass results/<study>")
    if not max_file_mb > 0 or not (max_study_mb is None or max_study_mb > 0):
        raise ValueError(f"--max-file-mb and --max-study-mb must be positive, got {max_file_mb:g} and {max_study_mb}")
    if set(study.name) & _BAD_NAME_CHARS or study.name.startswith("."):
        raise ValueError(f"study name {study.name!r} cannot be published by a .gitignore line; rename the folder "
                         f"(letters, digits, -, _, .)")
    if study.name in _REPORT_FOLDERS:
        raise ValueError(f"a study named {study.name!r} shares its folder name with what `idlab report` writes into "
                         f"the results folder ({study.name}/); rerun it with another name=...")
    read_marks(study)  # a keep.json that does not parse stops here, naming the fix
    left, incomplete, bad_dirs = _decide(study, max_file_mb, leave_out)
    tracked = dict(_tracked(study, {f.path for f in left}, set(bad_dirs)))
    total = sum(tracked.values())
    if max_study_mb is not None and total > max_study_mb * 1e6:
        top = ", ".join(f"{p} ({_mb(n)})" for p, n in sorted(tracked.items(), key=lambda kv: -kv[1])[:3])
        raise ValueError(f"{study}: the kept files would take {_mb(total)}, over --max-study-mb {max_study_mb:g} "
                         f"(largest: {top}); nothing written. Lower --max-file-mb, leave out duplicates "
                         f"(--leave-out 'adapter/*': a LoRA run's delta.safetensors holds the same factors), "
                         f"or raise --max-study-mb")
    files: JsonObject = {f.path: {"kept": False, "bytes": f.bytes, "sha256": f.sha256, "why": f.why} for f in left}
    left_bytes = sum(f.bytes for f in left)
    atomic_write_text(study / GITIGNORE, _study_gitignore(left, bad_dirs, max_file_mb))
    incomplete_ids: list[JsonValue] = [*sorted(bad_dirs)]
    manifest: JsonObject = {
        "about": "written by `idlab keep`: the files of this study left out of git (kept: false); "
                 "see results/README.md",
        "max_file_mb": max_file_mb, "leave_out": [*leave_out], "files": files, "incomplete_runs": incomplete_ids,
        "left_out": {"files": len(left), "bytes": left_bytes}}
    tracked = dict(_tracked(study, {f.path for f in left}, set(bad_dirs)))
    tracked.pop(KEEP_FILE, None)  # an older one
    manifest["kept"] = {"files": len(tracked), "bytes": sum(tracked.values()), "besides": KEEP_FILE}
    atomic_write_json(study / KEEP_FILE, manifest)
    tracked[KEEP_FILE] = (study / KEEP_FILE).stat().st_size
    _publish_in_results(study)
    largest = sorted(tracked.items(), key=lambda kv: -kv[1])[:3]
    return KeepSummary(study, max_file_mb, len(tracked), sum(tracked.values()), left, incomplete, largest)


__all__ = ["DEFAULT_MAX_FILE_MB", "DEFAULT_MAX_STUDY_MB", "KEEP_FILE", "KeepSummary", "LeftOut", "keep_study"]
