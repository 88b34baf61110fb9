"""RunResult, the typed result.json: round trips, every stored layout reads, typed crossings reach the figures."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from idlab.config import RunConfig, study_from_dict
from idlab.report.tables import CurveCrossing
from idlab.runs import (
    ALWAYS_KEYS,
    RESULT_FILE,
    TRAINED_KEYS,
    ResultFormatError,
    RunResult,
    RunStore,
    iter_result_files,
    iter_results,
    read_result,
    run_id,
)
from idlab.training.convergence import run_converged, unconverged_crossings

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh sweep: blobs + MLP, full / LoRA r 1, 2 / DID d 4, 16, seed 0 (artefacts written)."""
    from idlab.sweep.driver import run_sweep

    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(FIXTURES))
    root = tmp_path_factory.mktemp("results")
    raw = {
        "name": "row", "model": {"name": "mlp", "hidden": [8]}, "task": "idlab_fixture_tasks:blobs",
        "methods": ["full", "lora", "subspace"], "full": {"lr": [0.01]},
        "lora": {"r": [1, 2], "target_modules": [["net.0", "net.2"]], "lr": [0.02]},
        "subspace": {"d": [4, 16], "projection": ["dense"], "head": "project", "lr": [0.05]},
        "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "optimizer": "adam"},
        "seeds": [0], "results_dir": str(root), "device": "cpu",
    }
    summary = run_sweep(study_from_dict(raw))
    mp.undo()
    assert len(summary.ok) == 5
    return root


def _files(root: Path) -> list[Path]:
    return list(iter_result_files(root))


def test_fresh_results_round_trip_exactly(swept: Path) -> None:
    files = _files(swept)
    assert len(files) == 5
    for p in files:
        d = json.loads(p.read_text())
        res = RunResult.from_dict(d)
        assert res.to_dict() == d
        # built field by field (no layout): the layout execute_run writes for an ok run
        fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name != "layout"}
        assert set(RunResult(**fields).to_dict()) == set(d) == {*ALWAYS_KEYS, *TRAINED_KEYS, "artifacts"}
        assert res.status == "ok" and res.run_id == p.parent.name and res.artifacts
        assert run_id(res.run_config()) == res.run_id
        assert res.score() == d["metrics"][d["metric"]] and res.score("best") == d["best"][d["metric"]]


def test_a_failed_result_round_trips_and_has_the_failed_layout(tmp_path: Path) -> None:
    from idlab.sweep.execute import execute_run

    stored = json.loads((FIXTURES / "stored_configs_v1.json").read_text())
    run = RunConfig.from_dict({**next(iter(stored.values())), "task": "idlab_fixture_tasks:nope"})
    raw, writer = execute_run(run, "x", "s", device="cpu")
    assert writer is None
    store = RunStore(tmp_path / "s")
    store.write("x", raw)  # what run_one writes
    store.write("y", raw.to_dict())  # a mapping is accepted too
    d = json.loads((store.run_dir("x") / RESULT_FILE).read_text())
    assert set(d) == {*ALWAYS_KEYS, "traceback", "artifacts"} and d["artifacts"] == []
    res = store.result("x")
    assert res is not None and res.to_dict() == d and res.status == "failed" and res.error
    assert set(dataclasses.replace(res, layout=None).to_dict()) == set(d)
    assert res.score() is None and not store.is_done("x") and store.is_done("x", retry_failed=False)


def test_every_stored_result_reads_without_warnings(swept: Path) -> None:
    """The fresh sweep, and every result.json committed under results/ or tests/fixtures."""
    for root in (swept, REPO / "results", FIXTURES):
        warnings: list[str] = []
        found = list(iter_results(root, warn=warnings.append))
        assert warnings == [] and len(found) == len(_files(root))
        assert all(isinstance(res, RunResult) for _, res in found)


def test_an_old_layout_reads_with_defaults_and_keeps_its_keys(tmp_path: Path) -> None:
    """A result written before status / metric / precision / convergence / artifacts existed."""
    cfg = next(iter(json.loads((FIXTURES / "stored_configs_v1.json").read_text()).values()))
    old = {"run_id": run_id(cfg), "study": "smoke", "config": cfg, "metrics": {"f1": 0.5, "loss": 1.2},
           "best": {"f1": 0.75, "step": 20}, "curve": [{"step": 10, "train_loss": 1.0}],
           "task_info": {"name": "mrpc", "metric": "f1"}, "wall_time_s": 3}
    res = RunResult.from_dict(old)
    assert res.status == "ok" and res.metric == "f1" and res.higher_is_better is True
    assert res.precision is None and res.converged is None and res.artifacts is None and res.traceback is None
    assert res.score() == 0.5 and res.score("best") == 0.75 and res.best_step == 20 and res.wall_time_s == 3.0
    assert res.to_dict() == old and run_id(res.run_config()) == res.run_id
    assert RunResult.from_dict({}).metric == "accuracy"
    store = RunStore(tmp_path / "smoke")
    store.write(res.run_id, res)
    again = json.loads((store.run_dir(res.run_id) / RESULT_FILE).read_text())
    assert again == {**old, "artifacts": []}


def test_li2018_records_keep_their_keys() -> None:
    rec = {"tag": "fc_dense_d8_s0", "score": None, "d": 8, "model": "fc", "method": "subspace/dense", "seed": 0,
           "wall_time_s": 1.5, "converged": None, "train": {"converged": True, "curve": []},
           "config": {"lr": 0.001, "l2": 1e-5}}
    res = RunResult.from_dict(rec)
    assert res.to_dict() == rec and res.extra["tag"] == "fc_dense_d8_s0" and res.run_id == ""
    assert run_converged(res) is True and run_converged(rec) is True
    assert run_converged(dataclasses.replace(res, converged=False)) is False


def test_not_a_result_is_skipped_with_one_warning(tmp_path: Path) -> None:
    for name, body in (("bad1", {"status": "done"}), ("bad2", {"metrics": [1, 2]}), ("bad3", {"steps": "many"}),
                       ("good", {"run_id": "good"})):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / RESULT_FILE).write_text(json.dumps(body))
        if name != "good":
            with pytest.raises(ResultFormatError):
                RunResult.from_dict(body)
            assert read_result(tmp_path / "runs" / name / RESULT_FILE) is None
    warnings: list[str] = []
    assert [p.parent.name for p, _ in iter_results(tmp_path, warn=warnings.append)] == ["good"]
    assert len(warnings) == 3 and all(w.startswith("warning: skipping run bad") and "is not a result" in w
                                      for w in warnings)


def test_score_is_finite_only() -> None:
    res = RunResult(metrics={"accuracy": math.inf}, best={"accuracy": None})
    assert res.score() is None and res.score("best") is None
    assert RunResult(metrics={"loss": 0.3}, metric="loss").score() == 0.3


def test_typed_crossings_reach_the_figures(swept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import idlab.report.markdown as md
    from idlab.report import make_report

    seen: dict[str, Any] = {}
    for name in ("fig_perf_vs_params", "fig_perf_vs_size"):
        real = getattr(md, name)

        def spy(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            seen.setdefault(_name, []).append(args)
            out = _real(*args, **kwargs)
            assert out, f"{_name} drew nothing"
            return out

        monkeypatch.setattr(md, name, spy)
    make_report(swept, tmp_path / "out", analysis=False)
    found = seen["fig_perf_vs_params"][0][2]
    d90, r90 = found["subspace"], found["lora"]
    assert {args[0]: args[2] for args in seen["fig_perf_vs_size"]} == found  # each method's own crossings
    assert set(d90) == {"DID dense"} and r90 and all(isinstance(c, CurveCrossing) for c in (*d90.values(),
                                                                                        *r90.values()))
    for c in d90.values():
        assert c.extra >= 0 and c.grid == (4.0, 16.0) and c.n_seeds == (1, 1)
        if c.interp is not None:
            assert c.interp_params == c.interp + c.extra
    for c in r90.values():
        assert (c.params is None) == (c.value is None)
    assert unconverged_crossings([(d90, "d"), (r90, "r")], []) == []


def test_slurm_record_is_optional_and_round_trips() -> None:
    from idlab.runs import RunResult

    old = RunResult.from_dict({"run_id": "r", "status": "ok"})
    assert old.slurm is None and "slurm" not in old.to_dict()
    rec = {"job_id": "7_1", "array_task_id": "1", "node": "n1", "stderr": "/x/7_1_0_log.err"}
    new = RunResult.from_dict({"run_id": "r", "status": "ok", "slurm": rec})
    assert new.slurm == rec and new.to_dict()["slurm"] == rec
