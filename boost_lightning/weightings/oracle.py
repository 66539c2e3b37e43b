"""The benchmark's ``oracle``: real rows plus the synthetic rows whose ground truth says they help.

It reads a label a user does not have (``meta.helpful`` of the embedded tasks' generators: the row solves the real
task on the real dynamics), so it is not a method: it bounds what any weighting can gain from the pool, and the
benchmark reports every method as the fraction of the headroom ``oracle − uniform`` it recovers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings.base import Weighting


class Oracle(Weighting):
    """Weight 1 for real rows and for synthetic rows whose ``meta[key]`` is true, 0 for the rest.

    The rows it drops are dropped from the data before batching (:meth:`select`), so every batch is full of rows
    that count, as for filtered behaviour cloning.

    Args:
        key: The ``meta`` field holding the ground truth (``helpful`` in the embedded tasks' data).
    """

    input_names = ("source", "helpful")

    def __init__(self, key: str = "helpful") -> None:
        super().__init__()
        self.key = key

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Any]) -> Tensor:
        helpful = [float(bool((meta or {}).get(self.key, False))) for meta in batch["meta"]]
        return torch.stack([batch["is_synthetic"].float(), torch.tensor(helpful, device=out.loss.device)], dim=1)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return torch.maximum(1.0 - inputs[:, 0], inputs[:, 1])

    def select(self, rows: Mapping[str, Sequence[Any]]) -> list[bool]:
        """Real rows and the synthetic rows labelled helpful."""
        return [not s or bool((m or {}).get(self.key, False)) for s, m in zip(rows["is_synthetic"], rows["meta"])]


__all__ = ["Oracle"]
