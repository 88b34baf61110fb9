"""Every shipped study file parses; the GPU recipes name the published models and run 3 seeds.

Parsing and grid expansion only: no model is loaded, nothing touches the network.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from idlab.config import StudyConfig, load_study
from idlab.methods.lora import TARGET_SETS
from idlab.sweep.driver import resolve_config_path
from idlab.sweep.grid import expand

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
RECIPES = CONFIGS / "recipes"

#: recipe file -> (published model, methods, runs before d: auto refinement)
PUBLISHED = {
    "roberta_large_mrpc.yaml": ("FacebookAI/roberta-large", ("full", "lora", "subspace"), 3 + 21 + 42),
    "tinyllama_rank_grid.yaml": ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", ("full", "lora"), 66),
    "llama2_7b_rank_grid.yaml": ("meta-llama/Llama-2-7b-hf", ("full", "lora", "subspace"), 3 + 63 + 18),
}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_into_a_study(path: Path) -> None:
    study = load_study(path)
    assert isinstance(study, StudyConfig)
    assert path.read_text().splitlines()[0].startswith("# idlab sweep ")
    assert expand(study)


def test_the_recipes_are_all_there() -> None:
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted([*PUBLISHED, "tinyllama_gsm8k.yaml"])


def test_the_gsm8k_recipe() -> None:
    """Issue 30's GPU recipe: TinyLlama-1.1B-Chat on GSM8K, the whole test split, the improvement rule."""
    study = load_study(RECIPES / "tinyllama_gsm8k.yaml")
    assert study.model.name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and study.seeds == (0, 1, 2)
    assert study.task.name == "gsm8k" and study.task.max_val is None and study.task.generate_subset == 1319
    assert study.target.rule == "improvement" and study.train.eval_at_start
    assert study.methods == ("full", "lora", "subspace") and len(expand(study)) == 54
    assert "ESTIMATE, NOT MEASURED" in (RECIPES / "tinyllama_gsm8k.yaml").read_text().split("\nname:", 1)[0]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_names_the_published_model_with_three_seeds(name: str) -> None:
    model, methods, n_runs = PUBLISHED[name]
    path = RECIPES / name
    study = load_study(path)
    assert study.model.name == model
    assert study.seeds == (0, 1, 2)
    assert study.methods == methods
    assert study.task.name == "glue/mrpc" and study.task.max_length == 128
    assert study.task.max_train is None and study.task.max_val is None  # the full splits
    assert len(expand(study)) == n_runs
    header = path.read_text().split("\nname:", 1)[0]
    assert f"idlab sweep experiments/configs/recipes/{name}" in header
    assert "ESTIMATE, NOT MEASURED" in header
    # a bare name resolves through experiments/configs/, a path as given
    assert resolve_config_path(f"recipes/{path.stem}").resolve() == path.resolve()
    assert resolve_config_path(str(path)) == path


def test_recipe_settings_that_matter() -> None:
    roberta = load_study(RECIPES / "roberta_large_mrpc.yaml")
    assert roberta.subspace.d == "auto" and roberta.subspace.projection == ("fastfood",)
    assert roberta.subspace.said == (False, True) and roberta.subspace.head == "train"
    assert roberta.subspace.auto_grid() == (10, 30, 100, 300, 1000, 3000, 10000)
    assert roberta.lora.target_modules == (TARGET_SETS["bert-qv"],)  # RoBERTa's query / value
    grid = (TARGET_SETS["qv"], TARGET_SETS["qkvo"], TARGET_SETS["all-linear"])
    for name in ("tinyllama_rank_grid.yaml", "llama2_7b_rank_grid.yaml"):
        study = load_study(RECIPES / name)
        assert study.lora.r == (1, 2, 4, 8, 16, 32, 64) and study.lora.target_modules == grid
    llama = load_study(RECIPES / "llama2_7b_rank_grid.yaml", ["target.baseline=0.85"])
    assert llama.model.dtype == "bfloat16" and llama.target.baseline == 0.85
