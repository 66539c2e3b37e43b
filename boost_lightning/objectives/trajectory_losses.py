"""Inner objectives: a per-row multiplier mᵢ on the agent-token NLL, so the inner loss is Σᵢ wᵢ·mᵢ·ℓᵢ / Σᵢ wᵢ.

A weighting (``boost_lightning.weightings``) decides how much each row counts and is normalised by Σw; an objective
changes what is minimised on a row and is not normalised (a multiplier of 0.1 everywhere makes the loss 10× smaller).
Both are computed on the gathered global batch, so under data parallelism their batch statistics (a filter threshold,
the best or mean return) are those of one process.

* :class:`BC`: behaviour cloning, mᵢ = 1.
* :class:`TopReturnBC`: BC on the top ``fraction`` of the whole batch by return (filtered BC as an objective).
* :class:`RWR`: reward-weighted regression, mᵢ = exp(β(Rᵢ − max R)), clipped (Peters & Schaal, ICML 2007).
* :class:`AWR`: advantage-weighted regression, mᵢ = exp(β(Rᵢ − mean R)), clipped (Peng et al. 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor

from boost_lightning.registry import build
from boost_lightning.weightings.fixed import top_fraction_mask


class Objective:
    """Base class: :meth:`multiplier` maps the global batch's returns [N] to mᵢ [N] (detached)."""

    def multiplier(self, reward: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, nll: Tensor, reward: Tensor) -> Tensor:
        """mᵢ·ℓᵢ for one batch (``nll`` and ``reward`` of the same rows)."""
        return nll * self.multiplier(reward).to(nll.dtype)


class BC(Objective):
    """Behaviour cloning: the agent-token NLL itself."""

    def multiplier(self, reward: Tensor) -> Tensor:
        return torch.ones_like(reward, dtype=torch.float)


class TopReturnBC(Objective):
    """NLL on the rows whose return is in the top ``fraction`` of the batch (ties kept), 0 elsewhere.

    Args:
        fraction: Share of the batch's rows kept, in (0, 1].
    """

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def multiplier(self, reward: Tensor) -> Tensor:
        return top_fraction_mask(reward, torch.ones_like(reward, dtype=torch.bool), self.fraction)


class _Exponentiated(Objective):
    """exp(β·(R − baseline(R)))·NLL, clipped at ``max_multiplier`` (the clip bounds the variance).

    Args:
        beta: Inverse temperature β.
        max_multiplier: Clip of the multiplier.
    """

    def __init__(self, beta: float = 1.0, max_multiplier: float = 20.0) -> None:
        self.beta, self.max_multiplier = beta, max_multiplier

    def baseline(self, reward: Tensor) -> Tensor:
        raise NotImplementedError

    def multiplier(self, reward: Tensor) -> Tensor:
        return torch.exp(self.beta * (reward - self.baseline(reward))).clamp(max=self.max_multiplier)


class RWR(_Exponentiated):
    """Reward-weighted regression: exp(β·(R − max R))·NLL, clipped (the batch's best return as baseline, for
    stability).

    Args:
        beta: Inverse temperature β.
        max_multiplier: Clip of the multiplier (bounds the variance).
    """

    def baseline(self, reward: Tensor) -> Tensor:
        return reward.max()


class AWR(_Exponentiated):
    """Advantage-weighted regression: exp(β·(R − mean R))·NLL, clipped.

    Args:
        beta: Inverse temperature β.
        max_multiplier: Clip of the multiplier (bounds the variance).
    """

    def baseline(self, reward: Tensor) -> Tensor:
        return reward.mean()


#: Short name → class (built with its defaults).
OBJECTIVES: dict[str, type[Objective]] = {"bc": BC, "top_return_bc": TopReturnBC, "rwr": RWR, "awr": AWR}


def build_objective(spec: Objective | str) -> Objective:
    """An :class:`Objective` as is, or a short name of :data:`OBJECTIVES` built with its defaults."""
    return build(spec, OBJECTIVES, Objective, "objective")
