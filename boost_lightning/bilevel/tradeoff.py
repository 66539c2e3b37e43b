"""The three quantities BOOST's PAC-Bayes bound trades off, measured on one batch.

A weighting that concentrates mass on low-loss trajectories lowers the **weighted empirical risk** but shrinks the
**effective sample size**; spreading mass over more synthetic data keeps ESS high but lets in **task shift**, the
distance between the weighted synthetic distribution and the real one. The shift proxy here is the squared maximum
mean discrepancy (MMD²) between the pooled policy features of the synthetic rows, weighted by their trajectory
weights, and those of the real rows, with a Gaussian kernel whose bandwidth is the median pairwise distance:

    MMD²(w) = ŵᵀ K_ss ŵ − 2 ŵᵀ K_sr 1/n_r + 1ᵀ K_rr 1/n_r²,      ŵ = w_s / Σ w_s

It costs one (B × B) kernel on features the inner forward already produced, so it is cheap enough to log every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from boost_lightning.models.weight_head import effective_sample_size


class Tradeoff(NamedTuple):
    """Weighted empirical risk, Kish ESS and the task-shift proxy (NaN when a batch has no real or no synthetic row)."""

    weighted_risk: Tensor
    ess: Tensor
    task_shift: Tensor


def weighted_mmd(real: Tensor, synthetic: Tensor, weights: Tensor, bandwidth: float | Tensor | None = None) -> Tensor:
    """Squared MMD between weighted ``synthetic`` rows and uniformly weighted ``real`` rows (Gaussian kernel).

    Args:
        real: [n_r, d] features of real rows.
        synthetic: [n_s, d] features of synthetic rows.
        weights: [n_s] non-negative weights of the synthetic rows (only their ratios matter).
        bandwidth: Kernel bandwidth σ in k(x, y) = exp(−‖x − y‖² / 2σ²); the median pairwise distance of all
            rows when omitted.

    Returns:
        A scalar ≥ 0 (up to rounding); 0 when the weighted synthetic features equal the real ones.
    """
    if real.ndim != 2 or synthetic.ndim != 2 or real.shape[1] != synthetic.shape[1]:
        raise ValueError(f"expected [n, d] features with equal d, got {tuple(real.shape)} and {tuple(synthetic.shape)}")
    if not len(real) or not len(synthetic):
        raise ValueError("weighted_mmd needs at least one real and one synthetic row")
    if weights.shape != (synthetic.shape[0],):
        raise ValueError(f"weights {tuple(weights.shape)} do not match {synthetic.shape[0]} synthetic rows")
    x = torch.cat([synthetic, real]).double()
    sq = torch.cdist(x, x).pow(2)
    if bandwidth is None:
        off_diagonal = sq[~torch.eye(len(x), dtype=torch.bool, device=x.device)]
        # The median heuristic keeps the kernel informative whatever the feature scale; a degenerate batch (all
        # rows identical) falls back to σ = 1, where MMD² is 0 anyway.
        median = off_diagonal.median() if off_diagonal.numel() else x.new_tensor(1.0)
        sigma2 = torch.where(median > 0, median, torch.ones_like(median))
    else:
        sigma2 = torch.as_tensor(bandwidth, dtype=x.dtype, device=x.device) ** 2
    kernel = torch.exp(-sq / (2 * sigma2))
    w = weights.double()
    w = w / w.sum().clamp(min=1e-300)
    # Stack the two mean embeddings as one signed weight vector a: MMD² = aᵀ K a.
    a = torch.cat([w, -torch.full((real.shape[0],), 1.0 / real.shape[0], dtype=x.dtype, device=x.device)])
    return (a @ kernel @ a).clamp(min=0.0).to(synthetic.dtype)


def tradeoff(losses: Tensor, weights: Tensor, features: Tensor, is_synthetic: Tensor) -> Tradeoff:
    """The bound's three quantities for one batch.

    Args:
        losses: [B] per-trajectory losses (e.g. agent-token NLL).
        weights: [B] trajectory weights.
        features: [B, d] pooled policy features.
        is_synthetic: [B] 1 for synthetic rows, 0 for real ones.

    Returns:
        :class:`Tradeoff` of detached scalars.
    """
    losses, weights, features = losses.detach(), weights.detach(), features.detach()
    synthetic = is_synthetic.bool()
    risk = (weights * losses).sum() / weights.sum().clamp(min=1e-12)
    if synthetic.any() and (~synthetic).any():
        shift = weighted_mmd(features[~synthetic].float(), features[synthetic].float(), weights[synthetic].float())
    else:
        shift = losses.new_tensor(float("nan"))
    return Tradeoff(risk, effective_sample_size(weights), shift)
