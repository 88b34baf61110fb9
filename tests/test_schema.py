"""The JSON Schema of a study file (``idlab schema``): every shipped config validates against it,
mistakes fail it, and it carries every key ``idlab sweep --help-config`` lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from idlab import methods
from idlab.cli import main
from idlab.config import describe_fields
from idlab.config.jsonschema import study_schema

jsonschema = pytest.importorskip("jsonschema")

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = study_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: Any, study: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(study)]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates_against_the_schema(validator: Any, path: Path) -> None:
    assert _errors(validator, yaml.safe_load(path.read_text())) == []


def test_the_shortcuts_a_study_file_may_use_validate(validator: Any) -> None:
    study = {"model": "smollm2-135m", "task": {"name": "glue/mrpc"}, "lora": {"r": 4, "lora_alpha": 16,
             "target_modules": ["qv", ["q_proj", "v_proj"]]}, "subspace": {"d": "auto", "said": [False, True]},
             "full": {"lr": "1e-3"}, "train": {"steps": 10, "betas": [0.9, 0.99]}, "slurm": None}
    assert _errors(validator, study) == []


@pytest.mark.parametrize(("study", "words"), [
    ({"lora": {"rank": 4}}, ["lora", "rank"]),  # an unknown key in a method block
    ({"nmae": "x"}, ["nmae"]),  # at the top level
    ({"train": {"lr": 0.1}}, ["train", "lr"]),  # a per-run field is not a study key
    ({"method_settings": {}}, ["method_settings"]),  # an internal field neither
    ({"executor": "kubernetes"}, ["executor", "kubernetes"]),  # a wrong enum value
    ({"subspace": {"projection": ["gauss"]}}, ["projection", "gauss"]),
    ({"train": {"precision": "fp16"}}, ["precision", "fp16"]),
    ({"subspace": {"said": ["maybe"]}}, ["said", "maybe"]),
    ({"lora": {"r": [1.5]}}, ["r", "1.5"]),
    ({"full": {"lr": "fast"}}, ["lr", "fast"]),
    ({"methods": ["full", "adapters"]}, ["methods", "adapters"]),  # not a registered method
])
def test_mistakes_fail_the_schema(validator: Any, study: dict[str, Any], words: list[str]) -> None:
    errors = _errors(validator, study)
    assert errors, study
    for w in words:
        assert any(w in e for e in errors), (w, errors)


def test_help_text_defaults_enums_and_closed_objects() -> None:
    schema = study_schema()
    defs = schema["$defs"]
    assert schema["additionalProperties"] is False and all(d["additionalProperties"] is False for d in defs.values())
    train = defs["TrainConfig"]["properties"]
    assert train["optimizer"]["enum"] == ["adam", "adamw", "sgd"] and train["optimizer"]["default"] == "adamw"
    assert "lr" not in train and "seed" not in train  # set per run
    assert schema["properties"]["executor"]["enum"] == ["local", "multigpu", "slurm", "torchrun"]
    assert "method_settings" not in schema["properties"]
    for name in methods.names():
        assert methods.get(name).help in schema["properties"][name]["description"]
    assert "ranks to sweep" in defs["LoraSettings"]["properties"]["r"]["description"]


def test_schema_has_every_key_of_help_config() -> None:
    """``describe_fields`` (``idlab sweep --help-config``) and the schema list the same keys."""
    schema = study_schema()

    def keys(node: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for k, prop in node["properties"].items():
            out.add(prefix + k)
            ref = next((c["$ref"] for c in prop.get("anyOf", [prop]) if "$ref" in c), None)
            if ref:
                out |= keys(schema["$defs"][ref.rsplit("/", 1)[1]], f"{prefix}{k}.")
        return out

    listed = {line.strip().split(" ", 1)[0].rstrip(":") for line in describe_fields()}
    assert listed == keys(schema)
    assert {"lora.target_modules", "subspace.d", "train.steps", "model.name", "slurm.partition"} <= listed


def test_idlab_schema_writes_a_file_that_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas" / "study.schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == study_schema()
    said = capsys.readouterr().out
    assert str(out) in said and "# yaml-language-server: $schema=" in said
    assert main(["schema"]) == 0  # no --out: printed
    assert json.loads(capsys.readouterr().out) == study_schema()
