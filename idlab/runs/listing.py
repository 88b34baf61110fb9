"""``idlab runs STUDY_DIR``: the runs of one study folder as a table, and removing a selection.

One `RunRow` per run folder and per claim without a folder (`list_runs`); statuses:

- ``ok`` / ``diverged`` / ``failed``: the run's result.json (`idlab.runs.RunResult`);
- ``incomplete``: a run folder whose result.json is missing or unreadable or whose files are not
  whole (`idlab.runs.artifact_problem`); the sweep reruns it;
- ``claimed``: a live process is training it now (`idlab.runs.claims`; a failed run being retried
  is listed as claimed);
- ``stale``: a claim whose owner is gone (the next sweep takes it over).

`remove_runs` removes run folders atomically (each is renamed to a ``.trash-*`` folder, then
deleted), and stale claims; it never removes a live claim or the folder of a run being trained.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idlab.runs import claims
from idlab.runs.store import RESULT_FILE, artifact_problem, read_json, read_result

#: every status `list_runs` gives, in table order
LIST_STATUSES = ("ok", "diverged", "failed", "incomplete", "claimed", "stale")


@dataclass(frozen=True)
class RunRow:
    """One run of a study folder as ``idlab runs`` lists it (``to_dict``: one JSON record)."""

    run_id: str
    status: str
    method: str | None = None
    cell: str | None = None
    lr: float | None = None
    seed: int | None = None
    wall_time_s: float | None = None
    error: str | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, str | float | int | None]:
        """The row as a JSON object (``pandas.DataFrame(records)`` reads a list of them)."""
        return asdict(self)


def _describe_config(cfg: object) -> dict[str, Any]:
    """method, cell (the method's axes label, from the registry), lr and seed of a stored run config."""
    if not isinstance(cfg, Mapping) or not cfg:
        return {}
    out: dict[str, Any] = {"method": cfg.get("method")}
    try:
        from idlab.config.run import RunConfig

        run = RunConfig.from_dict(cfg)
        out.update(cell=run.axes.label(), lr=run.lr, seed=run.seed)
    except Exception:  # a config this version cannot parse: show what is there
        out.update(lr=cfg.get("lr"), seed=cfg.get("seed"))
    return out


def _head(text: str | None, width: int = 80) -> str | None:
    if not text:
        return None
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def study_runs_dir(study_dir: str | Path) -> Path:
    """``<study_dir>/runs``, or ``study_dir`` itself when it is a runs folder."""
    p = Path(study_dir)
    return p if p.name == "runs" and not (p / "runs").is_dir() else p / "runs"


def list_runs(study_dir: str | Path) -> list[RunRow]:
    """Every run of a study folder (see the module docstring), sorted by method, cell, lr, seed, run id.

    Raises:
        FileNotFoundError: ``study_dir`` has no ``runs`` folder.
    """
    runs = study_runs_dir(study_dir)
    if not runs.is_dir():
        raise FileNotFoundError(f"{str(study_dir)!r} is not a study folder (no runs/ folder in it)")
    found = (read_json(runs.parent / "study.json") or {}).get("runs")
    planned: Mapping[str, object] = found if isinstance(found, Mapping) else {}
    rows: dict[str, RunRow] = {}
    for p in sorted(runs.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        res = read_result(p / RESULT_FILE)
        if res is None:
            why = "no result.json" if not (p / RESULT_FILE).exists() else "result.json does not parse"
            rows[p.name] = RunRow(p.name, "incomplete", error=why, path=str(p), **_describe_config(planned.get(p.name)))
            continue
        problem = artifact_problem(p, res)
        rows[p.name] = RunRow(
            p.name, "incomplete" if problem else res.status, wall_time_s=res.wall_time_s,
            error=_head(problem or res.error), path=str(p), **_describe_config(res.config or planned.get(p.name)))
    for info in claims.iter_claims(runs):
        rid = info.run_id
        known = rows.get(rid)
        if known is not None and known.status in ("ok", "diverged"):
            continue  # finished; the claim is a moment from being released
        stale = claims.stale_reason(info)
        status = "claimed" if stale is None else "stale"
        error = f"claimed by {info.describe()}" + (f"; stale: {stale}" if stale else "")
        if known is not None and status == "stale":
            continue  # a stale claim on a run with a folder: the folder tells
        base = known.to_dict() if known is not None else {"run_id": rid, **_describe_config(planned.get(rid))}
        rows[rid] = RunRow(**{**base, "status": status, "error": error,
                              "path": base.get("path") or str(info.path)})

    def key(r: RunRow) -> tuple[str, str, float, int, str]:
        return (r.method or "", r.cell or "", r.lr if r.lr is not None else 0.0,
                r.seed if r.seed is not None else -1, r.run_id)

    return sorted(rows.values(), key=key)


def select_runs(rows: Iterable[RunRow], statuses: Sequence[str] = (), run_ids: Sequence[str] = ()) -> list[RunRow]:
    """The rows with one of ``statuses`` (all when empty) and one of ``run_ids`` (prefixes; all when empty)."""
    return [r for r in rows if (not statuses or r.status in statuses)
            and (not run_ids or any(r.run_id.startswith(i) for i in run_ids))]


def remove_runs(study_dir: str | Path, rows: Iterable[RunRow]) -> tuple[list[str], list[str]]:
    """Remove the selected runs; returns (removed run ids, lines saying what was kept and why).

    Each run folder is renamed to ``runs/.trash-<run_id>-...`` (atomic) and then deleted, so a
    reader sees the whole run or none; a stale claim file is deleted. A live claim (a run being
    trained) is never removed.
    """
    runs = study_runs_dir(study_dir)
    removed: list[str] = []
    kept: list[str] = []
    for r in rows:
        if r.status == "claimed":
            kept.append(f"kept {r.run_id}: {r.error} (a live process is training it)")
            continue
        if r.status == "stale":
            claims.claim_path(runs, r.run_id).unlink(missing_ok=True)
            removed.append(r.run_id)
            continue
        folder = runs / r.run_id
        if claims.live_claim(runs, r.run_id) is not None:
            kept.append(f"kept {r.run_id}: claimed by a live process meanwhile")
            continue
        if not folder.is_dir():
            continue
        trash = runs / f".trash-{r.run_id}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.replace(folder, trash)
        except OSError as e:
            kept.append(f"kept {r.run_id}: {e.strerror or e}")
            continue
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(r.run_id)
    return removed, kept


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def format_table(rows: Sequence[RunRow]) -> str:
    """The rows as an aligned text table (run id, status, method, cell, lr, seed, wall time, error head)."""
    head = ("run_id", "status", "method", "cell", "lr", "seed", "wall", "error")
    body = [(r.run_id, r.status, r.method or "?", r.cell or "", "-" if r.lr is None else f"{r.lr:g}",
             "-" if r.seed is None else str(r.seed), _fmt_time(r.wall_time_s), _head(r.error, 70) or "")
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    counts = {s: sum(r.status == s for r in rows) for s in LIST_STATUSES}
    lines.append(f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def to_json(rows: Sequence[RunRow]) -> str:
    """A JSON array of the rows' records (``pandas.read_json(text)`` or ``DataFrame(json.loads(text))``)."""
    return json.dumps([r.to_dict() for r in rows], indent=1)


__all__ = ["LIST_STATUSES", "RunRow", "format_table", "list_runs", "remove_runs", "select_runs", "study_runs_dir",
           "to_json"]
