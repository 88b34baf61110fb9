"""A finished run's trained model, rebuilt from its run folder (`restore_run`): the inverse of `execute_run`.

The base model is built the way the run built it (`idlab.sweep.build.build_task_and_model`, seeded by
the run's seed), wrapped by the run's method with the run's axes and seed (`Method.prepare`: the same
LoRA / PEFT config, the same projection P), and the method's own `Prepared.load` reads the trained state
back from the folder: ``adapter/`` (LoRA and the PEFT family), ``subspace.safetensors`` (theta_d, SAID
lambdas, a directly trained head), ``delta.safetensors`` (full fine-tuning: W_0 + Delta W of the linear
weights; the other parameters, which the run folder does not hold, stay at their pretrained values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from idlab import methods
from idlab.config.run import RunConfig
from idlab.methods import Prepared
from idlab.runs import RESULT_FILE, RunResult, artifact_problem, read_result
from idlab.sweep.build import build_task_and_model


@dataclass
class Restored:
    """A run's trained model and where it came from.

    Attributes:
        prepared: the method's wrapped model holding the trained state (``prepared.model``: what trained).
        run: the run's config; result: its result.json; run_dir: its folder.
    """

    prepared: Prepared
    run: RunConfig
    result: RunResult
    run_dir: Path

    @property
    def model(self) -> nn.Module:
        """The trained model as it trained (the method's wrapper: a PEFT model, a SubspaceModel, ...)."""
        return self.prepared.model

    def merged(self) -> nn.Module:
        """The trained model as a plain module of the base model's class (`Prepared.merged`)."""
        return self.prepared.merged() if self.prepared.merged is not None else self.prepared.model


def check_run_dir(run_dir: str | Path) -> tuple[RunResult, RunConfig]:
    """The result and config of a finished run folder; ValueError naming the folder and the fix otherwise."""
    p = Path(run_dir)
    if not (p / RESULT_FILE).is_file():
        raise ValueError(f"{p}: not a run folder (no {RESULT_FILE}); pass results/<study>/runs/<run_id>")
    res = read_result(p / RESULT_FILE)
    if res is None:
        raise ValueError(f"{p}: {RESULT_FILE} is unreadable or not a run result")
    if res.status != "ok":
        raise ValueError(f"{p}: run status {res.status!r}; only a finished run (status 'ok') has a trained model")
    prob = artifact_problem(p, res)
    if prob is not None:
        raise ValueError(f"{p}: {prob}; the next sweep trains this run again")
    try:
        run = RunConfig.from_dict(res.config)
    except Exception as e:  # an unknown method, a config from an older layout
        raise ValueError(f"{p}: its config cannot be read ({type(e).__name__}: {e})") from None
    return res, run


def restore_run(run_dir: str | Path) -> Restored:
    """Rebuild a finished run's trained model from its folder (module docstring), in eval mode on the CPU.

    Raises:
        ValueError: not a finished run (`check_run_dir`), or a method without `Prepared.load`.
    """
    res, run = check_run_dir(run_dir)
    _, model = build_task_and_model(run)
    prep = methods.get(run.method).prepare(model, run.axes, run.seed)
    if prep.load is None:
        raise ValueError(f"{run_dir}: method {run.method!r} does not say how to load its files (Prepared.load)")
    prep.load(Path(run_dir))
    prep.model.eval()
    return Restored(prep, run, res, Path(run_dir))


def run_tokenizer(run: RunConfig, tokenizer: str | None = None) -> object:
    """The tokenizer of a run's model: ``tokenizer`` when given (a Hugging Face name or folder, an offline
    alias, or 'package.module:function' returning one), else the run's model name's own.

    A tokenizer without a pad token gets its EOS token (`idlab.models.load_model`'s rule); one without an
    EOS token (a BERT WordPiece) gets its SEP token as EOS.

    Raises:
        ValueError: a model built by a factory ('package.module:function') or from scratch with no
            ``tokenizer`` given.
    """
    from idlab.models.hub import resolve_model_name

    name = tokenizer or run.model.name
    if ":" in name:
        if tokenizer is None:
            raise ValueError(f"the run's model {name!r} is built by a factory and has no tokenizer; "
                             "pass one (--tokenizer NAME_OR_FOLDER or package.module:function)")
        from idlab.sweep.build import _import_object

        tok: Any = _import_object(name)()
    elif tokenizer is None and name in ("mlp", "mnist-fc", "lenet", "toy"):
        raise ValueError(f"the run's model {name!r} is not a language model")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_name(name))
    if tok.eos_token is None and getattr(tok, "sep_token", None) is not None:
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


__all__ = ["Restored", "check_run_dir", "restore_run", "run_tokenizer"]
