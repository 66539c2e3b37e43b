"""The method × task benchmark: run specs, presets and the resumable runner.

Every run trains one weighting (``learned`` is BOOST, the rest are baselines) on one embedded task with the same
budget (inner steps, batch size, learning rate, model), then plays the trained policy greedily on held-out real
task instances (the envs' evaluation seed range, never used for data) and records the rollout success rate.

A run is identified by its :attr:`RunSpec.run_id`; a finished run leaves ``runs/<run_id>.json`` (its spec, the
preset, metrics, training histories and, for ``learned``, the head's weight of every training row) and is skipped
the next time. Runs happen in this process, one after another: importing torch and Lightning costs seconds, and a
suite has dozens of runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from boost_lightning.models.weight_head import effective_sample_size
from boost_lightning.weightings import WEIGHTINGS

#: Randomly initialised Llama sizes ``--model`` accepts by name (anything else is a path or alias of a pretrained
#: causal LM). The vocabulary is the embedded tasks' 1024-token tokenizer.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "small": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2},
    "base": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 8,
             "num_key_value_heads": 4},
}


@dataclass(frozen=True)
class Preset:
    """Budget and scale of a suite; every method of a suite gets the same one.

    Attributes:
        name: Preset name (recorded with every run).
        steps: Inner (policy) steps per run. ``learned`` and ``l2rw`` also pay an outer computation per step.
        batch_size: Inner batch rows.
        validation_batch_size: Outer (validation) batch rows.
        lr: Policy learning rate (AdamW).
        head_lr: Head learning rate (Adam).
        max_length: Longest training row in tokens.
        num_real: Real demonstrations.
        num_synthetic: Synthetic pool size of the main comparison.
        shifted_fraction: Share of task-shifted rows in the main comparison's pool.
        hallucinated_fraction: Share of hallucinating-simulator rows.
        episodes: Held-out rollout episodes per run.
        max_new_tokens: Generation budget per agent turn.
        seeds: Seeds per (method, task) of the main comparison.
        lora_r: LoRA rank.
        regularizer: The head's regulariser used by the ablation's strength axis (``ess`` or ``entropy``).
        ablation_shifted: Shifted fractions of the ablation axis.
        ablation_pool_sizes: Synthetic pool sizes of the ablation axis.
        ablation_strengths: Regulariser strengths of the ablation axis (``learned`` only).
        ablation_methods: Methods run on the ablation axis.
        ablation_seeds: Seeds per ablation point.
        record_every: Inner batches per point of the training histories.
    """

    name: str
    steps: int
    batch_size: int = 16
    validation_batch_size: int = 16
    lr: float = 3e-3
    head_lr: float = 1e-3
    max_length: int = 384
    num_real: int = 64
    num_synthetic: int = 2000
    shifted_fraction: float = 0.3
    hallucinated_fraction: float = 0.1
    episodes: int = 64
    max_new_tokens: int = 16
    seeds: int = 3
    lora_r: int = 16
    regularizer: str = "ess"
    ablation_shifted: tuple[float, ...] = (0.0, 0.3, 0.6)
    ablation_pool_sizes: tuple[int, ...] = (500, 2000)
    ablation_strengths: tuple[float, ...] = (0.0, 0.3, 3.0)
    ablation_methods: tuple[str, ...] = ("uniform", "learned")
    ablation_seeds: int = 1
    record_every: int = 10


PRESETS: dict[str, Preset] = {
    "quick": Preset(name="quick", steps=150, head_lr=3e-3, num_synthetic=600, episodes=16, seeds=1,
                    ablation_shifted=(0.0, 0.3, 0.6), ablation_pool_sizes=(), ablation_strengths=(0.0, 3.0),
                    record_every=10),
    "full": Preset(name="full", steps=250, num_synthetic=2000, episodes=64, seeds=3, ablation_pool_sizes=(500, 2000),
                   ablation_strengths=(0.0, 0.3, 3.0), record_every=20),
}


@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run.

    Attributes:
        task: Embedded task.
        method: Weighting (``learned`` or a baseline).
        seed: Seed of the initialisation, the batch order and the head.
        shifted_fraction: Share of task-shifted rows in the synthetic pool.
        num_synthetic: Synthetic pool size.
        regularizer_strength: Strength of the head's regulariser (``learned`` only).
        axes: Which parts of the suite asked for this run (``main``, ``shifted``, ``pool``, ``regularizer``).
    """

    task: str
    method: str
    seed: int
    shifted_fraction: float
    num_synthetic: int
    regularizer_strength: float = 0.0
    axes: tuple[str, ...] = ("main",)

    @property
    def run_id(self) -> str:
        """A file-name-safe id of everything that changes the result (``axes`` does not)."""
        reg = f"-reg{self.regularizer_strength:g}" if self.method == "learned" else ""
        return (f"{self.task}-{self.method}-s{self.seed}-sf{self.shifted_fraction:g}-n{self.num_synthetic}{reg}")


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """``all`` or a comma list (or sequence) of weightings → validated list, in the given order."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(WEIGHTINGS)
    unknown = [n for n in names if n not in WEIGHTINGS]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose from {list(WEIGHTINGS)} or 'all'")
    return names


def plan(preset: Preset, tasks: Sequence[str], methods: Sequence[str], seeds: int | None = None,
         ablation: bool = True, ablation_task: str | None = None) -> list[RunSpec]:
    """The runs of a suite: every method × task × seed plus the ablation axes on one task.

    Ablation points that coincide with a main run (same task, method, seed, pool) are that run, so they cost
    nothing extra; such specs are merged and list every axis they belong to.

    Args:
        preset: Budget and ablation values.
        tasks: Tasks of the main comparison.
        methods: Methods of the main comparison.
        seeds: Seeds per (method, task); default ``preset.seeds``.
        ablation: Add the ablation axes.
        ablation_task: Task of the ablation (default: the first of ``tasks``).
    """
    seeds = preset.seeds if seeds is None else seeds
    base = {"shifted_fraction": preset.shifted_fraction, "num_synthetic": preset.num_synthetic}
    specs: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        old = specs.get(spec.run_id)
        specs[spec.run_id] = spec if old is None else replace(old, axes=tuple(dict.fromkeys(old.axes + spec.axes)))

    # Seed 0 of the main comparison, then the ablation, then the other seeds: a suite stopped part-way (it resumes
    # anyway) already has every method on every task, and the ablation, to report.
    for task in tasks:
        for method in methods:
            add(RunSpec(task, method, 0, **base))
    if ablation and tasks:
        task = ablation_task or tasks[0]
        for seed in range(preset.ablation_seeds):
            for method in preset.ablation_methods:
                for sf in preset.ablation_shifted:
                    add(RunSpec(task, method, seed, sf, preset.num_synthetic, axes=("shifted",)))
                for n in preset.ablation_pool_sizes:
                    add(RunSpec(task, method, seed, preset.shifted_fraction, n, axes=("pool",)))
            for strength in preset.ablation_strengths:
                add(RunSpec(task, "learned", seed, preset.shifted_fraction, preset.num_synthetic, strength,
                            axes=("regularizer",)))
    for seed in range(1, seeds):
        for task in tasks:
            for method in methods:
                add(RunSpec(task, method, seed, **base))
    return list(specs.values())


@dataclass
class RunContext:
    """Where and how a suite runs (the same for all its runs).

    Attributes:
        out_dir: The suite's directory (``<out>/<name>``): ``runs/``, ``tb/`` and the reports.
        cache_dir: Generated task data and tokenized splits, shared by suites under the same ``--out``.
        model: A size of :data:`MODEL_SIZES` or a pretrained model's path / alias.
        accelerator: Lightning accelerator (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision (``32-true``, ``bf16-mixed``).
        head_reweight: The ``learned`` head's ``reweight`` (``all`` or ``synthetic``, see ``WeightHead``).
    """

    out_dir: Path
    cache_dir: Path
    model: str = "tiny"
    accelerator: str = "cpu"
    precision: str = "32-true"
    head_reweight: str = "all"


def result_path(ctx: RunContext, spec: RunSpec) -> Path:
    """``<suite>/runs/<run_id>.json``."""
    return ctx.out_dir / "runs" / f"{spec.run_id}.json"


def is_finished(ctx: RunContext, spec: RunSpec, preset: Preset) -> bool:
    """A result file exists for ``spec`` and was made with the same preset, model and head (else it is stale)."""
    path = result_path(ctx, spec)
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    same_head = spec.method != "learned" or record.get("head_reweight", "all") == ctx.head_reweight
    return (record.get("preset") == json.loads(json.dumps(asdict(preset))) and record.get("model") == ctx.model
            and same_head)


def data_settings(preset: Preset, spec: RunSpec) -> dict[str, Any]:
    """Synthesizer settings of a run's data (the pool seed is fixed: seeds vary training, not data)."""
    return {"num_real": preset.num_real, "num_validation": 64, "num_synthetic": spec.num_synthetic,
            "shifted_fraction": spec.shifted_fraction, "hallucinated_fraction": preset.hallucinated_fraction,
            "seed": 0}


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
            path = result_path(ctx, spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)  # a result file exists only once complete: an interrupted run is redone
            counts["ran"] += 1
            bar.update(1)
            bar.write(f"  {spec.run_id}: success {result['metrics']['success_rate']:.3f} "
                      f"({result['metrics']['train_seconds']:.0f} s train, {result['metrics']['eval_seconds']:.0f} s "
                      f"eval)")
    return counts


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LoRA.*", ".*modules_to_save.*", ".*log_every_n_steps.*",
                    ".*Checkpoint directory.*", ".*TensorBoard.*", ".*tensorboardX.*", ".*LeafSpec.*",
                    ".*is_gradient_checkpointing.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _build_policy(ctx: RunContext, preset: Preset, tokenizer, seed: int):
    from boost_lightning.models import PolicyModel

    if ctx.model in MODEL_SIZES:
        # Random init: embeddings and LM head must be learned, so they train in full next to the LoRA adapters.
        config = {"model_type": "llama", "vocab_size": len(tokenizer), **MODEL_SIZES[ctx.model],
                  "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "tie_word_embeddings": False}
        return PolicyModel(config=config, r=preset.lora_r, lora_alpha=2 * preset.lora_r,
                           modules_to_save=["embed_tokens", "lm_head"], seed=seed)
    return PolicyModel(model_name_or_path=ctx.model, r=preset.lora_r, lora_alpha=2 * preset.lora_r, seed=seed)


def _tokenizer(ctx: RunContext, preset: Preset, task: str):
    """One tokenizer per task for every run: the embedded one of the main pool, or the pretrained model's."""
    from boost_lightning.data.tokenizer import load_tokenizer
    from boost_lightning.envs.embedded import ensure_embedded

    if ctx.model in MODEL_SIZES:
        base = RunSpec(task, "uniform", 0, preset.shifted_fraction, preset.num_synthetic)
        data = ensure_embedded(task, cache_dir=ctx.cache_dir / "embedded", **data_settings(preset, base))
        return load_tokenizer(str(data / "tokenizer"))
    from boost_lightning.models.pretrained import resolve_model_path

    return load_tokenizer(resolve_model_path(ctx.model))


def run_one(spec: RunSpec, preset: Preset, ctx: RunContext) -> dict[str, Any]:
    """Train ``spec.method`` on ``spec.task`` with the preset's budget, evaluate by rollout, analyse the weights.

    Returns:
        The run's record: ``run_id``, ``spec``, ``preset``, ``model``, ``metrics``, ``history``, ``tradeoff`` and
        (``learned``) ``weights``.
    """
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from boost_lightning.callbacks import WeightDiagnostics
    from boost_lightning.data.datamodule import BoostDataModule
    from boost_lightning.envs.base import EVAL_SEED_START
    from boost_lightning.envs.embedded import ensure_embedded
    from boost_lightning.envs.rollout import evaluate_policy
    from boost_lightning.models import WeightHead
    from boost_lightning.module import BoostModule
    from boost_lightning.weightings import Learned

    _quiet()  # after the imports: importing lightning resets its loggers' levels
    data = ensure_embedded(spec.task, cache_dir=ctx.cache_dir / "embedded", **data_settings(preset, spec))
    tokenizer = _tokenizer(ctx, preset, spec.task)
    seed_everything(spec.seed, workers=True, verbose=False)
    dm = BoostDataModule(real=str(data / "real.jsonl"), synthetic=str(data / "synthetic.jsonl"),
                         validation=str(data / "validation.jsonl"), tokenizer=tokenizer, batch_size=preset.batch_size,
                         validation_batch_size=preset.validation_batch_size, max_length=preset.max_length,
                         drop_truncated=True, seed=spec.seed, cache_dir=str(ctx.cache_dir / "datasets"))
    policy = _build_policy(ctx, preset, tokenizer, spec.seed)
    head = WeightHead(regularizer=preset.regularizer if spec.regularizer_strength > 0 else "none",
                      regularizer_strength=spec.regularizer_strength, reweight=ctx.head_reweight, seed=spec.seed)
    lr, head_lr = preset.lr, preset.head_lr
    weighting = Learned(head) if spec.method == "learned" else spec.method
    module = BoostModule(policy, weighting, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
                         head_optimizer=lambda p: torch.optim.Adam(p, lr=head_lr),
                         max_inner_steps=preset.steps)
    # At least ~10 points per history, also for very short runs.
    every = max(1, min(preset.record_every, preset.steps // 10))
    diagnostics = WeightDiagnostics(every_n_steps=every, group_by="generator")
    recorder = HistoryRecorder(every_n_steps=every)
    logger = TensorBoardLogger(save_dir=str(ctx.out_dir / "tb"), name=spec.run_id, version="", default_hp_metric=False)
    trainer = Trainer(accelerator=ctx.accelerator, devices=1, precision=ctx.precision, max_epochs=10_000,
                      logger=logger, callbacks=[diagnostics, recorder], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, log_every_n_steps=every, use_distributed_sampler=False,
                      default_root_dir=str(ctx.out_dir))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_seconds = time.perf_counter() - start
    tradeoff = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("tradeoff/")}

    device = trainer.strategy.root_device
    module.to(device).eval()
    start = time.perf_counter()
    rollout = evaluate_policy(module.policy.model, tokenizer, spec.task, num_episodes=preset.episodes,
                              seed=EVAL_SEED_START, max_new_tokens=preset.max_new_tokens,
                              batch_size=min(preset.episodes, 32))
    eval_seconds = time.perf_counter() - start
    val_loss = _mean_loss(module, dm, "validation", device, preset.validation_batch_size)

    metrics = {
        "success_rate": rollout.success_rate, "mean_return": rollout.mean_return, "mean_turns": rollout.mean_turns,
        "val_loss": val_loss, "inner_steps": module.inner_steps, "outer_steps": module.outer_steps,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "ess_fraction": recorder.ess_fraction[-1] if recorder.ess_fraction else 1.0,
    }
    result: dict[str, Any] = {
        "run_id": spec.run_id, "spec": asdict(spec), "preset": asdict(preset), "model": ctx.model,
        "accelerator": str(device), "metrics": metrics, "tradeoff": tradeoff,
        "history": {"step": recorder.steps, "ess_fraction": recorder.ess_fraction,
                    "tradeoff": recorder.tradeoff, "generators": diagnostics.history},
    }
    if spec.method == "learned":
        result["weights"] = score_pool(module, dm, device, preset.validation_batch_size)
        result["alignment"] = recorder.alignment
        result["head_reweight"] = ctx.head_reweight
        metrics["pool_ess_fraction"] = result["weights"]["pool_ess_fraction"]
    return result


def _make_recorder_class():
    from lightning.pytorch import Callback

    from boost_lightning.bilevel.hypergradient import unit_rms

    class _HistoryRecorder(Callback):
        """Mean batch ESS / B over windows of ``every_n_steps`` inner batches, and any ``tradeoff/*`` metrics."""

        def __init__(self, every_n_steps: int) -> None:
            self.every_n_steps = every_n_steps
            self.steps: list[int] = []
            self.ess_fraction: list[float] = []
            self.tradeoff: list[dict[str, float]] = []
            self._window: list[float] = []
            self._alignment: dict[str, list[float]] = {}

        @property
        def alignment(self) -> dict[str, float]:
            """Mean alignment −gᵢ/rms(g) per generator (real rows: ``real``) over every outer step of the run."""
            return {k: sum(v) / len(v) for k, v in sorted(self._alignment.items())}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not isinstance(outputs, dict) or "weights" not in outputs:
                return
            g = outputs.get("hypergradient")
            if g is not None:
                # Scale-free per batch, as the head sees it: > 0 means a larger weight lowers the validation loss.
                a = (-unit_rms(g.float())).tolist()
                for value, meta, synthetic in zip(a, batch["inner"]["meta"], outputs["is_synthetic"].tolist()):
                    key = str((meta or {}).get("generator", "?")) if synthetic else "real"
                    self._alignment.setdefault(key, []).append(value)
            w = outputs["weights"].float()
            self._window.append(float(effective_sample_size(w)) / w.shape[0])
            if len(self._window) >= self.every_n_steps:
                self.steps.append(int(pl_module.inner_steps))
                self.ess_fraction.append(sum(self._window) / len(self._window))
                self.tradeoff.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                      if k.startswith("tradeoff/")})
                self._window = []

    return _HistoryRecorder


def HistoryRecorder(every_n_steps: int):  # noqa: N802  (a factory: Lightning is imported lazily)
    """A callback recording ESS/B (and ``tradeoff/*`` metrics) over training; built on first use."""
    return _make_recorder_class()(every_n_steps)


def _loader(dm, name: str, batch_size: int):
    from torch.utils.data import DataLoader

    from boost_lightning.data.collate import TrajectoryCollator

    return DataLoader(dm.splits[name].dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=TrajectoryCollator(dm.tokenizer.pad_token_id))


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _mean_loss(module, dm, split: str, device, batch_size: int) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _loader(dm, split, batch_size):
            loss = module.policy.trajectory_forward(_to(batch, device)).loss
            total, count = total + float(loss.sum()), count + loss.shape[0]
    return total / max(count, 1)


def score_pool(module, dm, device, batch_size: int) -> dict[str, Any]:
    """The trained head's weight for every training row (real and synthetic), normalised over the whole pool.

    Weights use the head's own normalisation applied to all rows at once, so they are relative to the pool mean
    (= 1). The ground truth (``meta``) is read here for the analysis only; the head never sees it.

    Returns:
        ``{"real_weights": [...], "synthetic": {"weight", "quality", "generator", "shifted", "hallucinated"}
        (lists, one entry per synthetic row), "pool_ess_fraction"}``.
    """
    import torch

    weighting = module.weighting
    scores, synthetic, metas = [], [], []
    with torch.no_grad():
        for split in ("real", "synthetic"):
            for batch in _loader(dm, split, batch_size):
                batch = _to(batch, device)
                out = module.policy.trajectory_forward(batch)
                scores.append(weighting.scores(weighting.inputs(out, batch)).float().cpu())
                synthetic += [split == "synthetic"] * out.loss.shape[0]
                metas += batch["meta"]
        weights = weighting.normalize(torch.cat(scores), torch.tensor(synthetic)).tolist()
    n = len(weights)
    ess = float(effective_sample_size(torch.tensor(weights, dtype=torch.float64))) / max(n, 1)
    syn = [(w, m) for w, m, s in zip(weights, metas, synthetic) if s]
    return {
        "real_weights": [round(w, 5) for w, s in zip(weights, synthetic) if not s],
        "synthetic": {
            "weight": [round(w, 5) for w, _ in syn],
            "quality": [float(m.get("quality", math.nan)) for _, m in syn],
            "generator": [str(m.get("generator", "?")) for _, m in syn],
            "shifted": [bool(m.get("shifted", False)) for _, m in syn],
            "hallucinated": [bool(m.get("hallucinated", False)) for _, m in syn],
        },
        "pool_ess_fraction": ess,
    }


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every finished run's record under ``<out_dir>/runs``, sorted by run id."""
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "runs").glob("*.json"))]
