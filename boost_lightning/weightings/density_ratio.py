"""``density_ratio``: importance weights of synthetic rows from a real-vs-synthetic classifier, no bilevel loop.

The standard way to "upweight synthetic data that looks like the real distribution" (covariate-shift importance
weighting by a probabilistic classifier; Bickel, Brückner & Scheffer, JMLR 2009): a classifier p(real | x) on the
policy's pooled hidden state x gives w(x) ∝ p/(1 − p) = p(x | real) / p(x | synthetic) · const. The classifier is
linear discriminant analysis (shared covariance), fitted in closed form from running sufficient statistics of every
batch seen so far: O(H²) memory in buffers, checkpointed and restored with a skipped step, identical on every rank
because it sees the gathered global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings.base import Weighting


class DensityRatio(Weighting):
    """Synthetic rows weighted by p(real | x) / p(synthetic | x), normalised to mean 1 over the batch's synthetic
    rows and clipped at ``max_weight``; real rows weight 1.

    Args:
        max_weight: Clip of a synthetic row's normalised weight (importance weights are heavy-tailed).
        ridge: Ridge added to the shared covariance, relative to its mean variance.
    """

    def __init__(self, max_weight: float = 10.0, ridge: float = 0.1) -> None:
        super().__init__()
        if max_weight <= 0 or ridge < 0:
            raise ValueError(f"max_weight must be > 0 and ridge >= 0, got {max_weight}, {ridge}")
        self.max_weight, self.ridge = max_weight, ridge
        self.register_buffer("count", torch.zeros(2, dtype=torch.float64))  # [real, synthetic]
        self.register_buffer("total", torch.zeros(2, 0, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(0, 0, dtype=torch.float64))

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("source", *(f"hidden_{i}" for i in range(self.total.shape[1])))

    def bind(self, hidden_size: int) -> None:
        self.total = torch.zeros(2, hidden_size, dtype=torch.float64)
        self.outer = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Any]) -> Tensor:
        return torch.cat([batch["is_synthetic"].float().unsqueeze(1), out.pooled.detach().float()], dim=1)

    def observe(self, inputs: Tensor) -> None:
        """Fold a batch into the class counts, sums and the second moment."""
        synthetic, x = inputs[:, 0].bool().to(self.count.device), inputs[:, 1:].double().to(self.count.device)
        for c, rows in ((0, ~synthetic), (1, synthetic)):
            self.count[c] += rows.sum()
            self.total[c] += x[rows].sum(0)
        self.outer += x.T @ x

    def log_ratio(self, inputs: Tensor) -> Tensor:
        """log p(real | x) / p(synthetic | x) [N] under the fitted LDA; zeros until both classes were seen."""
        x = inputs[:, 1:].double().to(self.count.device)
        if (self.count < 2).any():
            return torch.zeros(x.shape[0], dtype=torch.float32, device=inputs.device)
        mean = self.total / self.count[:, None]
        # Pooled within-class scatter: Σ xxᵀ − Σ_c n_c μ_c μ_cᵀ.
        scatter = self.outer - (self.count[:, None, None] * mean[:, :, None] * mean[:, None, :]).sum(0)
        cov = scatter / (self.count.sum() - 2).clamp(min=1)
        cov = cov + self.ridge * cov.diagonal().mean().clamp(min=1e-12) * torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                                    device=cov.device)
        beta = torch.linalg.solve(cov, mean[0] - mean[1])
        bias = -0.5 * (mean[0] + mean[1]) @ beta + torch.log(self.count[0] / self.count[1])
        return (x @ beta + bias).to(inputs.device, torch.float32)

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        self.observe(inputs)
        return self._weights(inputs, self.log_ratio(inputs))

    def _weights(self, inputs: Tensor, log_ratio: Tensor) -> Tensor:
        synthetic = inputs[:, 0].bool()
        weights = torch.ones_like(log_ratio)
        if synthetic.any():
            z = log_ratio[synthetic]
            ratio = torch.exp(z - z.max())  # the batch's max cancels in the normalisation below
            weights[synthetic] = (ratio / ratio.mean()).clamp(max=self.max_weight)
        return weights

    def scores(self, inputs: Tensor) -> Tensor:
        return self.log_ratio(inputs)

    def normalize(self, scores: Tensor, synthetic: Tensor) -> Tensor:
        inputs = torch.stack([synthetic.float(), scores.float()], dim=1)
        return self._weights(inputs, scores.float())


__all__ = ["DensityRatio"]
