"""The report's view of instruction tasks (issue 30 item 5): summary columns equal result.json and eval.json,
the exact-match / forgetting table, score-vs-forgetting and forgetting-vs-intruders figures, determinism,
and a study without these fields gets none of it."""

from __future__ import annotations

import hashlib
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from idlab.config import study_from_dict
from idlab.report import load_results, make_report
from idlab.report.instruct import INSTRUCT_COLS, instruct_table
from idlab.runs import RESULT_FILE, atomic_write_json, iter_results, read_result
from idlab.runs.evals import TaskScore, write_eval
from idlab.sweep.driver import run_sweep
from tests.instruct_fixtures import llama_dir, write_data

FIGS = ("score_vs_forgetting", "forgetting_vs_intruders")
EVAL_COL = "eval_gsm8k_exact_match,strict-match"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny instruct sweep (tiny Llama, full + LoRA r 1, 2, seeds 0 and 1, 3 steps) and an eval.json on two runs."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("instruct")
    mp.setenv("IDLAB_CACHE", str(root / "cache"))
    model, data = llama_dir(root / "llama"), write_data(root / "data")
    raw = {
        "name": "instruct", "model": str(model), "methods": ["full", "lora"], "full": {"lr": [1e-3]},
        "lora": {"r": [1, 2], "lr": [1e-2]},
        "task": {"name": f"instruct/{data}", "max_length": 48, "generate_subset": 4, "max_new_tokens": 5,
                 "generate_batch_size": 4, "extractor": "gsm8k", "forgetting_blocks": 4},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 3}, "seeds": [0, 1],
        "results_dir": str(root / "results"), "device": "cpu",
    }
    summary = run_sweep(study_from_dict(raw))
    mp.undo()
    assert len(summary.ok) == 6, summary.failed
    full = sorted(p.parent for p, r in iter_results(root / "results") if r.config.get("method") == "full")
    for i, d in enumerate(full):
        write_eval(d, TaskScore("gsm8k", {"exact_match,strict-match": 0.25 * i, "exact_match_stderr,strict-match": 0.1},
                                limit=4, n_samples=4))
    return root / "results"


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".png", ".pdf", ".md", ".parquet")}


def _same(a: object, b: object) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b)) or b is pd.NA
    return a == pytest.approx(b)


def test_summary_columns_equal_the_json(results: Path) -> None:
    df = load_results(results)
    assert len(df) == 6 and set(INSTRUCT_COLS) <= set(df.columns)
    assert EVAL_COL in df and "eval_gsm8k_exact_match_stderr,strict-match" in df
    for _, row in df.iterrows():
        res = read_result(Path(row["run_dir"]) / RESULT_FILE)
        assert res is not None and res.generation is not None
        for c in ("exact_match", "exact_match_before", "general_loss_before", "general_loss_after", "forgetting"):
            assert getattr(res, c) is not None and _same(getattr(res, c), row[c]), c
        assert row["generate_n"] == res.generation["n"] == 4
        has_eval = (Path(row["run_dir"]) / "eval.json").is_file()
        assert has_eval == (row["method"] == "full") and (pd.notna(row[EVAL_COL]) == has_eval)
    full = df[df["method"] == "full"].sort_values("run_dir")
    assert list(full[EVAL_COL]) == [0.0, 0.25]
    assert df[EVAL_COL].dtype == "float64" and df["forgetting"].dtype == "float64"


def test_table_rows_and_figures(results: Path, tmp_path: Path) -> None:
    out1, out2 = tmp_path / "r1", tmp_path / "r2"
    md = make_report(results, out1)
    text = md.read_text()
    df = load_results(results)
    tab = instruct_table(df, "score_final")
    assert list(zip(tab["variant"], tab["size"])) == [("LoRA qv", "r=1"), ("LoRA qv", "r=2"), ("full FT", "–")]
    full = df[df["method"] == "full"]
    row = tab[tab["variant"] == "full FT"].iloc[0]
    assert row["forgetting"] == f"{full['forgetting'].mean():.4f} ± {full['forgetting'].std(ddof=1):.4f}"
    assert row["response loss"].startswith(f"{-full['score_final'].mean():.4f} ± ")
    assert row["exact match (before → after)"].endswith("(n=4)") and " → " in row["exact match (before → after)"]
    assert "### Instruction task: response loss, exact match and forgetting" in text
    section = text.split("### Instruction task")[1].split("\n### ")[0]
    assert len([ln for ln in section.splitlines() if ln.startswith("| ")]) == 1 + 3  # header + 3 curve x size rows
    assert "### lm-evaluation-harness scores" in text and "gsm8k_exact_match,strict-match" in text
    assert "stderr" not in text.split("### lm-evaluation-harness scores")[1].split("\n### ")[0]
    for name in FIGS:
        for ext in ("png", "pdf"):
            f = out1 / "figures" / "instruct" / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
        assert f"figures/instruct/{name}.png" in text
    # determinism: the same results (and analysis tables) -> identical files
    shutil.copytree(out1 / "analysis", out2 / "analysis")
    make_report(results, out2)
    d1, d2 = _digest(out1), _digest(out2)
    assert d1 == d2, {k for k in d1 if d1[k] != d2.get(k)}


def test_no_analysis_gives_no_data_yet_for_intruders(results: Path, tmp_path: Path) -> None:
    text = make_report(results, tmp_path / "r", analysis=False, formats=("png",)).read_text()
    assert (tmp_path / "r" / "figures" / "instruct" / "score_vs_forgetting.png").is_file()
    assert not (tmp_path / "r" / "figures" / "instruct" / "forgetting_vs_intruders.png").exists()
    assert "- *Forgetting vs intruder dimensions of ΔW*: no data yet." in text


def test_study_without_these_fields_gets_none_of_it(results: Path, tmp_path: Path) -> None:
    """The same runs written back through RunResult without the instruction fields or eval.json."""
    plain = tmp_path / "plain"
    for _, res in iter_results(results):
        stripped = res.replace(study="plain", exact_match=None, exact_match_before=None, general_loss_before=None,
                               general_loss_after=None, generation=None, artifacts=None)
        d = plain / "plain" / "runs" / res.run_id
        d.mkdir(parents=True)
        atomic_write_json(d / RESULT_FILE, stripped.to_dict())
    df = load_results(plain)
    assert len(df) == 6 and all(df[c].isna().all() for c in INSTRUCT_COLS)
    assert not [c for c in df.columns if str(c).startswith("eval_")]
    text = make_report(plain, tmp_path / "out", analysis=False, formats=("png",)).read_text()
    assert "Instruction task" not in text and "lm-evaluation-harness" not in text and "vs forgetting" not in text
    assert "intruder dimensions of ΔW" not in text
    assert not list((tmp_path / "out").rglob("*forgetting*"))


def test_broken_eval_json_is_left_out_with_a_warning(results: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(results / "instruct", copy / "instruct")
    run_dir = next(p.parent for p in sorted((copy / "instruct" / "runs").glob(f"*/{RESULT_FILE}"))
                   if (p.parent / "eval.json").is_file())
    (run_dir / "eval.json").write_text("{not json")
    df = load_results(copy)
    assert len(df) == 6 and pd.isna(df.loc[df["run_id"] == run_dir.name, EVAL_COL].iloc[0])
    assert re.search(rf"warning: run {run_dir.name}: lm-eval scores left out", capsys.readouterr().err)
