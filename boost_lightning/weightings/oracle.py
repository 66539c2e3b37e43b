"""The benchmark's ``oracle``: real rows plus the synthetic rows whose ground truth says they help.

It reads a label a user does not have (``meta.helpful`` of the embedded tasks' generators: the row solves the real
task on the real dynamics), so it is not a method: it bounds what any weighting can gain from the pool, and the
benchmark reports every method as the fraction of the headroom ``oracle − uniform`` it recovers.

A row's label is not its effect on the policy: a generator of wrong rows can still teach the policy something
(guess_number's hallucinating simulator is labelled unhelpful, yet real rows plus its rows beat the label oracle).
With ``generators`` the oracle keeps the rows of the named generators instead, e.g. those whose measured utility
(``uniform`` on real rows + that generator, minus ``real_only``) is positive: the benchmark's ``utility_oracle``.
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
        generators: Keep the synthetic rows whose ``meta.generator`` is one of these instead of reading ``key``
            (an empty list keeps no synthetic row). ``None``: read ``key``.
    """

    input_names = ("source", "helpful")

    def __init__(self, key: str = "helpful", generators: list[str] | None = None) -> None:
        super().__init__()
        self.key = key
        self.generators = None if generators is None else frozenset(generators)

    def _helpful(self, meta: Mapping[str, Any] | None) -> bool:
        meta = meta or {}
        if self.generators is not None:
            return meta.get("generator") in self.generators
        return bool(meta.get(self.key, False))

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Any]) -> Tensor:
        helpful = [float(self._helpful(meta)) for meta in batch["meta"]]
        return torch.stack([batch["is_synthetic"].float(), torch.tensor(helpful, device=out.loss.device)], dim=1)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return torch.maximum(1.0 - inputs[:, 0], inputs[:, 1])

    def select(self, rows: Mapping[str, Sequence[Any]]) -> list[bool]:
        """Real rows and the synthetic rows labelled helpful (or of the kept generators)."""
        return [not s or self._helpful(m) for s, m in zip(rows["is_synthetic"], rows["meta"])]


__all__ = ["Oracle"]
