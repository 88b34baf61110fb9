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
`RunStore.clean_stale`. A run is claimed before it trains (``runs/.claim-<run_id>``,
`idlab.runs.claims`): two sweeps of one study never train the same run, and `clean_stale` leaves
claim files alone (a stale one is taken over, with a notice, by the next process that claims it).

A run is done only when all its files are whole: ``result.json["artifacts"]`` lists every
other file of the folder (``path`` relative to it, ``bytes``, ``sha256``), and
`artifact_problem` compares the folder with that list. A missing, truncated or altered file
makes the run pending again (`RunStore.check`; the sweep says why it reruns it) and makes
`iter_results` (the one reader of run folders: report, analysis) skip it with a one-line
warning naming the file. Results written before the list existed are checked for whole
safetensors files (header length and tensor offsets against the file size).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from idlab.atomic import atomic_write_text, fsync_dir
from idlab.errors import NotWritableError
from idlab.jsontypes import JsonObject, JsonValue
from idlab.runs import claims
from idlab.runs.marks import left_out
from idlab.runs.result import ArtifactEntry, ResultFormatError, RunResult, as_result

if TYPE_CHECKING:
    from idlab.config.run import RunConfig

RESULT_FILE = "result.json"
DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
SUBSPACE_FILE = "subspace.safetensors"
STATUSES = ("ok", "diverged", "failed")
#: key of result.json listing the run's other files with size and checksum
ARTIFACTS_KEY = "artifacts"
#: seconds a leftover temp folder must sit untouched before a sweep removes it (writing a
#: run's folder takes seconds; a younger one may belong to a sweep still running)
STALE_AFTER_S = 600.0


def canonical_json(obj: JsonValue) -> str:
    """Key-sorted, compact JSON: the same text for the same config on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def run_id(config: RunConfig | Mapping[str, JsonValue]) -> str:
    """First 12 hex digits of sha256 of the canonical JSON of a resolved run config.

    A `idlab.config.RunConfig` is hashed through its ``to_dict()`` (the layout stored as the
    ``config`` of result.json), so ``run_id(RunConfig.from_dict(c)) == run_id(c)``.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return hashlib.sha256(canonical_json(cfg).encode()).hexdigest()[:12]



def _jsonable(obj: JsonValue) -> JsonValue:
    """Replace NaN/inf floats by None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj



def atomic_write_json(path: str | Path, obj: JsonValue) -> None:
    """Strict JSON (NaN -> null), indented, written atomically."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> JsonObject | None:
    """The parsed JSON object at ``path``, or None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def git_commit(repo: str | Path | None = None) -> str | None:
    """The checked-out commit of the idlab source tree (read-only git call), or None."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
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
    for pkg in "torch transformers peft idlab".split():  # a string: "peft" is also a method name
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks; cached per process by path, size and mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def artifact_manifest(run_dir: str | Path) -> list[dict[str, str | int]]:
    """``[{"path", "bytes", "sha256"}]`` of every file under ``run_dir`` except result.json, sorted by path."""
    root = Path(run_dir)
    out: list[dict[str, str | int]] = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != RESULT_FILE):
        out.append({"path": f.relative_to(root).as_posix(), "bytes": f.stat().st_size, "sha256": file_sha256(f)})
    return out


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (header or tensor data cut short), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} has {size} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"{path.name} is truncated: its header needs {8 + n} bytes, the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__}: {e})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def artifact_problem(run_dir: str | Path, result: RunResult | Mapping[str, object]) -> str | None:
    """Why the files of a run folder do not match its result.json (first problem found), or None.

    With ``result.artifacts``: each listed file must exist with the listed size and sha256, unless the
    study's keep.json marks it ``kept: false`` with that size and sha256 (`idlab.runs.marks.left_out`: a
    published study whose large file was left out of git) and it is absent. Without it (results from before the list): every ``*.safetensors`` must be whole.
    """
    root = Path(run_dir)
    listed = _listed(result)
    if listed is None:
        for f in sorted(root.rglob("*.safetensors")):
            prob = safetensors_problem(f)
            if prob is not None:
                return f"{f.relative_to(root).as_posix()}: {prob}"
        return None
    for entry in listed:
        f = root / entry.path
        if not f.is_file():
            try:
                if left_out(root, entry.path, entry.bytes, entry.sha256):
                    continue  # marked kept: false by `idlab keep`: not in git, the run is still whole
            except ValueError as e:  # an unreadable keep.json
                return f"{entry.path} is missing, and {e}"
            return f"{entry.path} is missing"
        size = f.stat().st_size
        if size != entry.bytes:
            return f"{entry.path} has {size} bytes, result.json lists {entry.bytes} (truncated or rewritten)"
        if file_sha256(f) != entry.sha256:
            return f"{entry.path}: sha256 differs from result.json (corrupt)"
    return None


def _listed(result: RunResult | Mapping[str, object]) -> tuple[ArtifactEntry, ...] | None:
    """The artefact list of a result (a mapping is read by `RunResult.from_dict`'s rule)."""
    if isinstance(result, RunResult):
        return result.artifacts
    return RunResult.from_dict({ARTIFACTS_KEY: result.get(ARTIFACTS_KEY)}).artifacts


def read_result(path: str | Path) -> RunResult | None:
    """The `RunResult` of the result.json at ``path``; None if absent, unreadable or not a result."""
    raw = read_json(path)
    if raw is None:
        return None
    try:
        return RunResult.from_dict(raw)
    except ResultFormatError:
        return None


def check_writable(folder: str | Path, what: str = "results folder", fix: str | None = None) -> None:
    """Raise `NotWritableError` (one line naming the path and the fix) unless ``folder`` can be
    created and written; writes nothing that stays (a probe file in the nearest existing folder).

    Called before anything is written: by `idlab.sweep.driver.run_sweep` on the study folder and
    by ``idlab report`` on its output folder.
    """
    target = Path(folder).expanduser()
    fix = fix or "choose another folder or make it writable (chmod u+w)"
    probe_dir = target
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise NotWritableError(f"{what} {str(target)!r} cannot be created: {str(probe_dir)!r} is a file; {fix}")
    try:
        fd, name = tempfile.mkstemp(prefix=".idlab-write-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        where = "" if probe_dir == target else f" (its existing parent {str(probe_dir)!r})"
        raise NotWritableError(f"{what} {str(target)!r}{where} is not writable ({e.strerror or e}); {fix}") from None


def _publish_modes(folder: Path) -> None:
    """Files 0644, folders 0755 under ``folder``, as `idlab.atomic` writes them (safetensors and PEFT
    create their files 0600)."""
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


#: prefix of a run's mid-run checkpoint folder in ``runs/`` (`RunStore.checkpoint_dir`)
CHECKPOINT_PREFIX = ".ckpt-"


class RunStore:
    """The run directories of one study: ``<results_dir>/<study>/runs/``."""

    def __init__(self, study_dir: str | Path) -> None:
        self.study_dir = Path(study_dir)
        self.runs_dir = self.study_dir / "runs"

    def run_dir(self, rid: str) -> Path:
        """Final folder of run ``rid``."""
        return self.runs_dir / rid

    def checkpoint_dir(self, rid: str) -> Path:
        """Mid-run checkpoint folder of run ``rid`` (``runs/.ckpt-<run_id>/``, `idlab.training.checkpoint`);
        `clean_stale` leaves it alone: a killed run resumes from it."""
        return self.runs_dir / f"{CHECKPOINT_PREFIX}{rid}"

    def result(self, rid: str) -> RunResult | None:
        """The result.json of ``rid``, or None if there is none or it is not a result (its artifacts
        unchecked: `check`)."""
        return read_result(self.run_dir(rid) / RESULT_FILE)

    def check(self, rid: str) -> tuple[RunResult | None, str | None]:
        """``(result, problem)``: the result (None if absent or not a result) and why its files are not whole."""
        res = self.result(rid)
        if res is None:
            return None, None
        return res, artifact_problem(self.run_dir(rid), res)

    def is_done(self, rid: str, retry_failed: bool = True) -> bool:
        """Whether ``rid`` has a result whose files are whole (status 'failed' is not done if ``retry_failed``)."""
        res, problem = self.check(rid)
        if res is None or problem is not None:
            return False
        return not (retry_failed and res.status == "failed")

    def claim(self, rid: str, say: Callable[[str], None] | None = None) -> claims.Claim | claims.ClaimInfo:
        """Claim run ``rid`` before training it (`idlab.runs.claims.acquire`): a `Claim` to release
        when the run's folder is written or it failed, or the live holder's `ClaimInfo`."""
        return claims.acquire(self.runs_dir, rid, say)

    def live_claim(self, rid: str) -> claims.ClaimInfo | None:
        """The claim on ``rid`` of a process that is still alive, else None."""
        return claims.live_claim(self.runs_dir, rid)

    def check_writable(self) -> None:
        """`check_writable` on the study folder (before a sweep writes anything)."""
        check_writable(self.study_dir, "results folder",
                       "set results_dir=<a writable folder> or make it writable (chmod u+w)")

    def clean_stale(self, min_age_s: float = STALE_AFTER_S) -> list[Path]:
        """Remove leftovers of killed processes (``.tmp-*``, ``.trash-*``, run folders without result.json).

        Claim files (``.claim-*``, `idlab.runs.claims`) and checkpoint folders (``.ckpt-*``) are never removed here: a live one belongs
        to a run training now, a stale one is taken over by the next process claiming its run.

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
            if p.name.startswith((claims.CLAIM_PREFIX, CHECKPOINT_PREFIX)):
                continue
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

    def write(self, rid: str, result: RunResult | Mapping[str, object],
              artifacts: Callable[[Path], None] | None = None) -> Path:
        """Write run ``rid`` atomically: artifacts and result.json into a temp folder, renamed last.

        result.json is ``result.to_dict()`` with ``artifacts`` set to the folder's manifest (a
        mapping is read through `RunResult.from_dict` first, so it must be a valid result). An
        existing folder for ``rid`` (a failed run being retried) is replaced. If another process
        completed ``rid`` meanwhile, its result is kept.
        """
        res = as_result(result)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.runs_dir / f".tmp-{rid}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            if artifacts is not None:
                artifacts(tmp)
                _publish_modes(tmp)
            manifest = tuple(ArtifactEntry(str(e["path"]), int(e["bytes"]), str(e["sha256"]))
                             for e in artifact_manifest(tmp))
            atomic_write_json(tmp / RESULT_FILE, res.replace(artifacts=manifest).to_dict())
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
    """Every ``result.json`` under ``results_dir`` (a results root, study or runs folder), sorted.

    In-flight ``.tmp-*`` / ``.trash-*`` folders are skipped; the files are not checked (see `iter_results`).
    """
    root = Path(results_dir)
    for p in sorted(root.rglob(RESULT_FILE)):
        if any(part.startswith((".tmp-", ".trash-")) for part in p.relative_to(root).parts):
            continue
        yield p


def iter_results(results_dir: str | Path, warn: Callable[[str], None] | None = None
                 ) -> Iterator[tuple[Path, RunResult]]:
    """THE reader of run folders: ``(result.json path, RunResult)`` of every whole run, sorted.

    A result.json that does not parse, does not parse into a `RunResult`, or whose artifacts
    are missing or corrupt (`artifact_problem`), is skipped with one line to ``warn`` (default:
    stderr) naming the file.
    """
    say = warn or (lambda line: print(line, file=sys.stderr))
    for p in iter_result_files(results_dir):
        raw = read_json(p)
        if raw is None:
            say(f"warning: skipping run {p.parent.name}: {p} does not parse")
            continue
        try:
            res = RunResult.from_dict(raw)
        except ResultFormatError as e:
            say(f"warning: skipping run {p.parent.name}: {p} is not a result ({e})")
            continue
        problem = artifact_problem(p.parent, res)
        if problem is not None:
            say(f"warning: skipping run {p.parent.name}: {p.parent}/{problem}")
            continue
        yield p, res


__all__ = [
    "ADAPTER_DIR",
    "ARTIFACTS_KEY",
    "DELTA_FILE",
    "RESULT_FILE",
    "STATUSES",
    "SUBSPACE_FILE",
    "RunStore",
    "artifact_manifest",
    "artifact_problem",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "check_writable",
    "file_sha256",
    "git_commit",
    "iter_result_files",
    "iter_results",
    "package_versions",
    "read_json",
    "read_result",
    "run_id",
    "safetensors_problem",
]
