"""``idlab eval``: score finished runs on lm-evaluation-harness tasks (`evaluate_runs`).

Each run's trained model is rebuilt from its folder (`idlab.sweep.restore.restore_run`), merged into a
plain model of the base model's class, and handed to lm-eval as the model object
(``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)`` + ``lm_eval.simple_evaluate``: no
export round trip). Each task's scores go into the run folder's ``eval.json`` as soon as the task
finishes (`idlab.runs.evals`), so a second call runs only the tasks missing there (a task stored with
another ``--limit`` runs again). Everything is checked before anything runs: each folder is a finished
run, each task name exists (else the closest names are listed).

lm-eval is the optional ``eval`` extra (``pip install idlab[eval]``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from idlab.config import ConfigError, StudyConfig
from idlab.runs.evals import TaskScore, clean_metric, read_evals, write_eval
from idlab.sweep.build import build_task_and_model
from idlab.sweep.restore import check_run_dir, restore_run, run_tokenizer


def _lm_eval() -> object:
    try:
        import lm_eval
    except ImportError:
        raise ValueError("idlab eval needs lm-evaluation-harness: pip install 'idlab[eval]' "
                         "(lm-eval==0.4.13)") from None
    return lm_eval


def task_manager(include_path: str | Path | None = None, builtin: bool = True) -> object:
    """lm-eval's `TaskManager` over its built-in tasks (``builtin``; indexing them takes ~10 s) and the
    task YAML files under ``include_path``."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a folder of lm-eval task YAML files")
    return TaskManager(include_path=None if include_path is None else str(include_path), include_defaults=builtin)


def check_tasks(tasks: Sequence[str], manager: object) -> None:
    """ValueError naming every task lm-eval does not know, with the closest known names."""
    if not tasks:
        raise ValueError("no tasks given: --tasks T1,T2")
    known = list(cast(Any, manager).all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        lines = [f"{t!r} (close: {', '.join(difflib.get_close_matches(t, known, n=5, cutoff=0.5)) or 'none'})"
                 for t in bad]
        raise ValueError(f"lm-eval has no task {'; '.join(lines)}; `lm-eval ls tasks` lists them, "
                         "--include-path adds a folder of task YAML files")


def missing_tasks(run_dir: str | Path, tasks: Sequence[str], limit: int | None, pretrained: bool = False) -> list[str]:
    """The tasks of ``tasks`` with no score in the run's eval.json at this ``limit`` (``pretrained``: no score
    of the pretrained model)."""
    have = read_evals(run_dir, pretrained=pretrained)
    return [t for t in tasks if t not in have or have[t].limit != limit]


def score_model(model: nn.Module, tokenizer: object, task: str, manager: object, *, limit: int | None = None,
                batch_size: int = 8) -> list[TaskScore]:
    """One lm-eval task's scores of ``model`` (a plain Hugging Face causal LM): the task's own entry and, for
    a group, each of its subtasks'."""
    lm_eval = cast(Any, _lm_eval())
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager, log_samples=False)
    seconds = time.perf_counter() - t0
    if out is None:  # a non-zero rank under accelerate
        return []
    version = importlib.metadata.version("lm_eval")
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    n = out.get("n-samples", {})
    scores = []
    for name, res in out["results"].items():
        metrics = {str(k): clean_metric(v) for k, v in res.items() if k != "alias" and not isinstance(v, str)}
        eff = n.get(name, {}).get("effective") if isinstance(n.get(name), dict) else None
        scores.append(TaskScore(str(name), metrics, limit, None if eff is None else int(eff), version, seconds, at))
    return scores


def evaluate_runs(run_dirs: Sequence[str | Path], tasks: Sequence[str], *, limit: int | None = None,
                  include_path: str | Path | None = None, builtin_tasks: bool = True, tokenizer: str | None = None,
                  batch_size: int = 8, device: str = "auto", pretrained: bool = False,
                  log: Callable[[str], None] = print) -> dict[Path, dict[str, TaskScore]]:
    """Score every run of ``run_dirs`` on ``tasks`` and store the scores in each run's eval.json.

    Checks first (nothing runs otherwise): every folder is a finished run, every task exists, each
    run's tokenizer is found. Then, per run with missing tasks: restore, merge, move to ``device`` (auto:
    CUDA when there is one), score each missing task and write it. With ``pretrained`` also the pretrained
    model each run started from (its base model, built as the run built it; scored once per base model
    and task in this call) into eval.json's ``pretrained`` section: forgetting on a task = after - before.
    Returns each run's scores (eval.json after the call).

    Raises:
        ValueError: the checks above, or a model that is not a causal language model.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be >= 1")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    runs = [(Path(d), check_run_dir(d)[1]) for d in run_dirs]
    manager = task_manager(include_path, builtin_tasks)
    check_tasks(tasks, manager)
    toks = {d: run_tokenizer(run, tokenizer) for d, run in runs}
    out: dict[Path, dict[str, TaskScore]] = {}
    base_scores: dict[tuple[str, str], list[TaskScore]] = {}  # (base model, task) -> its scores
    base_model: tuple[str, nn.Module] | None = None  # the last pretrained model built (one at a time)
    for d, run in runs:
        todo = missing_tasks(d, tasks, limit)
        if not todo:
            log(f"idlab eval: {d.name}: every task already scored ({', '.join(tasks)})")
        else:
            log(f"idlab eval: {d.name} ({run.label()}): {', '.join(todo)}"
                + (f" (done: {', '.join(t for t in tasks if t not in todo)})" if len(todo) < len(tasks) else ""))
            model = restore_run(d).merged().eval().to(dev)
            if not callable(getattr(model, "generate", None)) or not hasattr(model, "config"):
                raise ValueError(f"{d}: the run's model ({type(model).__name__}) is not a Hugging Face causal "
                                 "language model; lm-eval scores those")
            for t in todo:
                for score in score_model(model, toks[d], t, manager, limit=limit, batch_size=batch_size):
                    write_eval(d, score)
                    main = {k: v for k, v in score.metrics.items() if "stderr" not in k}
                    log(f"  {score.task}: " + ", ".join(f"{k} {v:.4g}" if v is not None else f"{k} -"
                                                        for k, v in main.items()))
        if pretrained:
            for t in missing_tasks(d, tasks, limit, pretrained=True):
                # the base model as the run built it: model config, task (a new head's shape) and seed (its init)
                key = (f"{run.model!r}|{run.task.name}|{run.seed}", t)
                if key not in base_scores:
                    log(f"idlab eval: the pretrained {run.model.name}: {t}")
                    if base_model is None or base_model[0] != key[0]:
                        base_model = (key[0], build_task_and_model(run)[1].eval().to(dev))
                    base_scores[key] = score_model(base_model[1], toks[d], t, manager, limit=limit,
                                                   batch_size=batch_size)
                for score in base_scores[key]:
                    write_eval(d, score, pretrained=True)
        out[d] = read_evals(d)
    return out


def check_study_eval(study: StudyConfig) -> None:
    """A study's ``eval`` block against lm-eval, before anything is written: lm-eval installed, every task
    known (close names listed), ``limit`` >= 1. Raises ConfigError naming the key and the fix."""
    ev = study.eval
    if not ev.tasks:
        return
    if ev.limit is not None and ev.limit < 1:
        raise ConfigError(f"study {study.name!r}: key 'eval.limit': got {ev.limit}; must be >= 1 (or null: all)")
    try:
        check_tasks(ev.tasks, task_manager(ev.include_path, ev.builtin_tasks))
    except ValueError as e:
        raise ConfigError(f"study {study.name!r}: key 'eval.tasks': {e}") from None


def evaluate_study(study: StudyConfig, run_dirs: Sequence[Path], log: Callable[[str], None] = print) -> None:
    """Score the finished runs ``run_dirs`` of ``study`` on its ``eval.tasks`` (`evaluate_runs`, on this host's
    device); runs already scored are skipped. Nothing to do without tasks or runs."""
    ev = study.eval
    if not ev.tasks or not run_dirs:
        return
    log(f"eval: {len(run_dirs)} finished run(s) on lm-eval task(s) {', '.join(ev.tasks)}"
        + (f" (limit {ev.limit})" if ev.limit else ""))
    evaluate_runs(run_dirs, ev.tasks, limit=ev.limit, include_path=ev.include_path, builtin_tasks=ev.builtin_tasks,
                  tokenizer=ev.tokenizer, batch_size=ev.batch_size, device=study.device, pretrained=ev.pretrained,
                  log=log)


__all__ = ["check_study_eval", "check_tasks", "evaluate_runs", "evaluate_study", "missing_tasks", "score_model",
           "task_manager"]
