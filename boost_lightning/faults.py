"""Skipping steps that meet a non-finite value: one exception, one guard.

Whatever finds a NaN or an infinity (a weight, the inner loss, a gradient, the hypergradient) raises
:class:`NonFiniteError` naming what it was; the training step catches it in one place and asks the
:class:`FaultGuard` to undo the step. Nothing has stepped yet when a check fails (every check runs before the first
``optimizer.step()`` of the batch), so undoing means dropping the pending gradients and restoring the running state a
step updates besides parameters and optimizers: the weighting's buffers (the head's feature statistics, a fitted
baseline). The guard also counts faults per kind and stops the run after too many in a row.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

FAULT_KINDS = ("inner_loss", "weights", "hypergrad", "grad")


class SkippedStep(Exception):
    """The current training step cannot go through and is undone; ``kind`` says why."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class NonFiniteError(SkippedStep):
    """A non-finite value was found; ``kind`` is one of :data:`FAULT_KINDS`. Counts towards the fault limit."""


class EmptyBatchError(SkippedStep):
    """Every weight of the global batch is zero (e.g. ``real_only`` on a batch without real rows): a step on no data.

    Skipped and counted apart; it is not a fault and never counts as a policy step.
    """


class FaultLimitError(RuntimeError):
    """Raised when too many consecutive steps had to be skipped for non-finite values."""


def check_finite(kind: str, *values: Tensor | None) -> None:
    """Raise :class:`NonFiniteError` (``kind``) unless every given tensor is finite."""
    for value in values:
        if value is not None and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(kind)


def check_grads_finite(kind: str, optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`NonFiniteError` (``kind``) if any gradient held by ``optimizer`` is non-finite."""
    check_finite(kind, *(p.grad for group in optimizer.param_groups for p in group["params"]))


class FaultGuard:
    """Counters, the rollback snapshot and the consecutive-fault limit of the training step.

    Args:
        max_consecutive: Raise :class:`FaultLimitError` after this many consecutive skipped steps.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_faults must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.consecutive = 0
        self._snapshot: dict[str, Tensor] = {}

    def snapshot(self, module: nn.Module) -> None:
        """Copy the buffers a step may update (tiny: feature statistics, a fitted baseline)."""
        self._snapshot = {n: b.detach().clone() for n, b in module.named_buffers()}

    def rollback(self, module: nn.Module, optimizers: Iterable[torch.optim.Optimizer | None]) -> None:
        """Undo the step: drop pending gradients and restore the snapshot's buffers.

        Gradients accumulated by earlier batches of the same accumulation cycle are dropped with it.
        """
        for optimizer in optimizers:
            if optimizer is not None:
                optimizer.zero_grad()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in self._snapshot:
                    buffer.copy_(self._snapshot[name])

    def record(self, kind: str) -> int:
        """Count a skipped step of ``kind``; returns its total. Raises :class:`FaultLimitError` at the limit."""
        self.counts[kind] += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise FaultLimitError(
                f"{self.consecutive} consecutive steps skipped for non-finite values (last: {kind}; "
                f"totals {self.counts}). Check the data (rewards), the learning rates and the precision."
            )
        return self.counts[kind]

    def succeeded(self) -> None:
        """A policy step went through: the consecutive count starts again."""
        self.consecutive = 0

    def state_dict(self) -> dict[str, object]:
        return {"counts": dict(self.counts), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.counts.update(state.get("counts", {}))
        self.consecutive = int(state.get("consecutive", 0))
