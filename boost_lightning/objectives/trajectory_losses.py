"""Per-trajectory objectives: each maps per-trajectory agent NLL [B] (and returns) to a loss [B].

They differ only in a per-trajectory multiplier on the NLL, so every one of them goes through the same weighted
reduction (:func:`boost_lightning.objectives.reduce.weighted_loss`) and the same hypergradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def behaviour_cloning(nll: Tensor, reward: Tensor | None = None) -> Tensor:
    """Behaviour cloning: the agent-token NLL itself."""
    return nll


def filtered_bc_mask(reward: Tensor, top_fraction: float = 0.5) -> Tensor:
    """1 for trajectories whose return is in the top ``top_fraction`` of the batch, else 0 (ties kept)."""
    from boost_lightning.baselines.weighting import top_fraction_mask

    return top_fraction_mask(reward, torch.ones_like(reward, dtype=torch.bool), top_fraction).to(reward.dtype)


def filtered_bc(nll: Tensor, reward: Tensor, top_fraction: float = 0.5) -> Tensor:
    """Filtered BC: NLL on the top ``top_fraction`` of trajectories by return, 0 elsewhere."""
    return nll * filtered_bc_mask(reward, top_fraction)


def exponential_weights(reward: Tensor, beta: float = 1.0, baseline: Tensor | float = 0.0,
                        max_weight: float = 20.0) -> Tensor:
    """exp(β·(R − baseline)), clipped at ``max_weight`` (AWR-style; the clip bounds the variance)."""
    return torch.exp(beta * (reward - baseline)).clamp(max=max_weight)


def reward_weighted(nll: Tensor, reward: Tensor, beta: float = 1.0, max_weight: float = 20.0) -> Tensor:
    """Reward-weighted regression: exp(β·R)·NLL with the batch max return as baseline (for stability)."""
    return nll * exponential_weights(reward, beta, reward.max(), max_weight)


def advantage_weighted(nll: Tensor, reward: Tensor, baseline: Tensor | float | None = None, beta: float = 1.0,
                       max_weight: float = 20.0) -> Tensor:
    """Advantage-weighted regression: exp(β·(R − b))·NLL with b the batch mean return unless given."""
    b = reward.mean() if baseline is None else baseline
    return nll * exponential_weights(reward, beta, b, max_weight)
