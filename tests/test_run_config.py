"""RunConfig: typed runs whose ids equal the ids today's studies and stored results already have."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from idlab import methods
from idlab.config import RunConfig, load_study
from idlab.errors import ConfigError
from idlab.runs import run_id
from idlab.sweep.build import build_task_and_model
from idlab.sweep.grid import expand

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_stored_result_configs_keep_their_run_ids() -> None:
    """result.json configs written by the code before RunConfig (smoke study): same id after a round trip."""
    stored = json.loads((FIXTURES / "stored_configs_v1.json").read_text())
    assert {c["method"] for c in stored.values()} == {"full", "lora", "subspace"}
    for rid, cfg in stored.items():
        assert run_id(cfg) == rid
        run = RunConfig.from_dict(cfg)
        assert run.to_dict() == cfg and run_id(run) == rid


@pytest.mark.parametrize("case", sorted(json.loads((FIXTURES / "run_ids_v1.json").read_text())))
def test_study_expansion_keeps_the_run_ids_of_before(case: str) -> None:
    """The run ids of the shipped configs (some with overrides) equal those recorded before RunConfig,
    with ``subspace.layout=global``: the Fastfood P of every run made before layouts existed. The
    default layout "blocks" is another P, so exactly the Fastfood subspace runs get new ids."""
    want = json.loads((FIXTURES / "run_ids_v1.json").read_text())[case]
    path, *overrides = case.split(" ")
    old = expand(load_study(REPO / path, [*overrides, "subspace.layout=global"]))
    assert sorted(rid for rid, _ in old) == want
    if any(o.startswith("subspace.fastfood_state=") and not o.endswith(("=auto", "=none")) for o in overrides):
        with pytest.raises(ConfigError, match="layout 'blocks'"):  # a global-only state: refused up front
            load_study(REPO / path, overrides)
        return
    new = expand(load_study(REPO / path, overrides))
    assert len(new) == len(old)
    for (rid_old, _), (rid_new, run_new) in zip(old, new, strict=True):
        is_blocks = getattr(run_new.axes, "projection", None) == "fastfood"
        assert (rid_old != rid_new) == is_blocks
        assert run_new.to_dict().get("layout") == ("blocks" if is_blocks else None)


def test_compatibility_defaults_and_new_train_fields() -> None:
    study = load_study(REPO / "experiments/configs/smoke.yaml", ["methods=[subspace]"])
    (rid, run), *_ = expand(study)
    assert "betas" not in run.to_dict()["train"] and "device" not in run.to_dict()["train"]
    moved = dataclasses.replace(run, train=dataclasses.replace(run.train, betas=(0.9, 0.99)))
    assert moved.to_dict()["train"]["betas"] == [0.9, 0.99] and run_id(moved) != rid  # a new value is a new run
    same = dataclasses.replace(run, train=dataclasses.replace(run.train, device="cuda", progress=True))
    assert run_id(same) == rid  # where and how it runs is not what runs
    assert RunConfig.from_dict(moved.to_dict()) == moved


def test_fastfood_state_has_one_name_up_to_the_projection() -> None:
    study = load_study(REPO / "experiments/configs/smoke.yaml", ["methods=[subspace]", "subspace.layout=global",
                                                                   "subspace.fastfood_state=index"])
    (_, run), *_ = expand(study)
    assert run.axes.fastfood_state == "index" and run.to_dict()["fastfood_state"] == "index"  # type: ignore[attr-defined]
    prep = methods.get(run.method).prepare(build_task_and_model(run)[1], run.axes, run.seed)
    assert prep.model.projection_options == {"fastfood_state": "index"}
    default = load_study(REPO / "experiments/configs/smoke.yaml", ["methods=[subspace]"])
    (_, drun), *_ = expand(default)
    prep = methods.get(drun.method).prepare(build_task_and_model(drun)[1], drun.axes, drun.seed)
    assert prep.model.projection_options == {}


def test_study_train_block_is_train_config() -> None:
    from idlab.config import ConfigError
    from idlab.training.loop import TrainConfig

    study = load_study(REPO / "experiments/configs/smoke.yaml", ["train.betas=[0.9,0.99]"])
    assert isinstance(study.train, TrainConfig) and study.train.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"train\.lr.*per run.*<method>\.lr"):
        load_study(REPO / "experiments/configs/smoke.yaml", ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"train\.seed.*seeds"):
        load_study(REPO / "experiments/configs/smoke.yaml", ["train.seed=3"])
