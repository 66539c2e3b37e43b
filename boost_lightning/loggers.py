"""What the callbacks and the data module need of the run's loggers (Lightning only, no model or data code)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def tensorboard_experiment(trainer: Trainer) -> Any:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
