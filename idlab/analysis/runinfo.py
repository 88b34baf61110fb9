"""Run folders as the Delta W analysis sees them: `RunInfo`, `read_run`, `expand_run_dirs`,
`auto_pairs`, and module-name helpers (`parse_layer`, `module_type`).

Run folders are read through `idlab.runs` (`read_result`, `iter_result_files`), the one reader
of the run-directory contract (docs/CONTRACTS.md): result.json becomes a `idlab.runs.RunResult`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from idlab.runs import (
    RESULT_FILE,
    RunResult,
    Status,
    artifact_problem,
    iter_result_files,
    read_result,
)

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


class RunColumns(TypedDict):
    """The run columns shared by every analysis table (`RunInfo.columns`)."""

    run_id: str
    study: str
    model: str
    task: str
    method: str
    r: int | None
    d: int | None
    seed: int | None
    target_modules: str | None


class ModuleColumns(TypedDict):
    """The module columns of a per-module row (`module_columns`)."""

    module: str
    layer: int | None
    module_type: str


def parse_layer(module: str) -> int | None:
    """Layer index of a qualified module name (``model.layers.3.self_attn.q_proj`` -> 3)."""
    m = _LAYER_RE.search(module)
    return int(m.group(1)) if m else None


def module_type(module: str) -> str:
    """Last component of a qualified module name (``...self_attn.q_proj`` -> ``q_proj``)."""
    return module.rsplit(".", 1)[-1]


def module_columns(module: str) -> ModuleColumns:
    """module, layer and module_type of a qualified module name."""
    return {"module": module, "layer": parse_layer(module), "module_type": module_type(module)}


@dataclass(frozen=True)
class RunInfo:
    """What the analysis needs from one run directory (`read_run`): its folder and `RunResult` fields."""

    path: Path
    run_id: str
    study: str
    status: Status
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_result(cls, path: Path, result: RunResult) -> RunInfo:
        """The run folder ``path`` holding ``result`` (the folder name is the id when the result has none)."""
        return cls(path=path, run_id=result.run_id or path.name, study=result.study, status=result.status,
                   config=dict(result.config))

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))

    def columns(self) -> RunColumns:
        """The run columns shared by every table."""
        c = self.config
        targets = c.get("target_modules")
        if isinstance(targets, list | tuple):
            targets = ",".join(str(t) for t in targets)
        return {
            "run_id": self.run_id,
            "study": self.study,
            "model": self.model,
            "task": str(c.get("task", "")),
            "method": str(c.get("method", "")),
            "r": c.get("r"),
            "d": c.get("d"),
            "seed": c.get("seed"),
            "target_modules": None if targets is None else str(targets),
        }


def read_run(path: str | Path) -> RunInfo:
    """Read ``result.json`` of a run directory into a `RunInfo`.

    Raises FileNotFoundError when result.json is missing or does not parse, and ValueError naming the
    file when an artefact it lists is missing or corrupt (`idlab.runs.artifact_problem`).
    """
    path = Path(path)
    rj = path / RESULT_FILE
    data = read_result(rj)
    if data is None:
        raise FileNotFoundError(f"{rj} does not exist or does not parse; pass run directories holding result.json")
    problem = artifact_problem(path, data)
    if problem is not None:
        raise ValueError(f"run {path.name}: {path}/{problem}; rerun the sweep (it redoes runs with broken files)")
    return RunInfo.from_result(path, data)


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories (holding ``result.json``) found at or below each path: a run dir, a
    study dir, or a whole results folder; in-flight ``.tmp-*`` / ``.trash-*`` folders are
    skipped. Sorted within each given path, duplicates dropped."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / RESULT_FILE).is_file():
            found = [p]
        else:
            if not p.is_dir():
                raise FileNotFoundError(f"{p} is not a run directory, study directory or folder")
            found = [q.parent for q in iter_result_files(p)]
            if not found:
                raise FileNotFoundError(f"no run directories (with result.json) under {p}")
        out.extend(q for q in found if q not in out)
    return out


def auto_pairs(runs: Sequence[RunInfo]) -> list[tuple[RunInfo, RunInfo, str]]:
    """Pairs for subspace similarity: same (model, task, method, target_modules, d) and
    different r at equal seed ("rank", smaller r first) or equal r at different seeds ("seed")."""
    pairs: list[tuple[RunInfo, RunInfo, str]] = []
    for a_i, a in enumerate(runs):
        for b in runs[a_i + 1 :]:
            ca, cb = a.columns(), b.columns()
            key: tuple[Literal["model", "task", "method", "target_modules", "d"], ...] = (
                "model", "task", "method", "target_modules", "d")
            if any(ca[k] != cb[k] for k in key):
                continue
            if ca["r"] != cb["r"] and ca["seed"] == cb["seed"]:
                lo, hi = (a, b) if (ca["r"] or 0) <= (cb["r"] or 0) else (b, a)
                pairs.append((lo, hi, "rank"))
            elif ca["r"] == cb["r"] and ca["seed"] != cb["seed"]:
                pairs.append((a, b, "seed"))
    return pairs



__all__ = ["RunInfo", "auto_pairs", "expand_run_dirs", "module_type", "parse_layer", "read_run"]
