"""Study configuration: YAML + overrides -> frozen dataclasses; grid expansion; clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idlab.config import (
    ConfigError,
    describe_fields,
    load_study,
    parse_override,
    study_from_dict,
)
from idlab.methods.lora import TARGET_SETS, alpha_value
from idlab.sweep.grid import expand

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path: Path) -> None:
    study = load_study(path)
    assert path.read_text().splitlines()[0].startswith("# idlab sweep ")
    assert expand(study)


def test_smoke_grid_expansion_counts_and_overrides() -> None:
    study = load_study(CONFIGS / "smoke.yaml")
    runs = expand(study)
    per = {m: sum(c.method == m for _, c in runs) for m in ("full", "lora", "subspace")}
    s = len(study.seeds)
    assert per == {"full": len(study.full.lr) * s, "lora": len(study.lora.r) * len(study.lora.lr) * s,
                   "subspace": len(study.subspace.d) * s}  # type: ignore[arg-type]
    over = load_study(CONFIGS / "smoke.yaml", ["lora.r=[2,4,8]", "train.steps=5", "seeds=[0,1,2]",
                                                "methods=[lora]", "lora.target_modules=[qv, qkvo]"])
    assert over.lora.r == (2, 4, 8) and over.train.steps == 5 and over.seeds == (0, 1, 2)
    assert over.lora.target_modules == (TARGET_SETS["qv"], TARGET_SETS["qkvo"])
    runs = expand(over)
    assert len(runs) == 3 * 2 * 3 and {c.axes.target_set for _, c in runs} == {"qv", "qkvo"}  # type: ignore[attr-defined]
    assert all(c.axes.lora_alpha == 2 * c.axes.r for _, c in runs)  # type: ignore[attr-defined]  # lora_alpha: 2r
    assert len({rid for rid, _ in runs}) == len(runs)
    # frozen
    with pytest.raises(AttributeError):
        over.seeds = (1,)  # type: ignore[misc]


def test_scalars_aliases_and_auto() -> None:
    s = study_from_dict({"model": "smollm2-135m", "task": "glue/mrpc", "lora": {"r": 4, "lora_alpha": 16},
                         "subspace": {"d": "auto", "auto_min": 10, "auto_max": 1000, "auto_per_decade": 2},
                         "methods": ["lora", "subspace"]})
    assert s.model.name == "smollm2-135m" and s.task.name == "glue/mrpc" and s.lora.r == (4,)
    assert alpha_value(s.lora.lora_alpha, 4) == 16.0
    assert s.subspace.auto_grid() == (10, 30, 100, 300, 1000)
    assert sorted({c.axes.d for _, c in expand(s) if c.method == "subspace"})  # type: ignore[attr-defined] == [10, 30, 100, 300, 1000]
    assert parse_override("train.lr=1e-3") == ("train.lr", "1e-3")  # YAML string; coerced to float by the schema
    assert study_from_dict({"full": {"lr": "1e-3"}}).full.lr == (1e-3,)
    assert study_from_dict({"model": {"name": "smollm2-135m"}}) == study_from_dict({"model": "smollm2-135m"})
    empty = study_from_dict({"lora": None, "slurm": None})  # an empty block: its defaults
    assert empty.lora == study_from_dict({}).lora and empty.slurm == study_from_dict({}).slurm
    typed = study_from_dict({"subspace": {"said": True, "d": 30}, "train": {"epochs": 2, "grad_clip": "1e0"}})
    assert typed.subspace.said == (True,) and typed.subspace.d == (30,)
    assert isinstance(typed.train.epochs, float) and typed.train.grad_clip == 1.0


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("lora.rr=3", ["smoke.yaml", "lora.rr", "unknown key", "r, target_modules, lora_alpha"]),
        ("lora.alpha=16", ["lora.alpha", "renamed", "lora.lora_alpha"]),
        ("lora.dropout=0.1", ["lora.dropout", "renamed", "lora.lora_dropout"]),
        ("subspace.threshold=0.8", ["subspace.threshold", "renamed", "target.threshold"]),
        ("subspace.projection=[gauss]", ["smoke.yaml", "subspace.projection", "dense, sparse, fastfood"]),
        ("methods=[full, adapters]", ["methods", "full", "lora", "subspace"]),
        ("executor=kubernetes", ["executor", "local", "multigpu", "slurm"]),
        ("lora.r=[0]", ["lora.r", ">= 1"]),
        ("train.steps=many", ["train.steps", "integer"]),
        ("task.name=imagenet", ["task.name", "digits", "glue/<name>"]),
        ("lora.lora_alpha=twice", ["lora.lora_alpha", "2r"]),
        ("lora.target_modules=[qkv0, qv]", ["lora.target_modules[0]", "allowed aliases", "qkvo"]),
        ("subspace.said=[maybe]", ["subspace.said[0]", "true, false"]),
        ("subspace.said=['yes', 1]", ["subspace.said[0]", "'yes'", "true, false"]),  # true/false only
        ("subspace.said=[false, 1]", ["subspace.said[1]", "true, false"]),
        ("lora.r=[4, true]", ["lora.r[1]", "True", "integer"]),
        ("train.steps=2.5", ["train.steps", "2.5", "integer"]),  # not truncated
        ("train.steps=0", ["key 'train'", "steps must be >= 1"]),  # TrainConfig's own check
        ("lora.r=[]", ["lora.r", "empty list"]),
        ("subspace.d=aut", ["subspace.d", "'aut'", "integer", "'auto'"]),
        ("model=[mlp]", ["key 'model'", "mapping", "name, hidden, dtype"]),
        ("train.betas=[0.9]", ["train.betas'", "[0.9]", "too few values"]),
        ("train.betas=[0.9, 0.99, 0.999]", ["train.betas", "at most 2 values"]),
        ("full.lr=fast", ["full.lr[0]", "'fast'", "number"]),
        ("train.nosuch=1", ["train.nosuch", "allowed keys under 'train'", "batch_size"]),
        ("method_settings={}", ["method_settings", "unknown key", "lora, subspace"]),
        ("nonsense", ["key=value"]),
    ],
)
def test_invalid_values_name_file_key_and_allowed(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_study(CONFIGS / "smoke.yaml", [override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_invalid_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("# idlab sweep bad.yaml\nname: x\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*lora.rank.*allowed keys under 'lora'"):
        load_study(bad)
    with pytest.raises(ConfigError, match="no such study file"):
        load_study(tmp_path / "absent.yaml")


def test_every_field_has_help() -> None:
    lines = describe_fields()
    assert len(lines) > 40
    assert all(not line.rstrip().endswith(":") for line in lines)  # a help text after every key


def _sweep_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "idlab.cli", "sweep", str(CONFIGS / "smoke.yaml"), f"results_dir={tmp_path}",
           *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize(("overrides", "words"), [
    (["task.name=glue/mrcp"], ["task.name", "glue/mrcp", "glue/mrpc"]),  # a typo: the value and the allowed ones
    (["task.name=glue/mrpc"], ["model.name", "'mlp'", "text task", "minilm-l6"]),  # default mlp on a text task
    (["model.name=minilm-l6"], ["model.name", "minilm-l6", "tensor inputs", "mlp"]),  # text model on digits
    (["model.name=no-such-model-xyz", "task.name=glue/mrpc"], ["model.name", "no-such-model-xyz"]),
])
def test_a_study_that_cannot_run_exits_2_before_writing_anything(
        tmp_path: Path, overrides: list[str], words: list[str]) -> None:
    t0 = time.perf_counter()
    out = _sweep_cli(tmp_path, *overrides)
    assert out.returncode == 2, out.stdout + out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)
    assert list(tmp_path.iterdir()) == []  # no study.json, no run folder
    assert time.perf_counter() - t0 < 60  # no hub retries (they took ~50 s per run)


def test_check_study_never_loads_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default mlp model on a GLUE task is refused by the check, not by a hub download per run."""
    import idlab.models
    from idlab.config.checks import check_study

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("check_study must not load a model")

    monkeypatch.setattr(idlab.models, "load_model", boom)
    with pytest.raises(ConfigError, match=r"model\.name"):
        check_study(study_from_dict({"task": "glue/mrpc"}))
    check_study(study_from_dict({"task": "digits"}))  # the defaults run


def test_smoke_config_states_the_split_sizes_of_its_data() -> None:
    import re

    from idlab.data.vision import digits_task

    header = (CONFIGS / "smoke.yaml").read_text()
    m = re.search(r"([\d,]+) train / ([\d,]+) val", header)
    assert m is not None
    task = digits_task(flatten=True)
    assert (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) == (task.num_train, len(task.y_val))


def test_make_help_lists_every_target() -> None:
    import re

    text = (CONFIGS.parents[1] / "Makefile").read_text()
    phony = re.search(r"^\.PHONY: (.*)$", text, re.M)
    assert phony is not None
    help_text = text[text.index("\nhelp:"):]
    for target in phony.group(1).split():
        assert re.search(rf"(\s|:){re.escape(target)}[\s:]", help_text), target
