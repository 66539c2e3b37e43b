"""Callbacks: weight diagnostics for TensorBoard, rollout evaluation, and the weight writer of ``predict``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger


def _tensorboard(trainer: Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class WeightDiagnostics(Callback):
    """Write weight histograms per source and mean weight per ``meta`` group to TensorBoard.

    Weights are collected from every training batch and flushed every ``every_n_steps`` training batches as
    ``weights/hist_real`` and ``weights/hist_synthetic`` histograms and ``weights/<group_by>/<value>`` means.
    The flushed means are also kept in :attr:`history` (one dict per flush) for plots and benchmarks.

    Everything is keyed on the module's ``inner_steps`` (policy steps taken so far), not on
    ``trainer.global_step``: under manual optimization the latter counts the optimizer steps of both levels, so
    it would drift from the policy's progress with head warm-up, an outer cadence above one or skipped steps.

    Args:
        every_n_steps: Flush interval in training batches.
        group_by: ``meta`` key whose values group the synthetic pool (e.g. ``generator``); None: no groups.
    """

    def __init__(self, every_n_steps: int = 25, group_by: str | None = "generator") -> None:
        self.every_n_steps, self.group_by = every_n_steps, group_by
        self.history: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self._weights: dict[str, list[float]] = defaultdict(list)
        self._groups: dict[str, list[float]] = defaultdict(list)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "weights" not in outputs:
            return
        weights = outputs["weights"].float().cpu()
        synthetic = outputs["is_synthetic"].cpu().bool()
        self._weights["real"] += weights[~synthetic].tolist()
        self._weights["synthetic"] += weights[synthetic].tolist()
        if self.group_by is not None:
            for w, meta in zip(weights.tolist(), batch["inner"].get("meta", [])):
                value = (meta or {}).get(self.group_by)
                if value is not None:
                    self._groups[str(value)].append(w)
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._flush(trainer, pl_module.inner_steps)

    def _flush(self, trainer: Trainer, step: int) -> None:
        record: dict[str, float] = {"step": float(step)}
        experiment = _tensorboard(trainer) if trainer.is_global_zero else None
        for source, values in self._weights.items():
            if values and experiment is not None:
                experiment.add_histogram(f"weights/hist_{source}", torch.tensor(values), step)
        for value, ws in sorted(self._groups.items()):
            record[value] = sum(ws) / len(ws)
        if len(record) > 1:
            self.history.append(record)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({f"weights/{self.group_by}/{k}": v for k, v in record.items() if k != "step"},
                                       step=step)
        self._reset()


class RolloutEvaluation(Callback):
    """Play the current policy greedily on held-out task instances and log success.

    Every ``every_n_val_epochs`` validation epochs, ``num_episodes`` instances of ``task`` are played with batched
    generation (chat template, stop at end of turn); ``rollout/success_rate``, ``rollout/return`` and
    ``rollout/turns`` are logged and the first ``num_transcripts`` transcripts go to TensorBoard as text, at the
    module's ``inner_steps``.

    Args:
        task: Embedded task name (``maze``, ``guess_number``, ``twenty_questions``).
        every_n_val_epochs: Evaluation interval in validation epochs.
        num_episodes: Held-out instances played.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated in parallel.
        num_transcripts: Transcripts written as TensorBoard text.
        seed: First seed of the held-out instances.
    """

    def __init__(self, task: str = "maze", every_n_val_epochs: int = 1, num_episodes: int = 32,
                 max_new_tokens: int = 24, batch_size: int = 32, num_transcripts: int = 2, seed: int = 10_000) -> None:
        self.task, self.every_n_val_epochs, self.num_episodes = task, every_n_val_epochs, num_episodes
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.num_transcripts, self.seed = num_transcripts, seed
        self._val_epochs = 0
        self.last_result = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs != 0 or not trainer.is_global_zero:
            return
        from boost_lightning.envs.rollout import evaluate_policy

        result = evaluate_policy(pl_module.policy.model, trainer.datamodule.tokenizer, self.task,
                                 num_episodes=self.num_episodes, seed=self.seed, max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size)
        self.last_result = result
        pl_module.log_dict({"rollout/success_rate": result.success_rate, "rollout/return": result.mean_return,
                            "rollout/turns": result.mean_turns}, rank_zero_only=True)
        experiment = _tensorboard(trainer)
        if experiment is not None:
            for i, transcript in enumerate(result.transcripts[: self.num_transcripts]):
                text = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in transcript)
                experiment.add_text(f"rollout/transcript_{i}", text, pl_module.inner_steps)


class TrajectoryWeightWriter(BasePredictionWriter):
    """Write the head's weight for every trajectory of the ``predict`` split as JSONL.

    One line per row: ``row_id``, ``task_id``, ``source``, ``score`` (raw head score), ``weight`` (normalised
    over the whole file to mean 1, the way the head normalises a batch) and ``features``. Under DDP every rank
    scores its shard; the rows are gathered and rank zero writes one complete file, sorted by ``row_id``.

    Args:
        output_path: The JSONL file to write. Default: ``<trainer.log_dir or default_root_dir>/weights.jsonl``.
    """

    def __init__(self, output_path: str | None = None) -> None:
        # Rows are buffered per batch here rather than read from the loop's predictions, which strategies that
        # spawn processes (and ``return_predictions=False``) do not keep.
        super().__init__(write_interval="batch_and_epoch")
        self.output_path = output_path
        self.written_to: Path | None = None
        self._rows: list[dict[str, Any]] = []

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self._rows.extend(prediction)

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        rows, self._rows = self._rows, []
        # `trainer.log_dir` broadcasts from rank zero: every rank must ask for it, before the others return.
        path = Path(self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / "weights.jsonl")
        gathered: list[Any] = [rows]
        if trainer.world_size > 1:
            # One object gather per predict run; every rank must take part, rank zero writes.
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
        if not trainer.is_global_zero:
            return
        rows = sorted({r["row_id"]: r for part in gathered for r in part}.values(), key=lambda r: r["row_id"])
        if not rows:
            return
        weights = pl_module.weighting.normalize(torch.tensor([r["score"] for r in rows]),
                                                torch.tensor([r["source"] == "synthetic" for r in rows]))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for row, w in zip(rows, weights.tolist()):
                f.write(json.dumps({**row, "weight": w}) + "\n")
        self.written_to = path
