"""Checks of a study against its model and the hub, once per study before any run (`check_runs`).

`idlab.config.checks.check_study` checks the study from its values alone; this module checks
what needs the model, still without weights, training or a download:

- the hub (`check_hub`): a Hugging Face name that is not in the local cache is tried once with
  a short timeout (`HUB_TIMEOUT_S`); unreachable, every run would retry for about a minute and fail;
- the model type against the task (`check_model_task`): an encoder (`ENCODER_TYPES`, from the
  model's config.json, `idlab.sweep.plan.model_config`) cannot train a causal-LM (``text/``) task;
- each method's block against the model's shapes (`idlab.methods.Method.check_model`): the model
  is built once on the ``meta`` device as ``idlab plan`` builds it (`idlab.sweep.plan.meta_model`).

Each failure is an `idlab.errors.ConfigError` naming the key, the value and the fix; ``idlab sweep``
exits 2 and nothing is written (`idlab.sweep.driver.run_sweep` calls `check_runs` first).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from idlab import methods
from idlab.config import StudyConfig
from idlab.config.schema import is_causal_lm_task, is_text_task
from idlab.errors import ConfigError

#: seconds the one hub request of `check_hub` may take
HUB_TIMEOUT_S = 5.0
#: ``model_type`` of encoder-only models (bidirectional attention, no causal-LM head)
ENCODER_TYPES = ("bert", "roberta", "deberta-v2", "distilbert", "electra")


def _where(study: StudyConfig) -> str:
    return f"study {study.name!r} (model {study.model.name!r}, task {study.task.name!r})"


def _pretrained(study: StudyConfig) -> bool:
    """The runs load a pretrained model by name (alias, folder or hub id), as `idlab.sweep.build` decides."""
    return is_text_task(study.task.name) and ":" not in study.model.name


def hub_name(study: StudyConfig) -> str | None:
    """The study's model as a Hugging Face repo id the runs would download, else None (an offline
    alias, a local folder, a from-scratch model or a factory, a name in the local cache, HF_HUB_OFFLINE)."""
    from idlab.models import OFFLINE_ALIASES
    from idlab.models.hub import hub_offline

    name = study.model.name
    if not _pretrained(study) or name in OFFLINE_ALIASES or hub_offline() or Path(name).expanduser().exists():
        return None  # with HF_HUB_OFFLINE=1, check_study has already looked in the cache
    from huggingface_hub import try_to_load_from_cache

    return None if isinstance(try_to_load_from_cache(name, "config.json"), str) else name


def check_hub(study: StudyConfig, timeout: float = HUB_TIMEOUT_S) -> None:
    """A hub model that is not in the local cache: one request to the hub (``timeout`` seconds), or refuse."""
    name = hub_name(study)
    if name is None:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from idlab.models import OFFLINE_ALIASES

    api = HfApi()
    try:
        api.model_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        raise ConfigError(f"{_where(study)}: key 'model.name': got {name!r}, which the Hugging Face hub "
                          f"({api.endpoint}) does not serve (no such model, or a private / gated one); check the "
                          "name, log in (`hf auth login` or HF_TOKEN) for a gated model, or use an offline alias "
                          f"({', '.join(OFFLINE_ALIASES)}) or a local folder") from None
    except HfHubHTTPError:
        return  # the hub answered: the runs download (or report) the model themselves
    except Exception as e:  # connection refused, DNS, timeout, offline mode of huggingface_hub
        raise ConfigError(
            f"{_where(study)}: key 'model.name': got {name!r}, which is not in the local Hugging Face cache, and "
            f"the hub ({api.endpoint}) cannot be reached from this host ({type(e).__name__}: {str(e)[:200]}; one "
            f"try, {timeout:g} s timeout): each run would retry for about a minute and fail. Without network, set "
            f"HF_HUB_OFFLINE=1 and use an offline alias ({', '.join(OFFLINE_ALIASES)}), a local folder written by "
            "save_pretrained, or a model already in the cache; or download it once on a machine with internet"
        ) from None


def check_model_task(study: StudyConfig) -> None:
    """A causal-LM (``text/``) task needs a decoder: refuse an encoder (`ENCODER_TYPES`) by its config.json."""
    if not (_pretrained(study) and is_causal_lm_task(study.task.name)):
        return
    from idlab.sweep.plan import model_config

    config, _ = model_config(study.model.name)
    mtype = str(getattr(config, "model_type", ""))
    archs = list(getattr(config, "architectures", None) or [])
    decoder = bool(getattr(config, "is_decoder", False)) or any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                              for a in archs)
    if mtype in ENCODER_TYPES and not decoder:
        raise ConfigError(
            f"{_where(study)}: key 'model.name': got {study.model.name!r}, a {mtype} encoder (config.json: model_type "
            f"{mtype!r}, architectures {archs}, is_decoder false), but task {study.task.name!r} trains causal "
            "language modelling, which needs a decoder; use a decoder model (e.g. model.name=smollm2-135m, or a "
            "Llama / GPT-style hub name) for this task, or a glue/ task (e.g. task.name=glue/mrpc) for this encoder")


def study_model(study: StudyConfig) -> Any:
    """The base model of the study's runs on the ``meta`` device (one build for the whole study)."""
    from idlab.sweep.grid import run_config
    from idlab.sweep.plan import meta_model

    name = study.methods[0]
    m = methods.get(name)
    settings = study.settings(name)
    cells = m.cells(settings)
    axes = cells[0] if cells else m.axes_type()
    return meta_model(run_config(study, name, axes, m.learning_rates(settings)[0], study.seeds[0]))


def check_model_shapes(study: StudyConfig, model: Any) -> None:
    """Each method's block against the model (`idlab.methods.Method.check_model`)."""
    for name in study.methods:
        methods.get(name).check_model(study.settings(name), model, _where(study))


def check_runs(study: StudyConfig) -> None:
    """`check_hub`, `check_model_task`, then every method's `check_model` on the study's meta model.

    A model that cannot be built here (a factory that raises, a broken config.json) skips the shape
    checks with a note: the runs report their own error, as before.
    """
    if not study.methods or not study.seeds:
        return
    check_hub(study)
    try:
        check_model_task(study)
        model = study_model(study)
    except ConfigError:
        raise
    except Exception as e:
        print(f"note: the model's shapes are not checked before the runs ({type(e).__name__}: {str(e)[:300]})",
              file=sys.stderr)
        return
    check_model_shapes(study, model)


__all__ = ["ENCODER_TYPES", "HUB_TIMEOUT_S", "check_hub", "check_model_shapes", "check_model_task", "check_runs",
           "hub_name", "study_model"]
