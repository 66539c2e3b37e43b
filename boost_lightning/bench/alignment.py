"""Which generators the one-step hypergradient favours, and when: per-generator alignment at snapshots of one run.

    python -m boost_lightning.bench.alignment --task guess_number --method learned --seed 0 \\
        --suite docs/bench/results.csv

Trains one benchmark run (the preset's command line, as ``python -m boost_lightning.bench`` would) and keeps the LoRA
tensors and Adam's second moments at the ``--snapshots`` steps. At every snapshot t it takes v_t = ∇ of the mean
validation loss over the whole validation split and, for up to ``--rows-per-generator`` rows of every generator (and
every real row), the one-step alignment ⟨P_t v_t, ∇ℓᵢ(θ_t)⟩: the directional derivative the first-order
hypergradient computes (a forward difference), positive when a step on the row lowers the validation loss. It also
takes every snapshot's rows against the last snapshot's direction, ⟨P_T v_T, ∇ℓᵢ(θ_t)⟩: what a step taken then is
worth to the validation loss at the end. The weights of ``learned`` follow the first quantity through the head; this
shows whether the signal or the head is what misranks a generator.

With ``--suite`` (a benchmark suite, or its ``results.csv``, that holds the task's ``--utility`` runs) it adds
ρ(mean alignment per generator, utility) per snapshot. Writes ``<out>/alignment-<run_id>.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from boost_lightning.bilevel.policy import row_alignment, validation_direction
from boost_lightning.bilevel.preconditioner import adam_preconditioner
from boost_lightning.data.collate import concat_batches, take_rows

#: Policy steps at which the default run is snapshotted.
DEFAULT_SNAPSHOTS = (10, 50, 100, 200, 300)
#: Name of the real rows' group.
REAL = "real"


class Snapshot:
    """The policy's trainable tensors and its Adam preconditioner at one step (copies; nothing live is kept).

    Attributes:
        params: name → tensor (θ_t).
        precondition: P_t, from :func:`~boost_lightning.bilevel.preconditioner.adam_preconditioner` (which computes
            its scales when called, so later optimizer steps do not change it); ``None`` without Adam moments
            (P = I).
    """

    def __init__(self, params: Mapping[str, Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        self.params = {n: p.detach().clone() for n, p in params.items()}
        self.precondition = None if optimizer is None else adam_preconditioner(optimizer, list(params.values()))

    def direction(self, policy, validation: Sequence[Mapping[str, Any]]) -> list[Tensor]:
        """P_t·v_t, v_t = ∇ of the mean agent-token NLL over every row of ``validation`` (a list of batches)."""
        return validation_direction(policy, self.params, validation, self.precondition)


class SnapshotRecorder(Callback):
    """Keeps a :class:`Snapshot` of the policy after each of ``steps`` (counted in policy steps).

    Args:
        steps: Policy steps to snapshot after.
    """

    def __init__(self, steps: Sequence[int] = DEFAULT_SNAPSHOTS) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.snapshots: dict[int, Snapshot] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.inner_steps
        if step in self.steps and step not in self.snapshots:
            optimizer = trainer.optimizers[0]
            self.snapshots[step] = Snapshot(pl_module.policy.trainable_named_parameters(),
                                            getattr(optimizer, "optimizer", optimizer))


def pool_sample(datamodule, files: Mapping[str, Path], per_generator: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every real row and up to ``per_generator`` rows of each generator, as collated batches in file order, with
    each kept row's group (``real`` or its ``meta.generator``)."""
    generator_of = [json.loads(line).get("meta", {}).get("generator", "?")
                    for line in Path(files["synthetic"]).read_text().splitlines() if line.strip()]
    datamodule.setup("predict")
    batches, groups, seen = [], [], {}
    for batch in datamodule.predict_dataloader():
        size = batch["input_ids"].shape[0]
        keep = []
        for j in range(size):
            group = generator_of[int(batch["row_id"][j])] if float(batch["is_synthetic"][j]) > 0.5 else REAL
            if group == REAL or seen.get(group, 0) < per_generator:
                seen[group] = seen.get(group, 0) + 1
                keep.append(j)
                groups.append(group)
        if keep:
            batches.append(concat_batches([take_rows(batch, j, j + 1) for j in keep]))
    return batches, groups


def group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Mean of ``values`` per group."""
    sums: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        sums.setdefault(g, []).append(float(v))
    return {g: sum(v) / len(v) for g, v in sums.items()}


def measure(policy, snapshots: Mapping[int, Snapshot], validation: Sequence[Mapping[str, Any]],
            batches: Sequence[Mapping[str, Any]], eps: float = 1e-2) -> dict[str, list[float]]:
    """Per-row alignments: ``"<t>"`` = ⟨P_t v_t, ∇ℓᵢ(θ_t)⟩ for every snapshot t and ``"<t>@<T>"`` =
    ⟨P_T v_T, ∇ℓᵢ(θ_t)⟩ against the last snapshot T."""
    steps = sorted(snapshots)
    directions = {t: snapshots[t].direction(policy, validation) for t in steps}
    last = steps[-1]
    found: dict[str, list[float]] = {}
    for t in steps:
        found[str(t)] = row_alignment(policy, snapshots[t].params, directions[t], batches, eps).tolist()
        if t != last:
            found[f"{t}@{last}"] = row_alignment(policy, snapshots[t].params, directions[last], batches,
                                                   eps).tolist()
    return found


def markdown(result: Mapping[str, Any], utility: Mapping[str, float] | None = None) -> str:
    """Mean alignment per group (rows) at each snapshot (columns), groups by utility when it is known, and the
    Spearman ρ of the synthetic generators' means with their utility."""
    from boost_lightning.bench.report import spearman

    groups = result["groups"]
    keys = list(result["alignment"])
    means = {k: group_means(result["alignment"][k], groups) for k in keys}
    names = sorted(set(groups) - {REAL}, key=lambda g: (-(utility or {}).get(g, 0.0), g))
    head = "| group | " + (" utility |" if utility else "") + " | ".join(
        f"step {k.replace('@', ' vs v@')}" for k in keys) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in [REAL, *names]:
        u = f" {utility[g]:+.1f} |" if utility and g in utility else (" |" if utility else "")
        lines.append(f"| {g} |{u} " + " | ".join(f"{means[k].get(g, float('nan')):+.3g}" for k in keys) + " |")
    if utility:
        known = [g for g in names if g in utility]
        rhos = [spearman([means[k][g] for g in known], [utility[g] for g in known]) for k in keys]
        lines.append("| ρ(mean alignment, utility) | | " + " | ".join(f"{r:+.2f}" for r in rhos) + " |")
    return "\n".join(lines)


def suite_utility(suite: str | Path, task: str) -> dict[str, float]:
    """Utility (points) per generator of ``task`` from a suite's ``--utility`` runs: its directory, or a
    ``results.csv`` of it (such as ``docs/bench/results.csv``)."""
    import pandas as pd

    from boost_lightning.bench.report import load_frame, utility_table

    frame = pd.read_csv(suite) if str(suite).endswith(".csv") else load_frame(suite)
    table = utility_table(frame, n_boot=100)
    if table is None or task not in set(table["task"]):
        raise FileNotFoundError(f"{suite} holds no utility runs of {task}: run --tasks {task} --utility there first")
    table = table[table["task"] == task]
    return {str(g): 100 * float(u) for g, u in zip(table["generator"], table["utility"])}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from boost_lightning.bench.suite import PRESETS, RunContext, RunSpec, cli_arguments, data_settings
    from boost_lightning.cli import cli_main
    from boost_lightning.envs.base import TASKS
    from boost_lightning.envs.embedded import embedded_splits

    parser = argparse.ArgumentParser(prog="python -m boost_lightning.bench.alignment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="guess_number", help="Embedded task.")
    parser.add_argument("--method", default="learned", help="Weighting of the run (a benchmark method name).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run (the benchmark's seed).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="Budget and data of the run.")
    parser.add_argument("--snapshots", default=",".join(map(str, DEFAULT_SNAPSHOTS)),
                        help="Comma-separated policy steps to measure at (those past the budget are left out).")
    parser.add_argument("--rows-per-generator", type=int, default=48, help="Synthetic rows measured per generator.")
    parser.add_argument("--eps", type=float, default=1e-2, help="Length of the forward-difference step.")
    parser.add_argument("--suite", default=None, help="A benchmark suite directory, or its results.csv, with the "
                        "task's utility runs: adds ρ(mean alignment, utility).")
    parser.add_argument("--out", default="runs/alignment", help="Output directory (and the run's own files).")
    parser.add_argument("--override", action="append", default=[],
                        help="An extra `main.py fit` argument of the run (repeatable), e.g. "
                        "--override=--model.weighting.init_args.score_update=exponentiated.")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    budget = preset.budgets[args.task]
    steps = [s for s in (int(x) for x in args.snapshots.split(",") if x.strip()) if 0 < s <= budget.steps]
    if not steps:
        parser.error(f"--snapshots: no step in 1..{budget.steps}")
    out = Path(args.out)
    ctx = RunContext(out_dir=out, cache_dir=out / "cache", accelerator="cpu", overrides=tuple(args.override))
    spec = RunSpec(args.task, args.method, args.seed)
    files = dict(embedded_splits(args.task, cache_dir=ctx.cache_dir / "embedded", **data_settings(budget)))
    fit = ["fit", *cli_arguments(spec, preset, ctx, files),
           "--trainer.callbacks+=boost_lightning.bench.alignment.SnapshotRecorder",
           f"--trainer.callbacks.steps=[{','.join(map(str, steps))}]"]
    argv_, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = cli_main(fit)
    finally:
        sys.argv = argv_
    # The CLI builds the callback from its import path: under ``python -m`` that is not this ``__main__``'s class.
    from boost_lightning.bench.alignment import SnapshotRecorder as Recorder

    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, Recorder))
    policy = cli.model.policy.eval()
    batches, groups = pool_sample(cli.datamodule, files, args.rows_per_generator)
    validation = list(cli.datamodule.val_dataloader())
    result = {"run_id": spec.run_id, "steps": sorted(recorder.snapshots), "groups": groups,
              "alignment": measure(policy, recorder.snapshots, validation, batches, args.eps)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"alignment-{spec.run_id}.json").write_text(json.dumps(result))
    utility = suite_utility(args.suite, args.task) if args.suite else None
    print(markdown(result, utility))
    return result


if __name__ == "__main__":
    main()
