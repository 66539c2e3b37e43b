"""A callback that keeps a run's batch ESS over training, for the benchmark's records and plots."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from boost_lightning.models.weight_head import effective_sample_size


class HistoryRecorder(Callback):
    """Mean batch ESS / N over windows of ``every_n_steps`` inner batches, keyed by the module's ``inner_steps``.

    Args:
        every_n_steps: Inner batches per recorded point.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self.steps: list[int] = []
        self.ess_fraction: list[float] = []
        self._window: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "weights" not in outputs:
            return
        w = outputs["weights"].float()
        self._window.append(float(effective_sample_size(w)) / w.shape[0])
        if len(self._window) >= self.every_n_steps:
            self.steps.append(int(pl_module.inner_steps))
            self.ess_fraction.append(sum(self._window) / len(self._window))
            self._window = []
