"""The one place where trajectory weights meet trajectory losses.

L = Σᵢ wᵢ ℓᵢ / Σᵢ wᵢ over the *whole* batch. Written as a sum over rows divided by a total that the caller
computes once for the whole batch, so splitting the batch into micro-batches (or ranks) and adding the parts
gives exactly the full-batch value and gradient. Under data parallelism ``total_weight`` is Σ w over every rank's
rows and the per-rank gradients are *summed* (not averaged, as DDP's reducer would) to give the global gradient.
"""

from __future__ import annotations

from torch import Tensor


def weighted_loss(losses: Tensor, weights: Tensor, total_weight: Tensor | float | None = None) -> Tensor:
    """Σ wᵢℓᵢ / total_weight (total_weight defaults to Σ wᵢ of this call's rows).

    Args:
        losses: [b] per-trajectory losses (with graph).
        weights: [b] per-trajectory weights (detached for the inner level).
        total_weight: Σ w over the full batch when ``losses`` is one micro-batch of it.
    """
    if losses.shape != weights.shape:
        raise ValueError(f"losses {tuple(losses.shape)} and weights {tuple(weights.shape)} differ in shape")
    if total_weight is None:
        total_weight = weights.sum()
    return (weights.to(losses.dtype) * losses).sum() / total_weight
