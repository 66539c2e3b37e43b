"""BOOST vs baselines: every method on every embedded task with the same budget, judged by held-out rollouts.

    python -m boost_lightning.bench --quick                      # about 10 min on 2 CPU cores: 1 seed, small budget
    python -m boost_lightning.bench --utility --workers 2        # the full preset: 5 seeds, 256 episodes, utility

Each run is ``python main.py fit --config configs/bench.yaml`` plus overrides (task data, seed, weighting, budget),
run in-process through the same CLI, then evaluated with ``Trainer.validate`` (rollout success on held-out real
instances, validation loss), ``Trainer.test`` (NLL on the held-out real test split) and ``Trainer.predict`` (the
weighting's weight of every training row). ``oracle`` reads ground-truth labels a user does not have: it bounds the
headroom every other method is measured against. ``retrain`` (``--methods retrain``, after ``learned`` in the same
suite) trains a fresh policy uniformly on the top half of the pool by the ``learned`` run's weights of the same seed.
``utility_oracle`` (``--methods utility_oracle``, after the task's ``--utility`` runs) is a second bound: real rows plus
the generators whose measured utility is positive, since a generator's label is not its effect on the policy.

Writes under ``<out>/<name>/``: ``runs/<run_id>.json`` (one per finished run; a finished run is not run again, so an
interrupted suite resumes), ``results.csv``, ``results.md``, PNG plots, TensorBoard logs in ``tb/<run_id>`` and the
pool weights of every run in ``weights/``. ``--readme README.md`` rewrites the README's benchmark section from the
results. Other benchmarks of this package: ``python -m boost_lightning.bench.perf`` (step time, tokens/s and memory vs
SFT), ``.data`` (tokenization), ``.envs`` (simulators), ``.alignment`` (the one-step alignment per generator at
snapshots of one run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from boost_lightning.bench.suite import MODEL_SIZES, PRESETS, RunContext, is_finished, plan, resolve_methods
from boost_lightning.envs.base import TASKS


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m boost_lightning.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma list of embedded tasks (default: all of {', '.join(TASKS)})")
    parser.add_argument("--methods", default="all",
                        help="comma list of weightings, or 'all': learned (BOOST), oracle (ground truth, the "
                             "headroom), uniform, real_only, synthetic_only, return_filter, return_softmax, "
                             "advantage_softmax, l2rw, density_ratio, group; not in 'all': retrain "
                             "(select-then-retrain: a fresh policy trained uniformly on the top half of the pool by "
                             "the weights of the learned run of the same seed, which must have finished first) and "
                             "utility_oracle (real rows + the generators of positive measured utility, a second "
                             "bound; needs the task's --utility runs first)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds per method and task (default: the preset's, 5 full / 1 quick); a seed "
                             "sets the policy initialisation, the head and the batch order; data and evaluation "
                             "instances are the same for every seed")
    parser.add_argument("--quick", action="store_true",
                        help="the quick preset: 60 inner steps, a 400-row pool, 1 seed, 32 rollout episodes, no "
                             "utility runs; sized for about 10 min on 2 CPU cores")
    parser.add_argument("--utility", action="store_true",
                        help="also measure each generator's utility: uniform trained on real rows + that generator "
                             "only, minus real_only, over the preset's utility seeds")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also measure each generator's value inside the pool: uniform on the whole pool minus "
                             "uniform on the pool without that generator, over the preset's utility seeds")
    parser.add_argument("--name", default=None,
                        help="suite name: results go to <out>/<name> (default: 'quick' or 'full' after the preset)")
    parser.add_argument("--out", default="logs/bench", help="root directory of suites and their data cache")
    parser.add_argument("--steps", type=int, default=None, help="inner steps of every task (default: the preset's)")
    parser.add_argument("--episodes", type=int, default=None,
                        help="held-out rollout episodes per run (default: 256 full / 32 quick)")
    parser.add_argument("--model", default=None,
                        help=f"the model of every task: a randomly initialised Llama size ({', '.join(MODEL_SIZES)}; "
                             "embedded tokenizer, LoRA plus full embeddings and LM head) or any path / alias "
                             "PolicyModel accepts, e.g. smollm2-135m-instruct (default: the preset's per task)")
    parser.add_argument("--accelerator", "--device", dest="accelerator", default="auto",
                        help="Lightning accelerator: auto (a GPU when there is one), cpu, gpu")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision, e.g. 32-true (default) or bf16-mixed on GPUs")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="an extra main.py override for every run, e.g. "
                             "--override=--model.weighting.init_args.head.init_args.reweight=synthetic (repeatable; "
                             "part of a result's identity: use a separate --name per variant)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel, each in its own process with cores / workers threads (default 1)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only every N-th run starting at I (what --workers gives each process)")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have a result file")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite results.csv, results.md and the plots from the finished runs")
    parser.add_argument("--readme", default=None, metavar="PATH",
                        help="also rewrite the benchmark section of this README (between its bench:results markers) "
                             "from the results, with the plots copied to docs/bench/")
    parser.add_argument("--compare", default=None, metavar="NAMES",
                        help="comma list of suites under --out that vary this one (run with an --override and their "
                             "own --name): print and write variants.md, each variant's methods against the same "
                             "method and uniform of this suite, paired by seed, with the training time ratio")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _preset(args: argparse.Namespace):
    preset = PRESETS["quick" if args.quick else "full"]
    budgets = {}
    for task, budget in preset.budgets.items():
        changes = {k: v for k, v in (("steps", args.steps), ("model", args.model)) if v is not None}
        budgets[task] = replace(budget, **changes)
    preset = replace(preset, budgets=budgets)
    return replace(preset, episodes=args.episodes) if args.episodes is not None else preset


def shard_arguments(argv: list[str]) -> list[str]:
    """``argv`` without the options that belong to the parent process (``--workers``, ``--readme``), whether given
    as ``--opt value`` or ``--opt=value``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--readme"):
            skip = True
        elif not arg.startswith(("--workers=", "--readme=")):
            out.append(arg)
    return out


def _run_workers(argv: list[str], specs, preset, ctx, workers: int, progress: bool) -> None:
    """``workers`` child processes, each with ``--shard k/workers``; one progress bar over the result files."""
    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or workers) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    base = shard_arguments(argv)
    children = [subprocess.Popen([sys.executable, "-m", "boost_lightning.bench", *base, f"--shard={k}/{workers}",
                                  "--no-progress", "--report-only-skip"], env=env, stdout=subprocess.DEVNULL)
                for k in range(workers)]
    with tqdm(total=len(specs), desc="bench", unit="run", disable=not progress) as bar:
        while any(c.poll() is None for c in children):
            bar.n = sum(is_finished(ctx, s, preset) for s in specs)
            bar.refresh()
            time.sleep(5)
        bar.n = sum(is_finished(ctx, s, preset) for s in specs)
        bar.refresh()
    failed = [c.returncode for c in children if c.returncode]
    if failed:
        raise SystemExit(f"{len(failed)} of {workers} worker processes failed (exit codes {failed})")


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or only its report) and print a compact table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.add_argument("--report-only-skip", action="store_true", help=argparse.SUPPRESS)  # worker processes
    args = parser.parse_args(argv)
    preset = _preset(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SystemExit(f"unknown tasks {unknown}; choose from {list(TASKS)}")
    try:
        methods = resolve_methods(args.methods)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out_dir = Path(args.out) / (args.name or preset.name)
    ctx = RunContext(out_dir=out_dir, cache_dir=Path(args.out) / ".cache", accelerator=args.accelerator,
                     precision=args.precision, overrides=tuple(args.override))
    command = "python -m boost_lightning.bench " + shlex.join(a for a in argv if not a.startswith("--readme"))

    start = time.perf_counter()
    if not args.report_only:
        specs = plan(preset, tasks, methods, args.seeds, utility=args.utility, leave_one_out=args.leave_one_out)
        if args.shard:
            k, n = (int(x) for x in args.shard.split("/"))
            specs = specs[k::n]
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.workers > 1:
            (out_dir / "command.txt").write_text(command + "\n")
            _run_workers(argv, specs, preset, ctx, args.workers, not args.no_progress)
        else:
            from boost_lightning.bench.suite import run_suite

            if not args.shard:
                (out_dir / "command.txt").write_text(command + "\n")
            counts = run_suite(specs, preset, ctx, force=args.force, progress=not args.no_progress)
            print(f"{counts['ran']} runs done, {counts['skipped']} skipped, {time.perf_counter() - start:.0f} s")
        if args.report_only_skip:
            return 0

    from boost_lightning.bench.plots import write_plots
    from boost_lightning.bench.report import (
        console_table,
        frame_from_records,
        load_records,
        write_readme_section,
        write_reports,
    )

    records = load_records(out_dir)
    if not records:
        print(f"no finished runs under {out_dir / 'runs'}")
        return 1
    # The report names the command that ran the suite (a later --report-only keeps it).
    recorded = out_dir / "command.txt"
    markdown = write_reports(out_dir, recorded.read_text().strip() if recorded.exists() else command)
    plots = write_plots(out_dir, records)
    print(console_table(frame_from_records(records)))
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'results.md'} and {len(plots)} plots "
          f"({', '.join(p.name for p in plots)}); TensorBoard: tensorboard --logdir {out_dir / 'tb'}")
    if args.compare:
        from boost_lightning.bench.report import load_frame, variant_markdown, variant_table

        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        table = variant_markdown(variant_table(frame_from_records(records),
                                               {n: load_frame(Path(args.out) / n) for n in names}))
        (out_dir / "variants.md").write_text(f"Command: `{command}`\n\n{table}\n")
        print(table)
    if args.readme:
        readme = Path(args.readme)
        docs = readme.parent / "docs" / "bench"
        docs.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            (docs / plot.name).write_bytes(plot.read_bytes())
        (docs / "results.csv").write_bytes((out_dir / "results.csv").read_bytes())
        (docs / "results.md").write_text(markdown)
        write_readme_section(readme, markdown, "docs/bench")
        print(f"rewrote the benchmark section of {readme} (plots, results.csv and results.md in {docs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
