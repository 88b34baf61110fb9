"""Checks a whole study passes before any run starts (`check_study`).

`idlab.config.loader` checks that every key and value is of the right type; this module
checks that the study can run at all, without training or downloading anything:

- the task name: a built-in task, ``glue/<a GLUE task idlab knows>``, ``text/pydoc`` or
  ``text/<an existing text file>``, or an importable ``package.module:function``;
- the model/task fit: the from-scratch models (mlp, mnist-fc, lenet) need a built-in
  (tensor) task, pretrained models (an alias, a Hugging Face name or a folder) need a
  ``glue/`` or ``text/`` task -- so a typo never falls through to a hub download;
- the model files: an offline alias's package is installed, a folder exists, and with
  ``HF_HUB_OFFLINE=1`` a Hugging Face name is in the local cache (`idlab.models.resolve_model_name`);
- a GLUE ``data_dir`` (or ``$IDLAB_GLUE_DIR``) is an existing folder;
- an instruction task (``gsm8k``, ``instruct/<source>``; `check_instruct`): its splits hold the mapped
  fields, the extractor finds an answer in some gold response, the generation subset fits the eval
  split, and ``chat_template: model`` has a tokenizer with a chat template; its keys are refused on
  other tasks.

Each failure is a `ConfigError` naming the key, the value and the fix; the sweep calls
`check_study` before it writes ``study.json`` or any run folder, and ``idlab sweep`` exits 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import cast

from idlab.config.schema import (
    BUILTIN_TASKS,
    TASK_PRESETS,
    ConfigError,
    StudyConfig,
    TaskConfig,
    instruct_options,
    is_instruct,
    is_text_task,
)
from idlab.data.chat import Tokenizer
from idlab.data.instruct import InstructOptions

#: models trained from scratch on a built-in tensor task (`idlab.methods`)
SCRATCH_MODELS = ("mlp", "mnist-fc", "lenet", "toy")


def _where(study: StudyConfig, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{_SOURCE.get(id(study), f'study {study.name!r}')}: key '{key}': {msg}")


#: where a study came from (file and overrides), for error messages; set by `check_task(where=...)`
_SOURCE: dict[int, str] = {}


def _check_factory(study: StudyConfig, key: str, spec: str) -> None:
    mod, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise _where(study, key, f"got {spec!r}, which cannot be imported ({e}); give "
                     "'package.module:function' of a module on PYTHONPATH") from None
    if not callable(obj):
        raise _where(study, key, f"{spec!r} is not callable; give a function returning the object")


def check_task(study: StudyConfig, where: str | None = None) -> None:
    """The task name names a task idlab can build (see the module docstring); ``where`` names the source."""
    if where is not None:
        _SOURCE[id(study)] = where
    try:
        _check_task(study)
    finally:
        _SOURCE.pop(id(study), None)


def _check_task(study: StudyConfig) -> None:
    t = study.task.name
    if ":" in t:
        _check_factory(study, "task.name", t)
        return
    if t in BUILTIN_TASKS:
        return
    if t.startswith("glue/"):
        from idlab.data.glue import GLUE_TASKS, glue_spec

        try:
            glue_spec(t)
        except ValueError:
            known = ", ".join(f"glue/{k}" for k in GLUE_TASKS)
            raise _where(study, "task.name", f"got {t!r}, an unknown GLUE task; allowed values: {known}") from None
        data_dir = study.task.data_dir or os.environ.get("IDLAB_GLUE_DIR")
        if data_dir and not Path(data_dir).expanduser().is_dir():
            src = "task.data_dir" if study.task.data_dir else "$IDLAB_GLUE_DIR"
            raise _where(study, "task.data_dir", f"{src} = {data_dir!r} is not a folder; point it at a folder "
                         "in the GLUE tsv layout (e.g. ../shared/data/glue) or unset it to use `datasets`")
        return
    if is_instruct(t):
        if t.startswith("instruct/") and len(t) == len("instruct/"):
            raise _where(study, "task.name", "got 'instruct/'; name the data: instruct/<Hugging Face dataset name, "
                         ".jsonl/.json/.parquet file or folder>")
        return
    if t.startswith("text/"):
        src = t.split("/", 1)[1]
        if src != "pydoc" and not Path(src).expanduser().is_file():
            raise _where(study, "task.name", f"got {t!r}; allowed values: text/pydoc or text/<path of a text file>")
        return
    raise _where(study, "task.name", f"got {t!r}; allowed values: {', '.join(BUILTIN_TASKS + TASK_PRESETS)}, "
                 "glue/<name>, text/<corpus>, instruct/<dataset>, or package.module:function")


def check_model(study: StudyConfig) -> None:
    """The model fits the task and its files are there (no network call, nothing downloaded)."""
    m, t = study.model.name, study.task.name
    if ":" in m:
        _check_factory(study, "model.name", m)
        return
    text_task = is_text_task(t)
    if m in SCRATCH_MODELS:
        if text_task:
            raise _where(study, "model.name", f"got {m!r} (trained from scratch on tensor inputs), but the task "
                         f"{t!r} is a text task; use a pretrained model (minilm-l6, smollm2-135m, a Hugging Face "
                         f"name or folder) or a tensor task ({', '.join(BUILTIN_TASKS)})")
        return
    if not text_task and ":" not in t:
        raise _where(study, "model.name", f"got {m!r} (a pretrained language model), but the task {t!r} has tensor "
                     f"inputs; use a from-scratch model ({', '.join(SCRATCH_MODELS[:3])}) or a glue/, text/ or "
                     "instruction task (gsm8k, instruct/<dataset>)")
    from idlab.models import OFFLINE_ALIASES, minilm_dir, resolve_model_name, smollm2_gguf_path

    try:
        if m == "smollm2-135m":
            smollm2_gguf_path()
        elif m in OFFLINE_ALIASES:
            minilm_dir()
        else:
            resolve_model_name(m)
    except (FileNotFoundError, ValueError) as e:
        raise _where(study, "model.name", str(e)) from None


def _tokenizer(name: str) -> Tokenizer:
    from transformers import AutoTokenizer

    from idlab.models import resolve_model_name

    tok: Tokenizer = cast("Tokenizer", AutoTokenizer.from_pretrained(resolve_model_name(name)))
    return tok


def check_instruct(study: StudyConfig) -> None:
    """An instruction task's data and template (module docstring); its keys on another task are refused.

    Reads the splits (a hub dataset is downloaded here, once, as the runs would) and, for
    ``chat_template: model``, the model's tokenizer; trains nothing and writes nothing.
    """
    task = study.task
    if study.score == "exact_match" and (not is_instruct(task.name) or instruct_options(task).generate_subset < 1):
        raise _where(study, "score", f"got 'exact_match', but task {task.name!r} "
                     + ("generates nothing (task.generate_subset: 0); set task.generate_subset to the number of "
                        "problems to score" if is_instruct(task.name) else
                        "is not an instruction task (gsm8k, instruct/<dataset>): it has no exact match; use "
                        "score: final or best"))
    if not is_instruct(task.name):
        default = TaskConfig()
        for key in (f.name for f in dataclasses.fields(InstructOptions)):
            if key != "data_dir" and getattr(task, key) != getattr(default, key):
                raise _where(study, f"task.{key}", f"got {getattr(task, key)!r}, but task.{key} applies to "
                             f"instruction tasks only ({', '.join(TASK_PRESETS)}, instruct/<dataset>), not to "
                             f"{task.name!r}; remove it")
        return
    from idlab.data.chat import ChatTemplateError, resolve_template
    from idlab.data.instruct import load_instruct_data
    from idlab.data.instruct_source import InstructDataError

    opts = instruct_options(task)
    corpus = opts.forgetting_corpus
    if corpus and corpus != "pydoc" and not Path(corpus).expanduser().is_file():
        raise _where(study, "task.forgetting_corpus", f"got {corpus!r}, which is neither pydoc nor a text file; "
                     "name a UTF-8 text file, use pydoc (the Python reference shipped with CPython), or null for none")
    try:
        load_instruct_data(task.name, opts, task.max_train, task.max_val)
        if opts.chat_template == "model" and ":" not in study.model.name:
            resolve_template(_tokenizer(study.model.name), "model")
    except InstructDataError as e:
        raise _where(study, e.key, str(e)) from None
    except ChatTemplateError as e:
        raise _where(study, "task.chat_template", str(e)) from None


def check_study(study: StudyConfig) -> None:
    """Every check of this module, in order; raises the first `ConfigError`."""
    check_task(study)
    check_model(study)
    check_instruct(study)


__all__ = ["SCRATCH_MODELS", "check_instruct", "check_model", "check_study", "check_task"]
