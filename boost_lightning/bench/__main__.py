"""BOOST vs baselines: train every method on every embedded task with the same budget, evaluate by rollout success.

    python -m boost_lightning.bench --quick        # sized for about 10 min on 2 idle CPU cores
    python -m boost_lightning.bench --tasks maze,guess_number,twenty_questions --methods all --seeds 3

Writes under ``<out>/<name>/``: ``runs/<run_id>.json`` (one per finished run; a finished run is not run again),
``results.csv``, ``results.md``, PNG plots and TensorBoard logs in ``tb/<run_id>``. Other benchmarks of this package:
``python -m boost_lightning.bench.perf`` (step time, tokens/s and memory vs SFT), ``.data`` (tokenization),
``.envs`` (simulators).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from boost_lightning.bench.suite import MODEL_SIZES, PRESETS, RunContext, load_results, plan, resolve_methods
from boost_lightning.envs.base import TASKS


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m boost_lightning.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma list of embedded tasks (default: all of {', '.join(TASKS)})")
    parser.add_argument("--methods", default="all",
                        help="comma list of weightings, or 'all' (learned = BOOST, and every baseline: uniform, "
                             "real_only, synthetic_only, filtered_bc, return_weighted, advantage_weighted, l2rw)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per method and task (default: the preset's, 3 full / 1 quick); a seed sets the "
                             "model and head initialisation and the batch order, the synthetic pool stays fixed")
    parser.add_argument("--quick", action="store_true",
                        help="the quick preset: fewer inner steps, a smaller synthetic pool, 1 seed, 16 rollout "
                             "episodes, a smaller ablation (no pool-size axis); sized for about 10 min on 2 idle "
                             "CPU cores with the tiny model")
    parser.add_argument("--name", default=None,
                        help="suite name: results go to <out>/<name> (default: 'quick' or 'full' after the preset)")
    parser.add_argument("--out", default="logs/bench", help="root directory of suites and their data cache")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the ablation axes on one task with uniform and learned: share of task-shifted "
                             "synthetic rows, synthetic pool size, and the head's ESS regulariser strength "
                             "(learned only)")
    parser.add_argument("--ablation-task", default=None, help="task of the ablation (default: the first of --tasks)")
    parser.add_argument("--steps", type=int, default=None,
                        help="inner (policy) steps per run, the same for every method (default: the preset's)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="held-out rollout episodes per run (default: 64 full / 16 quick)")
    parser.add_argument("--model", default="tiny",
                        help=f"a randomly initialised Llama size ({', '.join(MODEL_SIZES)}; trained with the embedded "
                             "tokenizer, LoRA plus full embeddings and LM head) or any path / alias PolicyModel "
                             "accepts, e.g. smollm2-135m-instruct (then its own tokenizer is used); bigger ones are "
                             "for GPUs")
    parser.add_argument("--accelerator", "--device", dest="accelerator", default="auto",
                        help="Lightning accelerator: auto (a GPU when there is one), cpu, gpu")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision, e.g. 32-true (default) or bf16-mixed on GPUs")
    parser.add_argument("--head-reweight", choices=("all", "synthetic"), default="all",
                        help="which rows the learned head reweights: all (default) or synthetic (real rows keep "
                             "weight 1, so the mass cannot collapse onto them); use a separate --name per choice")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have a result file")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite results.csv, results.md and the plots from the finished runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or only its report) and print a compact table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    overrides = {k: v for k, v in (("steps", args.steps), ("episodes", args.episodes)) if v is not None}
    if overrides:
        preset = replace(preset, **overrides)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    if args.ablation_task is not None and args.ablation_task not in TASKS:
        raise SystemExit(f"unknown --ablation-task {args.ablation_task!r}; choose from {list(TASKS)}")
    try:
        methods = resolve_methods(args.methods)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out_dir = Path(args.out) / (args.name or preset.name)
    ctx = RunContext(out_dir=out_dir, cache_dir=Path(args.out) / ".cache", model=args.model,
                     accelerator=args.accelerator, precision=args.precision, head_reweight=args.head_reweight)
    command = "python -m boost_lightning.bench " + shlex.join(argv)

    start = time.perf_counter()
    if not args.report_only:
        from boost_lightning.bench.suite import run_suite

        specs = plan(preset, tasks, methods, args.seeds, ablation=args.ablation, ablation_task=args.ablation_task)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "command.txt").write_text(command + "\n")
        counts = run_suite(specs, preset, ctx, force=args.force, progress=not args.no_progress)
        print(f"{counts['ran']} runs done, {counts['skipped']} skipped, {time.perf_counter() - start:.0f} s")
    results = load_results(out_dir)
    if not results:
        print(f"no finished runs under {out_dir / 'runs'}")
        return 1

    from boost_lightning.bench.plots import write_plots
    from boost_lightning.bench.report import console_table, write_reports

    # The report names the command that ran the suite (a later --report-only keeps it).
    recorded = out_dir / "command.txt"
    write_reports(out_dir, results, recorded.read_text().strip() if recorded.exists() else command)
    plots = write_plots(out_dir, results)
    print(console_table(results))
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'} and {len(plots)} plots "
          f"({', '.join(p.name for p in plots)}); TensorBoard: tensorboard --logdir {out_dir / 'tb'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
