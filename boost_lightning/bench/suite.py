"""The method × task benchmark: presets, run specs and the resumable runner.

Every run is the product as a user runs it: ``configs/bench.yaml`` plus command-line overrides (task data, seed,
weighting, budget) through the LightningCLI entry point (:func:`boost_lightning.cli.cli_main`, subcommand ``fit``).
The trained module is then evaluated with a plain ``Trainer``: ``validate`` with the :class:`RolloutEvaluation`
callback (greedy rollouts on held-out real instances, the envs' evaluation seed range: never used for data) and the
validation loss, ``test`` (NLL on the held-out real test split) and ``predict`` with the
:class:`TrajectoryWeightWriter` (the weighting's weight of every training row, real and synthetic on one scale).

Common random numbers: for a given seed, every method starts from the same policy initialisation (the seed drives
``seed_everything``), draws its batches in the same order where its rows allow it (methods that drop rows draw from
fewer), and is evaluated on the same instances with greedy decoding.

A run is identified by :attr:`RunSpec.run_id`; a finished run leaves ``runs/<run_id>.json`` and is skipped the next
time (the suite is resumable at run granularity).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from boost_lightning.cache import write_file_atomically
from boost_lightning.envs.base import TASKS
from boost_lightning.weightings import WEIGHTINGS

#: The config every run starts from.
BENCH_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench.yaml"

#: Randomly initialised Llama sizes a budget's ``model`` names (anything else is a path or alias of a pretrained causal
#: LM). The vocabulary is the embedded tasks' 1024-token tokenizer.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "small": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "base": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 4},
}

#: The pool of the main comparison; a utility run's pool is one generator's name.
MAIN_POOL = "all"
#: A leave-one-out run's pool: ``without-<generator>``, the main pool without that generator's rows.
LEAVE_OUT_PREFIX = "without-"
#: Select-then-retrain (SEAL, arXiv 2410.07471): a fresh policy, same seed, trained uniformly on the top
#: :data:`RETRAIN_TOP_FRACTION` of the pool by the weights the ``learned`` run of the same task and seed wrote
#: (``weights/<task>-learned-s<seed>.jsonl``), through :class:`~boost_lightning.weightings.FixedWeights`.
RETRAIN = "retrain"
RETRAIN_TOP_FRACTION = 0.5
#: The utility oracle: :class:`~boost_lightning.weightings.Oracle` keeping the generators whose measured utility in
#: this suite is positive (``--utility`` runs of the same task: mean over seeds of ``uniform`` on real + that
#: generator, minus ``real_only``). A second bound beside the label oracle, whose labels are not utility.
UTILITY_ORACLE = "utility_oracle"
#: Select-then-retrain on the outer level's own signal: as :data:`RETRAIN`, but the top of the pool by each row's
#: one-step alignment with the validation loss at the end of the ``learned`` run
#: (:class:`~boost_lightning.callbacks.AlignmentWriter`, ``weights/<task>-learned-s<seed>-alignment.jsonl``) instead of
#: by the head's weights.
RETRAIN_ALIGNMENT = "retrain_alignment"
#: Both rankings at once: as :data:`RETRAIN`, but the synthetic rows ranked by the sum of their rank by the head's
#: weight and their rank by alignment (real rows kept), written to ``weights/<task>-learned-s<seed>-combined.jsonl``.
RETRAIN_COMBINED = "retrain_combined"
#: Methods that are not weightings of the registry: they are built from other runs of the suite.
DERIVED_METHODS = (RETRAIN, RETRAIN_ALIGNMENT, RETRAIN_COMBINED, UTILITY_ORACLE)


@dataclass(frozen=True)
class TaskBudget:
    """What one task's runs get; every method of a task gets the same one.

    Attributes:
        steps: Inner (policy) steps per run. ``learned``, ``l2rw`` and ``group`` also pay an outer computation.
        model: A size of :data:`MODEL_SIZES` or a pretrained model's path / alias.
        lr: Policy learning rate (AdamW).
        num_real: Real demonstrations.
        num_validation: Validation rows (the outer objective).
        num_synthetic: Synthetic pool size.
    """

    steps: int
    model: str = "tiny"
    lr: float = 3e-3
    num_real: int = 64
    num_validation: int = 64
    num_synthetic: int = 2000


@dataclass(frozen=True)
class Preset:
    """Budget and scale of a suite.

    Attributes:
        name: Preset name (recorded with every run).
        budgets: Per-task budget.
        seeds: Training seeds per (task, method).
        episodes: Held-out rollout episodes per run.
        utility_seeds: Seeds of the utility runs (``uniform`` on real + one generator); 0: no utility runs.
        batch_size: Inner batch rows.
        validation_batch_size: Outer (validation) batch rows.
        max_length: Longest training row in tokens.
        max_new_tokens: Generation budget per agent turn.
    """

    name: str
    budgets: Mapping[str, TaskBudget]
    seeds: int = 5
    episodes: int = 256
    utility_seeds: int = 5
    batch_size: int = 16
    validation_batch_size: int = 16
    max_length: int = 384
    max_new_tokens: int = 16


# Few real rows, so that the synthetic pool is needed (with 64 real rows ``real_only`` alone learns guess_number);
# guess_number's secrets are learned from fewer rows than the other tasks' layouts and objects.
_BUDGETS = {"maze": TaskBudget(steps=300, num_real=16), "guess_number": TaskBudget(steps=300, num_real=8),
            "twenty_questions": TaskBudget(steps=600, num_real=16, num_synthetic=4000)}
PRESETS: dict[str, Preset] = {
    "quick": Preset(name="quick", budgets={t: TaskBudget(steps=60, num_real=16, num_synthetic=400) for t in TASKS},
                    seeds=1,
                    episodes=32, utility_seeds=0),
    "full": Preset(name="full", budgets=_BUDGETS, seeds=5, episodes=256, utility_seeds=5),
}


@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run.

    Attributes:
        task: Embedded task.
        method: Weighting (``learned`` is BOOST, ``oracle`` the ground-truth bound, the rest baselines).
        seed: Seed of the initialisation, the batch order and the head.
        pool: ``all`` (the main comparison); one generator: the run trains on real rows + that generator's rows (a
            utility run); or ``without-<generator>``: the main pool without that generator's rows (leave-one-out).
    """

    task: str
    method: str
    seed: int
    pool: str = MAIN_POOL

    @property
    def run_id(self) -> str:
        """A file-name-safe id of everything that changes the result."""
        if self.pool == MAIN_POOL:
            return f"{self.task}-{self.method}-s{self.seed}"
        pool = self.pool if self.pool.startswith(LEAVE_OUT_PREFIX) else f"only-{self.pool}"
        return f"{self.task}-{self.method}-s{self.seed}-{pool}"


@dataclass
class RunContext:
    """Where and how a suite runs (the same for all its runs).

    Attributes:
        out_dir: The suite's directory (``<out>/<name>``): ``runs/``, ``tb/`` and the reports.
        cache_dir: Generated task data and tokenized splits, shared by suites under the same ``--out``.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision (``32-true``, ``bf16-mixed``).
        overrides: Extra command-line overrides for every run (e.g. a head option), part of the result's identity.
    """

    out_dir: Path
    cache_dir: Path
    accelerator: str = "auto"
    precision: str = "32-true"
    overrides: tuple[str, ...] = field(default_factory=tuple)


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``all`` or a comma list (or sequence) of weightings → validated list, in the given order."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:  # ``fixed`` needs a file of weights, ``retrain`` the learned runs' files
        return [name for name in WEIGHTINGS if name != "fixed"]
    known = [*WEIGHTINGS, *DERIVED_METHODS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose from {known} or 'all'")
    return names


def data_settings(budget: TaskBudget) -> dict[str, Any]:
    """Synthesizer settings of a task's data (the pool seed is fixed: seeds vary training, not data)."""
    return {"num_real": budget.num_real, "num_validation": budget.num_validation,
            "num_synthetic": budget.num_synthetic, "seed": 0}


def generators(task: str, budget: TaskBudget) -> list[str]:
    """The generators of a task's synthetic pool under ``budget``."""
    from boost_lightning.envs.generators import pool_generators

    return pool_generators(task, **data_settings(budget))


def plan(preset: Preset, tasks: Sequence[str], methods: Sequence[str], seeds: int | None = None,
         utility: bool = False, leave_one_out: bool = False) -> list[RunSpec]:
    """The runs of a suite: every task × method × seed, seed-major (a suite stopped part-way already has every method
    on every task), then with ``utility`` the utility runs (``uniform`` on real + each generator; ``real_only`` is
    added to the main runs when missing, as the utility's reference), and with ``leave_one_out`` the leave-one-out
    runs (``uniform`` on the pool without each generator; ``uniform`` on the whole pool is their reference). Both
    over the preset's utility seeds.
    """
    seeds = preset.seeds if seeds is None else seeds
    specs = [RunSpec(task, method, seed) for seed in range(seeds) for task in tasks for method in methods]
    # (reference method, pool of a generator); a reference run already in ``specs`` keeps its place (dict.fromkeys).
    kinds = ([("real_only", "{}")] if utility else []) + ([("uniform", LEAVE_OUT_PREFIX + "{}")] if leave_one_out
                                                          else [])
    for reference, pool in kinds:
        for task in tasks:
            for seed in range(preset.utility_seeds):
                specs.append(RunSpec(task, reference, seed))
                specs += [RunSpec(task, "uniform", seed, pool.format(g))
                          for g in generators(task, preset.budgets[task])]
    return list(dict.fromkeys(specs))


def result_path(ctx: RunContext, spec: RunSpec) -> Path:
    """``<suite>/runs/<run_id>.json``."""
    return ctx.out_dir / "runs" / f"{spec.run_id}.json"


def identity(preset: Preset, ctx: RunContext, spec: RunSpec) -> dict[str, Any]:
    """What a run's result depends on besides its spec: its task budget, the shared settings and the overrides."""
    shared = {k: v for k, v in asdict(preset).items() if k not in ("name", "budgets", "seeds", "utility_seeds")}
    return {"budget": asdict(preset.budgets[spec.task]), **shared, "overrides": list(ctx.overrides)}


def is_finished(ctx: RunContext, spec: RunSpec, preset: Preset) -> bool:
    """A result file exists for ``spec`` and was made with the same budget and overrides (else it is stale)."""
    path = result_path(ctx, spec)
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("identity") == json.loads(json.dumps(identity(preset, ctx, spec)))


def run_suite(specs: Sequence[RunSpec], preset: Preset, ctx: RunContext, force: bool = False,
              progress: bool = True, log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every spec without a result file (all of them with ``force``), one tqdm bar over the runs.

    Returns:
        ``{"ran": n, "skipped": n}``.
    """
    from tqdm.auto import tqdm

    todo = [s for s in specs if force or not is_finished(ctx, s, preset)]
    counts = {"ran": 0, "skipped": len(specs) - len(todo)}
    if counts["skipped"]:
        log(f"{counts['skipped']} of {len(specs)} runs already finished (results in {ctx.out_dir / 'runs'})")
    with tqdm(total=len(todo), desc="bench", unit="run", disable=not progress or not todo) as bar:
        for spec in todo:
            bar.set_postfix_str(spec.run_id)
            result = run_one(spec, preset, ctx)
            # A result file exists only once complete: an interrupted run is redone.
            text = json.dumps(result)
            write_file_atomically(result_path(ctx, spec), lambda tmp, text=text: tmp.write_text(text))
            counts["ran"] += 1
            bar.update(1)
            row = result["row"]
            bar.write(f"  {spec.run_id}: success {row['success_rate']:.3f}, test NLL {row['test_nll']:.3f} "
                      f"({row['train_seconds']:.0f} s train, {result['eval_seconds']:.0f} s eval)")
    return counts


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers", "datasets",
                 "boost_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LoRA.*", ".*modules_to_save.*", ".*log_every_n_steps.*",
                    ".*Checkpoint directory.*", ".*TensorBoard.*", ".*tensorboardX.*", ".*LeafSpec.*",
                    ".*is_gradient_checkpointing.*", ".*exists and is not empty.*", ".*longer than max_length.*",
                    ".*truncated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def pool_generator(pool: str) -> tuple[str, bool]:
    """``(generator, leave_out)`` of a utility pool (``<generator>``) or a leave-one-out pool
    (``without-<generator>``)."""
    leave_out = pool.startswith(LEAVE_OUT_PREFIX)
    return (pool[len(LEAVE_OUT_PREFIX):] if leave_out else pool), leave_out


def pool_file(path: Path, pool: str, out: Path) -> Path:
    """The synthetic JSONL file of a utility or leave-one-out ``pool``: one generator's rows of ``path`` (pool
    ``<generator>``) or all but its rows (``without-<generator>``), written once next to the suite's cache.

    Raises:
        ValueError: ``path`` has no row of that generator.
    """
    generator, leave_out = pool_generator(pool)
    target = out / f"{path.parent.name}-{hashlib.sha256(pool.encode()).hexdigest()[:8]}-{pool}.jsonl"
    if not target.exists():
        from boost_lightning.envs.synthesize import read_jsonl, write_jsonl

        rows = read_jsonl(path)
        if not any(r["meta"]["generator"] == generator for r in rows):
            raise ValueError(f"no rows of generator {generator!r} in {path}")
        rows = [r for r in rows if (r["meta"]["generator"] == generator) != leave_out]
        write_file_atomically(target, lambda tmp: write_jsonl(tmp, rows))
    return target


def cli_arguments(spec: RunSpec, preset: Preset, ctx: RunContext, files: Mapping[str, Path]) -> list[str]:
    """The ``main.py fit`` command line of a run (after ``fit``): ``configs/bench.yaml`` plus overrides."""
    budget = preset.budgets[spec.task]
    args = ["--config", str(BENCH_CONFIG), f"--seed_everything={spec.seed}",
            f"--trainer.default_root_dir={ctx.out_dir}", f"--trainer.accelerator={ctx.accelerator}",
            f"--trainer.precision={ctx.precision}", f"--trainer.logger.init_args.name={spec.run_id}",
            f"--model.max_inner_steps={budget.steps}", f"--model.policy_optimizer.init_args.lr={budget.lr}",
            f"--data.batch_size={preset.batch_size}", f"--data.validation_batch_size={preset.validation_batch_size}",
            f"--data.max_length={preset.max_length}", f"--data.cache_dir={ctx.cache_dir / 'datasets'}"]
    args += [f"--data.{split}={files[split]}" for split in ("real", "synthetic", "validation", "test")]
    if budget.model in MODEL_SIZES:
        args.append(f"--data.tokenizer={files['tokenizer']}")
        args += [f"--model.policy.init_args.config.{k}={v}" for k, v in MODEL_SIZES[budget.model].items()]
    else:  # a pretrained model: its own tokenizer, LoRA only
        args += [f"--data.tokenizer={budget.model}", "--model.policy.init_args.config=null",
                 f"--model.policy.init_args.model_name_or_path={budget.model}",
                 "--model.policy.init_args.modules_to_save=null"]
    if spec.method in (RETRAIN, RETRAIN_ALIGNMENT, RETRAIN_COMBINED):
        args += retrain_arguments(spec, ctx)
    elif spec.method == UTILITY_ORACLE:
        args += ["--model.weighting=boost_lightning.weightings.Oracle",
                 f"--model.weighting.init_args.generators={json.dumps(useful_generators(spec.task, ctx))}"]
    elif spec.method != "learned":  # the config's weighting is ``learned`` with the library's default head
        args.append(f"--model.weighting={spec.method}")
    return args + list(ctx.overrides)


def retrain_arguments(spec: RunSpec, ctx: RunContext) -> list[str]:
    """The weighting of a :data:`RETRAIN` (:data:`RETRAIN_ALIGNMENT`) run: the pool weights (alignment ranks) of the
    ``learned`` run of the same task, seed and pool in this suite, as a selection of its top
    :data:`RETRAIN_TOP_FRACTION`.

    Raises:
        FileNotFoundError: that ``learned`` run has not written its weights yet.
    """
    source = RunSpec(spec.task, "learned", spec.seed, spec.pool)
    needed = [learned_weights_path(ctx, source, alignment=spec.method != RETRAIN)] + (
        [learned_weights_path(ctx, source)] if spec.method == RETRAIN_COMBINED else [])
    for path in needed:
        if not path.exists():
            raise FileNotFoundError(f"{spec.run_id} retrains on the weights of {source.run_id}, which has not written "
                                    f"{path}: run --methods learned first (in the same suite, before {spec.method})")
    path = combined_ranking(*needed) if spec.method == RETRAIN_COMBINED else needed[0]
    return ["--model.weighting=boost_lightning.weightings.FixedWeights", f"--model.weighting.init_args.path={path}",
            f"--model.weighting.init_args.top_fraction={RETRAIN_TOP_FRACTION}",
            "--model.weighting.init_args.equal_weights=true"]


def combined_ranking(alignment_path: Path, weights_path: Path) -> Path:
    """:data:`RETRAIN_COMBINED`'s file beside ``alignment_path`` (``...-alignment.jsonl`` → ``...-combined.jsonl``):
    the alignment file's rows, each synthetic row scored by its rank by alignment plus its rank by the head's weight
    in ``weights_path`` (both among the synthetic rows), weighted by :func:`~boost_lightning.callbacks.alignment_ranks`
    (real rows kept)."""
    from boost_lightning.callbacks import alignment_ranks, rank_order

    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    rows = read(alignment_path)
    head = {(r["source"], r["row_id"]): r["weight"] for r in read(weights_path)}
    synthetic = [r["source"] == "synthetic" for r in rows]
    index = [i for i, s in enumerate(synthetic) if s]
    by_alignment = rank_order([rows[i]["score"] for i in index])
    by_head = rank_order([head[rows[i]["source"], rows[i]["row_id"]] for i in index])
    scores = [0.0] * len(rows)
    for i, a, h in zip(index, by_alignment, by_head):
        scores[i] = float(a + h)
    path = alignment_path.with_name(alignment_path.name.replace("-alignment.jsonl", "-combined.jsonl"))
    path.write_text("".join(json.dumps({**r, "score": s, "weight": w}) + "\n"
                            for r, s, w in zip(rows, scores, alignment_ranks(scores, synthetic))))
    return path


def learned_weights_path(ctx: RunContext, spec: RunSpec, alignment: bool = False) -> Path:
    """Where a run writes its pool weights (``predict``), or with ``alignment`` its rows' alignment ranks."""
    return ctx.out_dir / "weights" / f"{spec.run_id}{'-alignment' if alignment else ''}.jsonl"


def useful_generators(task: str, ctx: RunContext) -> list[str]:
    """The generators of ``task`` whose utility measured in this suite is positive (:data:`UTILITY_ORACLE`).

    Raises:
        FileNotFoundError: the suite has no utility runs of ``task`` (run ``--utility`` first).
    """
    from boost_lightning.bench.report import load_frame, utility_table

    runs = ctx.out_dir / "runs"
    table = utility_table(load_frame(ctx.out_dir), n_boot=100) if runs.exists() else None
    if table is None or task not in set(table["task"]) or table[table["task"] == task]["utility"].isna().all():
        raise FileNotFoundError(f"{UTILITY_ORACLE} keeps the generators of {task} with a positive utility, and "
                                f"{runs} has no utility runs of {task}: run --tasks {task} --utility first (in the "
                                f"same suite, before {UTILITY_ORACLE})")
    table = table[table["task"] == task]
    return sorted(str(g) for g in table.loc[table["utility"] > 0, "generator"])


def run_one(spec: RunSpec, preset: Preset, ctx: RunContext) -> dict[str, Any]:
    """Fit ``spec.method`` on ``spec.task`` through the CLI, then validate (rollouts), test and predict.

    Returns:
        The run's record: ``run_id``, ``spec``, ``identity``, ``row`` (the ``results.csv`` row), ``history``,
        ``eval_seconds`` and, for weightings that score rows, ``weights`` (per-row pool weights with their ground
        truth, for the weight analysis).
    """
    from lightning.pytorch import Trainer

    from boost_lightning.bench.recorder import HistoryRecorder
    from boost_lightning.callbacks import AlignmentWriter, TrajectoryWeightWriter
    from boost_lightning.cli import cli_main
    from boost_lightning.envs.base import EVAL_SEED_START
    from boost_lightning.envs.embedded import embedded_splits
    from boost_lightning.evaluation import RolloutEvaluation

    _quiet()  # after the imports: importing Lightning resets its loggers' levels
    budget = preset.budgets[spec.task]
    files = dict(embedded_splits(spec.task, cache_dir=ctx.cache_dir / "embedded", **data_settings(budget)))
    if spec.pool != MAIN_POOL:
        files["synthetic"] = pool_file(files["synthetic"], spec.pool, ctx.cache_dir / "pools")
    every = max(1, min(10, budget.steps // 10))
    # A rerun (--force, or a stale result) writes its TensorBoard events afresh, not next to the old run's.
    shutil.rmtree(ctx.out_dir / "tb" / spec.run_id, ignore_errors=True)
    args = ["fit", *cli_arguments(spec, preset, ctx, files), f"--diagnostics.every_n_steps={every}",
            "--trainer.callbacks+=boost_lightning.bench.recorder.HistoryRecorder",
            f"--trainer.callbacks.every_n_steps={every}"]
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the run's arguments are ``args``, not the bench's own command line
    try:
        cli = cli_main(args)
    finally:
        sys.argv = argv
    train_seconds = time.perf_counter() - start
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, HistoryRecorder))

    module, dm = cli.model, cli.datamodule
    if spec.method == "learned":  # the outer signal at the trained policy, for RETRAIN_ALIGNMENT (not timed)
        AlignmentWriter(str(learned_weights_path(ctx, spec, alignment=True))).write(cli.trainer, module)
    weights_file = learned_weights_path(ctx, spec)
    rollout = RolloutEvaluation(env=spec.task, num_episodes=preset.episodes, max_new_tokens=preset.max_new_tokens,
                                batch_size=min(preset.episodes, 64), seed=EVAL_SEED_START, num_transcripts=2)
    evaluator = Trainer(accelerator=ctx.accelerator, devices=1, precision=ctx.precision, logger=cli.trainer.logger,
                        callbacks=[rollout, TrajectoryWeightWriter(output_path=str(weights_file))],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(ctx.out_dir))
    start = time.perf_counter()
    val = evaluator.validate(module, datamodule=dm, verbose=False)[0]
    test = evaluator.test(module, datamodule=dm, verbose=False)[0]
    pool = _score_pool(evaluator, module, dm, weights_file)
    eval_seconds = time.perf_counter() - start

    result = rollout.last_result
    row: dict[str, Any] = {
        "task": spec.task, "method": spec.method, "seed": spec.seed, "pool": spec.pool,
        "success_rate": result.success_rate, "episodes": len(result.seeds), "val_loss": float(val["val/loss"]),
        "test_nll": float(test["test/loss"]), "train_seconds": train_seconds,
        "ess_fraction": recorder.ess_fraction[-1] if recorder.ess_fraction else float("nan"),
        "inner_steps": module.inner_steps, "mean_return": result.mean_return,
    }
    record: dict[str, Any] = {
        "run_id": spec.run_id, "spec": asdict(spec), "identity": identity(preset, ctx, spec), "row": row,
        "eval_seconds": eval_seconds, "successes": [bool(s) for s in result.successes],
        "history": {"step": recorder.steps, "ess_fraction": recorder.ess_fraction,
                    "generators": _diagnostics_history(cli.trainer)},
    }
    if pool is not None:
        row.update({f"weight/{g}": w for g, w in pool["per_generator"].items()})
        row["pool_ess_fraction"] = pool["ess_fraction"]
        if spec.method == "learned":
            record["weights"] = pool["rows"]
    return record


def _diagnostics_history(trainer) -> list[dict[str, float]]:
    from boost_lightning.callbacks import WeightDiagnostics

    found = [c for c in trainer.callbacks if isinstance(c, WeightDiagnostics)]
    return found[0].history if found else []


def _score_pool(evaluator, module, dm, path: Path) -> dict[str, Any] | None:
    """``predict`` over real + synthetic rows: mean weight per generator (real rows: ``real``), the pool's ESS, and
    per-row weights with their ground truth. None for a weighting that cannot score rows outside a training step
    (``l2rw``: its weights are a batch's hypergradient)."""
    import math

    import torch

    from boost_lightning.models.weight_head import effective_sample_size

    try:
        evaluator.predict(module, datamodule=dm, return_predictions=False)
    except NotImplementedError:
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_generator: dict[str, list[float]] = {}
    for r in rows:
        key = "real" if r["source"] == "real" else str((r.get("meta") or {}).get("generator", "?"))
        by_generator.setdefault(key, []).append(float(r["weight"]))
    weights = torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float64)
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    return {
        "per_generator": {g: sum(v) / len(v) for g, v in sorted(by_generator.items())},
        "ess_fraction": float(effective_sample_size(weights)) / max(len(rows), 1),
        "rows": {
            "real_weights": [round(float(r["weight"]), 5) for r in rows if r["source"] == "real"],
            "synthetic": {
                "weight": [round(float(r["weight"]), 5) for r in synthetic],
                "quality": [float((r.get("meta") or {}).get("quality", math.nan)) for r in synthetic],
                "generator": [str((r.get("meta") or {}).get("generator", "?")) for r in synthetic],
            },
        },
    }

