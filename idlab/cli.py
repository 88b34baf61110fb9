"""``idlab`` command line: sweep, report, analyze, bench, plan, schema, status, runs, keep.

    idlab sweep CONFIG [key=value ...]   run a study (CONFIG: a YAML file, a name in
                                         experiments/configs/, or auto)
    idlab report [RESULTS_DIR]           tables, figures and REPORT.md from the results
    idlab analyze RUN_DIR ...            Parquet analysis tables of runs' Delta W
    idlab bench                          the benchmarks (bench/run_all.py)
    idlab plan CONFIG [key=value ...]    parameter counts and projected peak memory per run
    idlab schema [--out FILE]            the JSON Schema of a study file (editor validation)
    idlab status STUDY_DIR               run id, Slurm job id, state and log of every run
    idlab runs STUDY_DIR [RUN_ID ...]    the runs of a study folder (status, cell, error); --remove
    idlab keep STUDY_DIR                 publish a study folder into git (large files marked kept: false)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idlab.sweep.driver import SweepSummary

SWEEP_EPILOG = """\
CONFIG is a study YAML (experiments/configs/*.yaml), its bare name (smoke, cpu_study,
gpu_study, lora_rank_grid; looked up in ./experiments/configs, then $IDLAB_CONFIG_PATH) or
`auto` (gpu_study.yaml when CUDA is available, else cpu_study_converged.yaml). Overrides are key=value with dotted keys and YAML values, e.g.

  idlab sweep smoke seeds=[0,1,2] lora.r=[4,8] train.steps=50
  idlab sweep gpu_study executor=multigpu gpus=[0,1,2,3]
  idlab sweep gpu_study executor=slurm slurm.partition=gpu slurm.time_min=120

Finished runs are skipped: rerun the same command after an interruption.
A study folder holds one experiment: its first sweep records the settings (model, task, train,
target, score) in <results_dir>/<name>/settings.json, and a sweep with other settings is refused
(exit 2) unless it gets its own name=... or --allow-mixed. New seeds, grid values, methods and
learning rates are added freely.
`idlab sweep --help-config` lists every key with its type, default and meaning."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idlab", description="idlab: intrinsic dimension and LoRA rank on one axis.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", metavar="{sweep,plan,status,runs,keep,report,analyze,eval,bench,schema}")
    s = sub.add_parser("sweep", help="run a study grid (resumable)", epilog=SWEEP_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", nargs="?", default="auto", help="study YAML, its name, or auto (default)")
    s.add_argument("overrides", nargs="*", help="key=value overrides (YAML values), e.g. lora.r=[4,8]")
    s.add_argument("--dry-run", action="store_true", help="print the plan (cells, runs, done) and stop")
    s.add_argument("--help-config", action="store_true", help="list every configuration key and exit")
    s.add_argument("--allow-mixed", action="store_true",
                   help="add runs whose settings (model, task, train, target, score) differ from those the study "
                        "folder records; the folder records both and the report keeps them apart "
                        "(default: such a sweep is refused; give it its own name=...)")
    s.add_argument("--detach", action="store_true",
                   help="executor=slurm: submit and return (idlab status shows the jobs; the same command collects)")
    st = sub.add_parser("status", help="run id, Slurm job id, state and log path of every run of a study folder")
    st.add_argument("study_dir", help="the study folder (results/<study>)")
    r = sub.add_parser("report", help="tables, figures and REPORT.md from a results folder")
    r.add_argument("results_dir", nargs="?", default="results", help="results folder (default results/)")
    r.add_argument("--out", default=None, help="where summary.parquet, figures/ and REPORT.md go (default RESULTS_DIR)")
    r.add_argument("--no-analysis", action="store_true", help="skip the Delta W analysis (spectra, phi, ...)")
    r.add_argument("--formats", default="png,pdf", help="figure formats, comma-separated (default png,pdf)")
    a = sub.add_parser("analyze", help="Parquet analysis tables (spectra, ranks, similarity, ...) of runs")
    a.add_argument("run_dirs", nargs="+", help="run folders (with delta.safetensors), study folders or a results folder")
    a.add_argument("--out", default=None, help="output folder (default <first RUN_DIR>/analysis)")
    a.add_argument("--energy-p", type=float, default=0.9, help="p of the energy rank (default 0.9)")
    a.add_argument("--no-similarity", action="store_true", help="skip subspace similarity")
    a.add_argument("--side", choices=["right", "left"], default="right",
                   help="singular vectors compared by phi (right = from A, Hu et al.)")
    a.add_argument("--source", choices=["factor", "update"], default="factor",
                   help="phi from the LoRA factor A (right side; B on the left) as Hu et al. eq. 4 "
                        "(default), or from Delta W itself (same span, invariant to the B/A split); "
                        "dense updates always use Delta W")
    a.add_argument("--max-i", type=int, default=8, help="rows of the stored phi maps")
    a.add_argument("--max-j", type=int, default=64, help="columns of the stored phi maps")
    a.add_argument("--dense-subspace-dim", type=int, default=64, help="directions kept from dense updates for phi")
    a.add_argument("--alignment-r", type=int, default=None,
                   help="directions for the amplification (default: LoRA rank / energy rank)")
    a.add_argument("--exclude-scale", action="store_true",
                   help="use B @ A instead of (alpha/r) B @ A for the amplification")
    a.add_argument("--intruder-k", type=int, default=10)
    a.add_argument("--intruder-eps", type=float, default=0.5)
    a.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see analyze_runs)")
    sub.add_parser("bench", help="run the benchmarks (bench/run_all.py)")
    pl = sub.add_parser("plan", help="parameter counts and projected peak memory of every run (no training)")
    pl.add_argument("config", nargs="?", default="auto", help="study YAML, its name, or auto (default)")
    pl.add_argument("overrides", nargs="*", help="key=value overrides (YAML values), as for sweep")
    pl.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="target device (default: where the study's runs execute)")
    pl.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    pl.add_argument("--device-memory-gb", type=float, default=None,
                    help="also the smallest number of devices of this memory (GB) each run fits on (FSDP2 for "
                         "full fine-tuning, DDP otherwise; projected)")
    sc = sub.add_parser("schema", help="the JSON Schema of a study YAML file (editors validate and complete it)")
    sc.add_argument("--out", default=None, help="write it to this file (default: print it)")
    ru = sub.add_parser("runs", help="list the runs of a study folder; remove failed ones or a selection",
                        epilog=RUNS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ru.add_argument("study_dir", help="a study folder (results/<study>, holding runs/)")
    ru.add_argument("run_ids", nargs="*", help="only these runs (run ids or their prefixes)")
    ru.add_argument("--status", default=None,
                    help="only runs with this status, comma-separated: ok, diverged, failed, incomplete, claimed, "
                         "stale")
    ru.add_argument("--remove", action="store_true",
                    help="remove the selected runs (default selection: the failed ones), asking first")
    ru.add_argument("--yes", action="store_true", help="remove without asking")
    ru.add_argument("--json", action="store_true", help="a JSON array of records (pandas.read_json) instead of the table")
    k = sub.add_parser("keep", help="publish a study folder into git (large files left out, marked kept: false)",
                       epilog=KEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("study_dir", help="a study folder (results/<study>, holding runs/)")
    k.add_argument("--max-file-mb", type=float, default=None,
                   help="the largest file kept in git, in MB of 10^6 bytes (default 10); larger ones are left "
                        "out and marked kept: false in <study>/keep.json")
    k.add_argument("--leave-out", action="append", default=[], metavar="GLOB",
                   help="also leave out the files of each run matching this glob (path inside the run folder, "
                        "e.g. 'adapter/*'); repeatable")
    k.add_argument("--max-study-mb", type=float, default=None,
                   help="refuse, writing nothing, when the kept files of the study exceed this many MB (default 50)")
    ev = sub.add_parser("eval", help="score finished runs on lm-evaluation-harness tasks (into each run's eval.json)")
    ev.add_argument("run_dirs", nargs="+", help="run folders (results/<study>/runs/<run_id>)")
    ev.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    ev.add_argument("--limit", type=int, default=None, help="score the first N documents of each task")
    ev.add_argument("--include-path", default=None, help="a folder of lm-eval task YAML files (local tasks)")
    ev.add_argument("--no-builtin-tasks", action="store_true",
                    help="only the tasks of --include-path (skips indexing lm-eval's ~15,000 built-in tasks)")
    ev.add_argument("--tokenizer", default=None,
                    help="tokenizer for runs whose model has none of its own (a factory model): a Hugging Face "
                         "name or folder, an offline alias, or package.module:function")
    ev.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    ev.add_argument("--pretrained", action="store_true",
                    help="also score the pretrained model each run started from (once per base model), into "
                         "eval.json's pretrained section: forgetting on a task = after - before")
    ev.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")
    return p


KEEP_EPILOG = """  idlab keep results/cpu_study_converged                 decide, write keep.json and the .gitignore files
  git add results/.gitignore results/cpu_study_converged && git commit -m "results: cpu_study_converged"

Kept (tracked by git): study.json, settings.json, keep.json, and per run result.json (metrics, curve),
adapter/, subspace.safetensors and delta.safetensors up to the limit. Left out: each larger file (the dense
Delta W of full fine-tuning and subspace runs), marked kept: false; a clone still counts the run complete
(the sweep does not rerun it), and the report and analysis say its Delta W was not kept. Run it again after
every sweep of a published study. See results/README.md."""

RUNS_EPILOG = """  idlab runs results/cpu_study                        the table: run id, status, method, cell, lr, seed, wall, error
  idlab runs results/cpu_study --status failed --json   the failed runs as JSON records
  idlab runs results/cpu_study --remove               remove the failed runs (asks; --yes does not)
  idlab runs results/cpu_study 3fa2 9b1c --remove     remove two runs by id (prefix)

A removed run is trained again by the next `idlab sweep` of its study. A run a live process is
training (status claimed) is never removed."""


def main_runs(study_dir: str, run_ids: Sequence[str], status: str | None, remove: bool, yes: bool,
              as_json: bool) -> int:
    """The body of ``idlab runs``: list, or remove a selection after confirmation; the exit code."""
    import json

    from idlab.runs.listing import (
        LIST_STATUSES,
        format_table,
        list_runs,
        remove_runs,
        select_runs,
        to_json,
    )

    statuses = [x.strip() for x in (status or "").split(",") if x.strip()]
    bad = [x for x in statuses if x not in LIST_STATUSES]
    if bad:
        print(f"idlab runs: --status {','.join(bad)} is not a status; allowed: {', '.join(LIST_STATUSES)}",
              file=sys.stderr)
        return 2
    if not Path(study_dir).is_dir():
        print(f"idlab runs: no study folder at {study_dir}", file=sys.stderr)
        return 2
    try:
        rows = list_runs(study_dir)
    except FileNotFoundError as e:
        print(f"idlab runs: {e}", file=sys.stderr)
        return 2
    if remove and not statuses and not run_ids:
        statuses = ["failed"]
    chosen = select_runs(rows, statuses, run_ids)
    if not remove:
        print(to_json(chosen) if as_json else format_table(chosen))
        return 0
    if not chosen:
        print(f"idlab runs: nothing to remove in {study_dir} (selection: "
              f"{', '.join(statuses) or 'any status'}{'; ids ' + ' '.join(run_ids) if run_ids else ''})")
        return 0
    if not as_json:
        print(format_table(chosen))
    if not yes:
        try:
            answer = input(f"remove {len(chosen)} run(s) from {study_dir}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed (pass --yes to remove without asking)", file=sys.stderr)
            return 1
    removed, kept = remove_runs(study_dir, chosen)
    for line in kept:
        print(line, file=sys.stderr)
    if as_json:
        print(json.dumps({"removed": removed, "kept": kept}))
    else:
        print(f"removed {len(removed)} run(s) from {study_dir}")
    return 0


def main_sweep(config: str, overrides: Iterable[str], dry_run: bool = False, allow_mixed: bool = False,
               detach: bool = False) -> SweepSummary:
    """Load (with overrides), validate and run a study; the body of ``idlab sweep``."""
    from idlab.config import load_study
    from idlab.sweep.driver import auto_config, resolve_config_path, run_sweep
    from idlab.training.devices import cpu_torch_on_gpu_machine

    overrides = list(overrides)
    warning = cpu_torch_on_gpu_machine()
    if warning:
        print(warning, file=sys.stderr, flush=True)
    path = resolve_config_path(config, overrides)
    study = load_study(path, overrides)
    why = f" (CONFIG=auto: {auto_config(overrides)[1]})" if config == "auto" else ""
    print(f"config {path}{why}", flush=True)
    return run_sweep(study, dry_run=dry_run, allow_mixed=allow_mixed, detach=detach)


def main_plan(config: str, overrides: Sequence[str], device: str | None = None, as_json: bool = False,
              device_memory_gb: float | None = None) -> str:
    """The body of ``idlab plan``: the table (or JSON lines) for a study."""
    import json

    from idlab.config import load_study
    from idlab.sweep.driver import resolve_config_path
    from idlab.sweep.plan import devices_table, plan_runs, plan_table

    path = resolve_config_path(config, list(overrides))
    study = load_study(path, list(overrides))
    plans = plan_runs(study, device=device)
    if as_json:
        return "\n".join(json.dumps(p.to_dict()) for p in plans)
    head = (f"plan {path}: study {study.name!r}, model {study.model.name} ({study.model.dtype}), "
            f"{len(plans)} runs on {plans[0].device if plans else '?'}")
    text = head + "\n" + plan_table(plans)
    if device_memory_gb is not None:
        text += "\n" + devices_table(plans, device_memory_gb)
    if study.executor == "slurm" and study.slurm.backend == "slurm" and plans:
        from idlab.config import RunConfig
        from idlab.sweep.grid import expand
        from idlab.sweep.slurm import slurm_request

        runs = expand(study)
        shapes: dict[str, list[tuple[str, RunConfig]]] = {}
        for (rid, cfg), p in zip(runs, plans):
            shapes.setdefault(p.label, []).append((rid, cfg))
        for label, group in shapes.items():
            text += f"\nslurm request per run of {label!r} ({len(group)} runs): {slurm_request(study, group).text()}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idlab`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides placed after an option (e.g. --dry-run lora.r=[4])
        if args.command not in ("sweep", "plan") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "sweep":
        from idlab.config import ConfigError, describe_fields

        if args.help_config:
            print("\n".join(describe_fields()))
            return 0
        from idlab.errors import NotWritableError

        try:
            summary = main_sweep(args.config, args.overrides, dry_run=args.dry_run, allow_mixed=args.allow_mixed,
                                 detach=args.detach)
        except NotWritableError as e:
            print(f"idlab sweep: {e}", file=sys.stderr)
            return 2
        except ConfigError as e:
            print(f"idlab sweep: invalid configuration: {e}", file=sys.stderr)
            return 2
        if args.detach:
            return 1 if summary.failed else 0
        return 0 if args.dry_run or not (summary.failed or summary.missing) else 1
    if args.command == "status":
        from idlab.sweep.slurm_jobs import status_text

        if not (Path(args.study_dir) / "study.json").is_file():
            print(f"idlab status: {args.study_dir} is not a study folder (no study.json)", file=sys.stderr)
            return 2
        print(status_text(Path(args.study_dir)))
        return 0
    if args.command == "plan":
        from idlab.config import ConfigError

        try:
            print(main_plan(args.config, args.overrides, device=args.device, as_json=args.json,
                            device_memory_gb=args.device_memory_gb))
        except ConfigError as e:
            print(f"idlab plan: invalid configuration: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        from idlab.errors import NotWritableError
        from idlab.report import make_report
        from idlab.runs import check_writable

        if not Path(args.results_dir).is_dir():
            print(f"idlab report: no results folder at {args.results_dir} (run `idlab sweep CONFIG` first, "
                  "or name the folder: idlab report RESULTS_DIR)", file=sys.stderr)
            return 2
        try:
            check_writable(args.out or args.results_dir, "report folder",
                           "pass --out <a writable folder> or make it writable (chmod u+w)")
        except NotWritableError as e:
            print(f"idlab report: {e}", file=sys.stderr)
            return 2
        md = make_report(args.results_dir, out_dir=args.out, analysis=not args.no_analysis,
                         formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()))
        print(f"wrote {md}")
        return 0
    if args.command == "analyze":
        from idlab.analysis.export import analyze_runs, expand_run_dirs

        try:
            dirs = expand_run_dirs(args.run_dirs)
        except FileNotFoundError as e:
            print(f"idlab analyze: {e}", file=sys.stderr)
            return 1
        from idlab.runs.marks import unkept_note

        unkept = [(d, n) for d in dirs if (n := unkept_note(d)) is not None]  # Delta W left out of git
        dirs = [d for d in dirs if d not in {u for u, _ in unkept}]
        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "analysis"
        tables = analyze_runs(
            dirs, out, None, energy_p=args.energy_p, pairs="none" if args.no_similarity else "auto",
            similarity_side=args.side, similarity_source=args.source, similarity_max_i=args.max_i,
            similarity_max_j=args.max_j,
            dense_subspace_dim=args.dense_subspace_dim, alignment_r=args.alignment_r,
            include_scale=not args.exclude_scale, intruder_k=args.intruder_k, intruder_eps=args.intruder_eps,
            num_threads=args.threads)
        for name, df in tables.items():
            print(f"{name}: {len(df)} rows -> {out / (name + '.parquet')}")
        for _, row in tables["notes"].iterrows():
            print(f"note: {row['run_id']} {row['module']} [{row['table']}]: {row['note']}")
        for _, n in unkept:
            print(f"note: {n}")
        return 0
    if args.command == "schema":
        import json

        from idlab.config.jsonschema import modeline, study_schema, write_schema

        if args.out is None:
            print(json.dumps(study_schema(), indent=2))
            return 0
        out = write_schema(args.out)
        print(f"wrote {out}; to have an editor check a study file against it (YAML language server, e.g. "
              f"VS Code's YAML extension), add the line\n  {modeline(out.resolve())}\nto the file, or map "
              f"it to experiments/configs/**/*.yaml in the yaml.schemas setting")
        return 0
    if args.command == "keep":
        from idlab.runs.keep import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_STUDY_MB, keep_study

        try:
            published = keep_study(
                args.study_dir, DEFAULT_MAX_FILE_MB if args.max_file_mb is None else args.max_file_mb,
                leave_out=args.leave_out,
                max_study_mb=DEFAULT_MAX_STUDY_MB if args.max_study_mb is None else args.max_study_mb)
        except (FileNotFoundError, ValueError) as e:
            print(f"idlab keep: {e}", file=sys.stderr)
            return 2
        print("\n".join(published.lines()))
    if args.command == "eval":
        from idlab.sweep.lmeval import evaluate_runs

        try:
            evaluate_runs(args.run_dirs, [t.strip() for t in args.tasks.split(",") if t.strip()], limit=args.limit,
                          include_path=args.include_path, builtin_tasks=not args.no_builtin_tasks,
                          tokenizer=args.tokenizer, batch_size=args.batch_size, device=args.device,
                          pretrained=args.pretrained)
        except ValueError as e:
            print(f"idlab eval: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "runs":
        return main_runs(args.study_dir, args.run_ids, args.status, args.remove, args.yes, args.json)
    if args.command == "bench":
        # the benchmarks are repository scripts, not part of the library: run them as a command
        # from the repository root (as `make bench` does), never imported from here
        if not (Path.cwd() / "bench" / "run_all.py").is_file():
            print("idlab bench: no bench/run_all.py in the current folder; run it from the repository root "
                  "(or `make bench`)", file=sys.stderr)
            return 1
        import subprocess

        return subprocess.call([sys.executable, "-m", "bench.run_all"])
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
