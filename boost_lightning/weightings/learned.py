"""BOOST's learned weighting: a small head over detached per-unit features (a trajectory, or an assistant turn with
``granularity: turn``), trained through the hypergradient."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.faults import check_finite
from boost_lightning.models.features import REFERENCE_FEATURES, scalar_features
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.models.weight_head import WeightHead
from boost_lightning.weightings.base import Weighting


class Learned(Weighting):
    """wᵢ = head(featuresᵢ), normalised over the batch; the head is the outer level's learner.

    The head runs on the gathered global batch on every rank (it is tiny): its normalisation and regulariser are
    functions of all N weights, and its running feature statistics see the global batch, so replicas stay identical.

    Args:
        head: The reweighting head (its features, normalisation, regulariser). Built with default settings when
            omitted.
    """

    learns = True

    def __init__(self, head: WeightHead | None = None) -> None:
        super().__init__()
        self.head = head if head is not None else WeightHead()

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.head.scalar_names

    def bind(self, hidden_size: int) -> None:
        self.head.bind(hidden_size)

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Tensor]) -> Tensor:
        """[b, k + 1 (+ H)]: the head's scalar features, the source flag, and the pooled hidden state if used."""
        if "val_similarity" in self.head.scalar_names:
            batch = {**batch, "val_similarity": self.head.validation_similarity(out.pooled)}
        columns = [scalar_features(out, batch, self.head.scalar_names), batch["is_synthetic"].float().unsqueeze(1)]
        if self.head.uses_hidden:
            columns.append(out.pooled.detach().float())
        return torch.cat(columns, dim=1)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return any(name in self.head.features for name in REFERENCE_FEATURES)

    @property
    def observes_validation(self) -> bool:  # type: ignore[override]
        return "val_similarity" in self.head.features

    def observe_validation(self, pooled: Tensor) -> None:
        self.head.observe_validation(pooled)

    def _split(self, inputs: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        k = len(self.head.scalar_names)
        pooled = inputs[:, k + 1:] if self.head.uses_hidden else None
        return inputs[:, :k], pooled, inputs[:, k]

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        """Fold the batch into the head's running feature statistics, then weigh it (no graph)."""
        # A non-finite feature (e.g. a NaN reward) must never reach the running statistics.
        check_finite("weights", inputs)
        scalars, pooled, synthetic = self._split(inputs)
        self.head.observe(scalars)
        with torch.no_grad():
            return self.head(scalars, pooled, synthetic)

    def outer_loss(self, inputs: Tensor, grad_weights: Tensor) -> Tensor:
        """Σᵢ gᵢ·wᵢ(φ) + regulariser: its gradient in φ is Σᵢ gᵢ ∂wᵢ/∂φ, the chain rule through the head."""
        weights = self.head(*self._split(inputs))
        return (grad_weights.to(weights.dtype) * weights).sum() + self.head.regularization(weights)

    def scores(self, inputs: Tensor) -> Tensor:
        scalars, pooled, _ = self._split(inputs)
        return self.head.scores(scalars, pooled)

    def normalize(self, scores: Tensor, synthetic: Tensor) -> Tensor:
        return self.head.normalize(scores, synthetic)
