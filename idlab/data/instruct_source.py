"""Where instruction data comes from: presets, the data-folder rule, and the raw records of a split.

A source is a Hugging Face dataset name (loaded by ``datasets``, online), a local ``.jsonl`` /
``.json`` / ``.parquet`` file, or a folder holding one such file per split (``train.jsonl``,
``test.jsonl``, ...). `load_split` returns the split's records restricted to the mapped fields
(prompt, response, optional system), as strings, and refuses a split that lacks one of them with
an `InstructDataError` naming the field, the fields the data has and the key to set.

Presets (`PRESETS`) name a dataset with its fields and answer extractor: ``gsm8k`` is
``openai/gsm8k`` (config ``main``; fields ``question`` / ``answer``; extractor ``gsm8k``), read
offline from ``task.data_dir``, else ``$IDLAB_GSM8K_DIR``, else ``../shared/data/gsm8k`` beside the
repository when that folder exists, else from the hub (`preset_source`, the rule GLUE follows with
``$IDLAB_GLUE_DIR``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: extensions of local data files, in the order a folder is searched for a split
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
#: prefix of the generic instruction task: ``instruct/<HF name | file | folder>``
INSTRUCT_PREFIX = "instruct/"
#: record layouts (`task.format`): "fields" (prompt / response / system named by the task keys), "alpaca"
#: (instruction, optional input, output) and "messages" (a chat: role / content turns, the last one the
#: assistant's response)
FORMATS = ("fields", "alpaca", "messages")


class InstructDataError(ValueError):
    """Instruction data that cannot be used as configured; ``key`` is the task key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Preset:
    """A named instruction dataset: hub name and config, fields, extractor, offline folder."""

    hf_name: str
    hf_config: str | None
    prompt_field: str
    response_field: str
    extractor: str
    env: str  # environment variable naming the offline folder
    shared: str  # folder name under ../shared/data


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("openai/gsm8k", "main", "question", "answer", "gsm8k", "IDLAB_GSM8K_DIR", "gsm8k"),
}


def is_instruct_task(name: str) -> bool:
    """``gsm8k`` (a preset) or ``instruct/<source>``."""
    return name in PRESETS or name.startswith(INSTRUCT_PREFIX)


def shared_data_dir(folder: str) -> Path:
    """``<repository>/../shared/data/<folder>`` (the shared offline data beside a checkout)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / folder


def preset_source(preset: Preset, data_dir: str | None) -> tuple[str, str]:
    """THE rule for where a preset's data comes from: ``(source, how)``.

    ``data_dir`` when given, else ``$<preset.env>`` when set, else ``../shared/data/<preset.shared>``
    beside the repository when it exists, else the hub name (``how`` says which).
    """
    if data_dir:
        return str(Path(data_dir).expanduser()), "task.data_dir"
    env = os.environ.get(preset.env)
    if env:
        return str(Path(env).expanduser()), f"${preset.env}"
    shared = shared_data_dir(preset.shared)
    if shared.is_dir():
        return str(shared), "../shared/data"
    return preset.hf_name, "datasets"


def task_source(name: str, data_dir: str | None) -> tuple[str, str | None, str]:
    """``(source, preset hub config or None, how)`` of task ``name`` (a preset or ``instruct/<source>``)."""
    if name in PRESETS:
        p = PRESETS[name]
        src, how = preset_source(p, data_dir)
        return src, p.hf_config if how == "datasets" else None, how
    if not name.startswith(INSTRUCT_PREFIX) or not name[len(INSTRUCT_PREFIX):]:
        raise InstructDataError("task.name", f"got {name!r}; use {', '.join(PRESETS)} or instruct/<Hugging Face "
                                "dataset name, .jsonl/.json/.parquet file or folder>")
    return name[len(INSTRUCT_PREFIX):], None, "task.name"


def is_local(source: str) -> bool:
    """A local file or folder (else a Hugging Face dataset name)."""
    return Path(source).expanduser().exists()


def _read_file(path: Path) -> list[dict[str, object]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InstructDataError("task.name", f"{str(path)!r} line {lineno} is not JSON ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise InstructDataError("task.name", f"{str(path)!r}: every record must be a JSON object")
    return rows


def _split_file(folder: Path, split: str, key: str) -> Path:
    for suffix in DATA_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    present = sorted(p.name for p in folder.iterdir() if p.suffix in DATA_SUFFIXES)
    raise InstructDataError(key, f"folder {str(folder)!r} has no {split}.jsonl, {split}.json or {split}.parquet "
                            f"(data files there: {', '.join(present) or 'none'}); set {key} to one of their stems")


def _records(source: str, split: str, config: str | None, key: str) -> list[dict[str, object]]:
    p = Path(source).expanduser()
    if p.is_dir():
        return _read_file(_split_file(p, split, key))
    if p.is_file():  # one file: the train split is 90% of it, the eval split the other 10% (seeded)
        rows = _read_file(p)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = max(1, len(rows) // 10)
        keep = perm[n_eval:] if key == "task.train_split" else perm[:n_eval]
        return [rows[i] for i in sorted(keep)]
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(f"task source {source!r} is not a local file or folder, so it is loaded by name with "
                          "Hugging Face `datasets`, which is not installed; `pip install 'idlab[hub]'`, or give "
                          "a local .jsonl/.parquet file or folder") from None
    try:
        ds = load_dataset(source, config, split=split)
    except Exception as e:  # unknown name or config, no network, offline mode without a cached copy
        if isinstance(e, ValueError) and "split" in str(e).lower():
            raise InstructDataError(key, f"dataset {source!r} has no split {split!r} ({e}); set {key}") from None
        raise InstructDataError("task.name", f"dataset {source!r} (config {config!r}) could not be loaded with "
                                f"`datasets` ({type(e).__name__}: {str(e)[:300]}); check the name and "
                                "task.dataset_config, the network (HF_HUB_OFFLINE), or give a local .jsonl/.parquet "
                                "file or folder") from None
    return list(ds.to_list())


def from_format(row: dict[str, object], fmt: str, where: str) -> dict[str, object]:
    """One record of a named layout as ``{prompt, response, system}`` (``where`` names it in errors).

    alpaca: prompt = instruction (+ a blank line and the input when there is one), response = output.
    messages: the last turn is the assistant's response; a leading system turn is the system message;
    the user turn before the response is the prompt, earlier turns (a multi-turn chat) come before it
    as ``role: content`` lines.
    """
    if fmt == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise InstructDataError("task.format", f"got 'alpaca', but {where} has no text field "
                                    f"{', '.join(repr(m) for m in missing)}; its fields: {', '.join(map(str, row))}; "
                                    "use task.format=fields with task.prompt_field / task.response_field")
        extra = row.get("input")
        prompt = str(row["instruction"]) + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        return {"prompt": prompt, "response": row["output"], "system": ""}
    raw = row.get("messages")
    turns: list[dict[str, str]] = []
    if isinstance(raw, list) and all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                     and isinstance(t.get("content"), str) for t in raw):
        turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in raw]
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise InstructDataError("task.format", f"got 'messages', but {where} has no 'messages' list of role / "
                                "content turns ending with a user turn and the assistant's response; its fields: "
                                f"{', '.join(map(str, row))}")
    system = turns[0]["content"] if turns[0]["role"] == "system" else ""
    earlier = turns[1 if system else 0 : -2]
    context = "".join(f"{t['role']}: {t['content']}\n\n" for t in earlier)
    return {"prompt": context + turns[-2]["content"], "response": turns[-1]["content"], "system": system}


def load_split(source: str, split: str, config: str | None, fields: Sequence[tuple[str, str]],
               key: str = "task.train_split", fmt: str = "fields") -> list[dict[str, str]]:
    """The records of one split, each restricted to the mapped fields as strings.

    Args:
        source: Hugging Face dataset name, local file or folder (module docstring).
        split: the split's name (a folder's ``<split>.jsonl`` / ``.json`` / ``.parquet``).
        config: the Hugging Face config (``main`` for gsm8k), None for local data.
        fields: ``(task key, field name)`` pairs, e.g. ``("task.prompt_field", "question")``.
        key: the task key naming this split (``task.train_split`` / ``task.eval_split``) for errors.
        fmt: the records' layout (`FORMATS`); alpaca and messages become ``prompt`` / ``response`` /
            ``system`` first (`from_format`).

    Raises:
        InstructDataError: no such split or file, an empty split, or a record without a mapped field
            (naming the field, the fields present and the key to set).
    """
    rows = _records(source, split, config, key)
    if not rows:
        raise InstructDataError(key, f"split {split!r} of {source!r} is empty; set {key} to a split with records")
    if fmt != "fields":
        rows = [from_format(r, fmt, f"record {i} of split {split!r} of {source!r}") for i, r in enumerate(rows)]
    out = []
    for i, r in enumerate(rows):
        for fkey, fname in fields:
            if fname not in r or r[fname] is None:
                raise InstructDataError(fkey, f"got {fname!r}, but record {i} of split {split!r} of {source!r} has "
                                        f"no field {fname!r}; its fields: {', '.join(map(str, r))}; set {fkey} to "
                                        "the field holding that text")
        out.append({fname: str(r[fname]) for _, fname in fields})
    return out


__all__ = [
    "DATA_SUFFIXES",
    "FORMATS",
    "INSTRUCT_PREFIX",
    "PRESETS",
    "InstructDataError",
    "Preset",
    "from_format",
    "is_instruct_task",
    "is_local",
    "load_split",
    "preset_source",
    "shared_data_dir",
    "task_source",
]
