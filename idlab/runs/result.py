"""`RunResult`: the typed content of a run folder's ``result.json`` (docs/CONTRACTS.md).

This class is the one reader and writer of that content: `RunResult.from_dict` reads every
result.json ever written (older files lack keys; their fields take the defaults below) and
`RunResult.to_dict` gives back the JSON layout the sweep writes (`idlab.methods.execute_run`),
so a file read and written again keeps its keys. `idlab.runs.RunStore` and `iter_results`
return RunResult; the report, the analysis and the experiments read its fields.

Which keys `to_dict` writes (the "layout"):

- a result read by `from_dict`: the keys of the mapping it was read from (plus ``artifacts``
  and ``traceback`` once set), so an old file keeps its older layout;
- a result built directly: the layout of `idlab.methods.execute_run` for its status, i.e.
  `ALWAYS_KEYS`, then `TRAINED_KEYS` unless the status is "failed", then ``traceback`` and
  ``artifacts`` when set.

Keys no field names (the records of ``experiments/li2018.py``: tag, score, d, model, method,
seed, train) are kept in `RunResult.extra` and written back as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from idlab.jsontypes import JsonObject, JsonScalar, JsonValue

if TYPE_CHECKING:
    from idlab.config.run import RunConfig

Status = Literal["ok", "diverged", "failed"]
ScoreKind = Literal["final", "best", "exact_match"]
#: a JSON scalar as result.json stores metric values (NaN is written as null)
Number = float | int | None

#: keys every result of `idlab.methods.execute_run` has, whatever its status
ALWAYS_KEYS = ("run_id", "study", "config", "started_at", "versions", "git_commit", "hostname", "python",
               "cuda_visible_devices", "status", "error", "metrics", "best", "curve", "wall_time_s", "finished_at")
#: keys a run that trained (status ok or diverged) adds
TRAINED_KEYS = ("steps", "trainable_parameters", "total_parameters", "train_time_s", "peak_memory_bytes",
                "device", "precision", "task_info", "metric", "higher_is_better", "method_info", "converged",
                "convergence")
#: keys written only when set
OPTIONAL_KEYS = ("traceback", "artifacts", "slurm", "exact_match", "exact_match_before", "general_loss_before",
                 "general_loss_after", "generation")


class ResultFormatError(ValueError):
    """A mapping that is not a result.json (wrong type of a known key, unknown status)."""


@dataclass(frozen=True)
class ArtifactEntry:
    """One file of a run folder as result.json lists it: ``path`` relative to the folder, size, sha256."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> JsonObject:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class RunResult:
    """The content of one ``result.json``.

    Attributes:
        run_id: the run's id (sha256 of its canonical config, `idlab.runs.run_id`); "" when
            the file has none (li2018 records: the folder name is the id).
        study: the study's name ("" when absent).
        status: "ok", "diverged" (the loss went non-finite; scored as a failure) or "failed"
            (an exception; ``error`` and ``traceback`` say which). Absent in old files: "ok".
        config: the resolved run config exactly as stored (the layout run ids are hashed from);
            `run_config` parses it into a `idlab.config.RunConfig`.
        metrics: final evaluation (the task metric and the other eval keys); None = NaN.
        best: best value of the task metric over the evaluations, and its ``step``.
        curve: one mapping per log point: step, train_loss, and eval metrics when evaluated.
        steps: optimiser steps taken.
        trainable_parameters / total_parameters: counted on the trained model.
        train_time_s: seconds in the training loop; wall_time_s: seconds of the whole run
            (build, train, extract).
        peak_memory_bytes: peak memory of this run (CUDA: allocator peak; CPU: RSS growth).
        device: the device trained on; precision: the resolved train.precision
            (fp32 | tf32 | bf16-mixed | bf16).
        task_info: the task's ``describe()`` (name, metric, num_train, num_val, num_classes,
            majority_accuracy for classification).
        metric: the task metric the scores are read from (old files: task_info's, else "accuracy");
            higher_is_better: its direction.
        method_info: method details (subspace: head, head_module, layout, kernel).
        converged: the validation metric plateaued (`idlab.training.convergence`) or a patience
            stop; None when not recorded. convergence: the rule's detail
            (converged, early_stopped, gain, reason, rule).
        error: why the run failed or diverged (None when ok); traceback: of a failure.
        started_at / finished_at: UTC ISO-8601 timestamps.
        versions: torch, transformers, peft, idlab versions; git_commit, hostname, python,
            cuda_visible_devices: where it ran (`idlab.methods.environment`).
        artifacts: every other file of the run folder with size and sha256 (`RunStore.write`);
            None in results written before the list existed.
        slurm: where a Slurm array task ran it (job_id, array_job_id, array_task_id, node, partition,
            stdout, stderr: `idlab.sweep.slurm.slurm_record`); None elsewhere and in older files.
        exact_match / exact_match_before: instruction tasks with ``task.generate_subset``: the share of
            the fixed generation subset answered exactly after training / by the pretrained model
            (`idlab.data.instruct`); None elsewhere and in older files.
        general_loss_before / general_loss_after: instruction tasks: next-token loss (nats) on held-out
            blocks of the general corpus (``task.forgetting_corpus``) before / after training; `forgetting`
            is their difference. None elsewhere.
        generation: the generation's details (n, correct, extractor, max_new_tokens, seconds, new_tokens,
            file: ``generations.jsonl`` beside result.json); None elsewhere.
        extra: keys no field names, kept and written back as they are.
        layout: keys `to_dict` writes (those of the file read); None: the layout of
            `idlab.methods.execute_run` for ``status``. Not compared.
    """

    run_id: str = ""
    study: str = ""
    status: Status = "ok"
    config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Number] = field(default_factory=dict)
    best: Mapping[str, Number] = field(default_factory=dict)
    curve: Sequence[Mapping[str, Number]] = ()
    steps: int | None = None
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    train_time_s: float | None = None
    wall_time_s: float | None = None
    peak_memory_bytes: int | None = None
    device: str | None = None
    precision: str | None = None
    task_info: Mapping[str, Any] = field(default_factory=dict)
    metric: str = "accuracy"
    higher_is_better: bool = True
    method_info: Mapping[str, Any] = field(default_factory=dict)
    converged: bool | None = None
    convergence: Mapping[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    versions: Mapping[str, str | None] = field(default_factory=dict)
    git_commit: str | None = None
    hostname: str | None = None
    python: str | None = None
    cuda_visible_devices: str | None = None
    artifacts: tuple[ArtifactEntry, ...] | None = None
    slurm: Mapping[str, Any] | None = None
    exact_match: float | None = None
    exact_match_before: float | None = None
    general_loss_before: float | None = None
    general_loss_after: float | None = None
    generation: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    layout: tuple[str, ...] | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ reading and writing

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> RunResult:
        """Parse a result.json object; missing keys take the defaults (see the class docstring).

        Raises `ResultFormatError` when a known key has a value of the wrong type.
        """
        if not isinstance(raw, Mapping):
            raise ResultFormatError(f"a result is a JSON object, got {type(raw).__name__}")
        status = raw.get("status", "ok")
        if status not in ("ok", "diverged", "failed"):
            raise ResultFormatError(f"status {status!r} is not one of ok, diverged, failed")
        task_info = _mapping(raw, "task_info")
        metric = raw.get("metric") or task_info.get("metric") or "accuracy"
        hib = raw.get("higher_is_better", True)
        conv = raw.get("convergence")
        return cls(
            run_id=_str(raw, "run_id") or "", study=_str(raw, "study") or "", status=cast(Status, status),
            config=_mapping(raw, "config"), metrics=_numbers(raw, "metrics"), best=_numbers(raw, "best"),
            curve=_curve(raw.get("curve")), steps=_int(raw, "steps"),
            trainable_parameters=_int(raw, "trainable_parameters"), total_parameters=_int(raw, "total_parameters"),
            train_time_s=_float(raw, "train_time_s"), wall_time_s=_float(raw, "wall_time_s"),
            peak_memory_bytes=_int(raw, "peak_memory_bytes"), device=_str(raw, "device"),
            precision=_str(raw, "precision"), task_info=task_info, metric=str(metric),
            higher_is_better=True if hib is None else bool(hib), method_info=_mapping(raw, "method_info"),
            converged=_bool(raw.get("converged")),
            convergence=None if conv is None else _mapping(raw, "convergence"),
            error=_str(raw, "error"), traceback=_str(raw, "traceback"), started_at=_str(raw, "started_at"),
            finished_at=_str(raw, "finished_at"), versions=cast("dict[str, str | None]", _mapping(raw, "versions")),
            git_commit=_str(raw, "git_commit"), hostname=_str(raw, "hostname"), python=_str(raw, "python"),
            cuda_visible_devices=_str(raw, "cuda_visible_devices"), artifacts=_artifacts(raw.get("artifacts")),
            slurm=None if raw.get("slurm") is None else _mapping(raw, "slurm"),
            exact_match=_float(raw, "exact_match"), exact_match_before=_float(raw, "exact_match_before"),
            general_loss_before=_float(raw, "general_loss_before"),
            general_loss_after=_float(raw, "general_loss_after"),
            generation=None if raw.get("generation") is None else _mapping(raw, "generation"),
            extra={k: v for k, v in raw.items() if k not in _FIELD_KEYS},
            layout=tuple(k for k in raw if k in _FIELD_KEYS),
        )

    def to_dict(self) -> JsonObject:
        """The result.json object (plain dicts and lists; `idlab.runs.atomic_write_json` sorts the keys)."""
        if self.layout is not None:
            keys = list(self.layout)
        else:
            keys = list(ALWAYS_KEYS) + (list(TRAINED_KEYS) if self.status != "failed" else [])
        keys += [k for k in OPTIONAL_KEYS if getattr(self, k) is not None and k not in keys]
        out: JsonObject = {k: _plain(getattr(self, k)) for k in keys}
        if "artifacts" in out and self.artifacts is not None:
            out["artifacts"] = [a.to_dict() for a in self.artifacts]
        out.update({k: _plain(v) for k, v in self.extra.items()})
        return out

    def replace(self, **changes: Any) -> RunResult:
        """A copy with ``changes`` (`dataclasses.replace`); the layout is kept."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ typed helpers

    def run_config(self) -> RunConfig:
        """``config`` parsed into a `idlab.config.RunConfig` (raises on a config that is not one)."""
        from idlab.config.run import RunConfig

        return RunConfig.from_dict(self.config)

    def score(self, kind: ScoreKind | str = "final") -> float | None:
        """The run's final (``kind="final"``: ``metrics``) or best (``"best"``) value of ``metric``, or its
        end-of-run ``exact_match`` (instruction tasks); None when absent or not finite (the score the sweep and
        the report read)."""
        v = self.exact_match if kind == "exact_match" else (self.best if kind == "best" else self.metrics).get(
            self.metric)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    @property
    def best_step(self) -> Number:
        """Step of the best evaluation (None when not recorded)."""
        return self.best.get("step")

    @property
    def head(self) -> str | None:
        """The head mode of a subspace run (method_info, else the config's ``head``)."""
        h = self.method_info.get("head", self.config.get("head"))
        return None if h is None else str(h)

    @property
    def forgetting(self) -> float | None:
        """``general_loss_after - general_loss_before`` (nats; > 0: the general corpus got harder)."""
        if self.general_loss_before is None or self.general_loss_after is None:
            return None
        return self.general_loss_after - self.general_loss_before

    @property
    def majority_accuracy(self) -> float | None:
        """Dev accuracy of always predicting the majority training class (classification tasks)."""
        v = self.task_info.get("majority_accuracy")
        return float(v) if isinstance(v, (int, float)) else None


_FIELD_KEYS = frozenset(f.name for f in dataclasses.fields(RunResult)) - {"extra", "layout"}


def _plain(v: object) -> JsonValue:
    """Mappings to dicts, sequences to lists (recursively): what json.dumps writes."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return cast(JsonScalar, v)  # the fields' leaves are JSON scalars (from_dict / execute_run)


def _numbers(raw: Mapping[str, object], key: str) -> dict[str, Number]:
    """`_mapping` of a metrics object (numbers or null by the result.json contract; not checked)."""
    return cast("dict[str, Number]", _mapping(raw, key))


def _mapping(raw: Mapping[str, object], key: str) -> JsonObject:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ResultFormatError(f"{key} must be an object, got {type(v).__name__}")
    return dict(v)


def _str(raw: Mapping[str, object], key: str) -> str | None:
    v = raw.get(key)
    return None if v is None else str(v)


def _int(raw: Mapping[str, object], key: str) -> int | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ResultFormatError(f"{key} must be an integer, got {v!r}")
    return int(v)


def _float(raw: Mapping[str, object], key: str) -> float | None:
    v = raw.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ResultFormatError(f"{key} must be a number, got {v!r}")
    return float(v)


def _bool(v: object) -> bool | None:
    return None if v is None else bool(v)


def _curve(v: object) -> tuple[dict[str, Number], ...]:
    if v is None:
        return ()
    if not isinstance(v, (list, tuple)) or not all(isinstance(p, Mapping) for p in v):
        raise ResultFormatError("curve must be a list of objects")
    return tuple(dict(p) for p in v)


def _artifacts(v: object) -> tuple[ArtifactEntry, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise ResultFormatError("artifacts must be a list")
    try:
        return tuple(ArtifactEntry(str(e["path"]), int(e["bytes"]), str(e["sha256"])) for e in v)
    except (KeyError, TypeError, ValueError) as e:
        raise ResultFormatError(f"artifacts entries need path, bytes and sha256 ({type(e).__name__}: {e})") from e


def as_result(result: RunResult | Mapping[str, object]) -> RunResult:
    """``result`` itself, or a mapping parsed by `RunResult.from_dict`."""
    return result if isinstance(result, RunResult) else RunResult.from_dict(result)


__all__ = ["ALWAYS_KEYS", "OPTIONAL_KEYS", "TRAINED_KEYS", "ArtifactEntry", "ResultFormatError", "RunResult",
           "ScoreKind", "Status", "as_result"]
