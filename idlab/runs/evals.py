"""``eval.json``: a finished run's scores on lm-evaluation-harness tasks (`idlab eval`), beside result.json.

One file per run folder, written atomically (temp file, fsync, rename) after every task, so a killed
``idlab eval`` keeps the tasks it finished and the next one runs only the missing ones. Layout::

    {"format": 1,
     "tasks": {"<task>": {"metrics": {"acc,none": 0.5, "acc_stderr,none": 0.35, ...},
                          "limit": 2, "n_samples": 2, "lm_eval_version": "0.4.13",
                          "seconds": 1.9, "evaluated_at": "2026-12-07T19:30:00+00:00"}}}

With ``idlab eval --pretrained`` a second mapping, ``"pretrained": {"<task>": {...}}``, holds the same task's
scores of the pretrained model the run started from (scored once per base model and call, copied into each
run), so that forgetting on a task is its score after minus before.
``metrics`` are lm-eval's own keys (``<metric>,<filter>``; NaN stored as null). result.json is not
touched: its artefact list does not cover eval.json, and retraining a run (a new folder) drops it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from idlab.atomic import atomic_write_text
from idlab.jsontypes import JsonObject

EVAL_FILE = "eval.json"
EVAL_FORMAT = 1


@dataclass(frozen=True)
class TaskScore:
    """One lm-eval task's scores of one run.

    Attributes:
        task: the lm-eval task name.
        metrics: lm-eval's ``results[task]`` numbers (``acc,none``, ``exact_match,strict-match``, ...).
        limit: the ``--limit`` it ran with (None: the whole split).
        n_samples: documents scored.
        lm_eval_version: the harness version.
        seconds: wall time of the task.
        evaluated_at: ISO time (UTC).
    """

    task: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    limit: int | None = None
    n_samples: int | None = None
    lm_eval_version: str | None = None
    seconds: float | None = None
    evaluated_at: str | None = None

    def to_dict(self) -> JsonObject:
        """The task's entry in eval.json (without its name, the key)."""
        return {"metrics": {k: v for k, v in self.metrics.items()}, "limit": self.limit,
                "n_samples": self.n_samples, "lm_eval_version": self.lm_eval_version, "seconds": self.seconds,
                "evaluated_at": self.evaluated_at}

    @classmethod
    def from_dict(cls, task: str, raw: Mapping[str, object]) -> TaskScore:
        """The inverse of `to_dict`; non-numeric metrics are dropped."""
        m = raw.get("metrics")
        metrics = {str(k): (None if v is None else float(v)) for k, v in (m.items() if isinstance(m, Mapping) else ())
                   if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}

        def num(key: str) -> float | None:
            v = raw.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        lim, n = num("limit"), num("n_samples")
        ver, at = raw.get("lm_eval_version"), raw.get("evaluated_at")
        return cls(task, metrics, None if lim is None else int(lim), None if n is None else int(n),
                   None if ver is None else str(ver), num("seconds"), None if at is None else str(at))


def clean_metric(v: object) -> float | None:
    """A harness metric as JSON: a finite float, or None (NaN, inf, "N/A", a non-number)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def read_evals(run_dir: str | Path, pretrained: bool = False) -> dict[str, TaskScore]:
    """``{task: TaskScore}`` of a run folder's eval.json (``pretrained``: the pretrained model's scores);
    empty when there is none.

    Raises:
        ValueError: an eval.json that is not JSON or not of this layout (names the file).
    """
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e}); remove it to evaluate again") from None
    tasks = raw.get("tasks") if isinstance(raw, Mapping) else None
    if not isinstance(tasks, Mapping):
        raise ValueError(f"{path}: no 'tasks' mapping; remove it to evaluate again")
    if pretrained:
        tasks = raw.get("pretrained")
        if not isinstance(tasks, Mapping):
            return {}
    return {str(t): TaskScore.from_dict(str(t), v) for t, v in tasks.items() if isinstance(v, Mapping)}


def write_eval(run_dir: str | Path, score: TaskScore, pretrained: bool = False) -> Path:
    """Add (or replace) one task's scores in a run folder's eval.json (``pretrained``: the pretrained model's),
    atomically."""
    scores, pre = read_evals(run_dir), read_evals(run_dir, pretrained=True)
    (pre if pretrained else scores)[score.task] = score
    doc: JsonObject = {"format": EVAL_FORMAT, "tasks": {t: s.to_dict() for t, s in sorted(scores.items())}}
    if pre:
        doc["pretrained"] = {t: s.to_dict() for t, s in sorted(pre.items())}
    return atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


__all__ = ["EVAL_FILE", "TaskScore", "clean_metric", "read_evals", "write_eval"]
