"""The inner optimizer's geometry for the lookahead: Adam's diagonal preconditioner P = 1/(√v̂ + eps).

The policy moves by Adam/AdamW, not by SGD, so the one-step lookahead is θ' = θ − αP·Σwᵢ∇ℓᵢ/B and the probe of the
first-order hypergradient goes along Pv (⟨Pv, ∇ℓᵢ⟩). P is read from the optimizer's second moments; it costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Precondition = Callable[[list[Tensor]], list[Tensor]]


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Precondition | None:
    """v ↦ v / (√v̂ + eps) from ``optimizer``'s state for ``params``; None while it keeps no second moments.

    Before the first Adam step (or for SGD) there is no v̂: the first Adam step is sign-like, and P = I is the honest
    default. Each parameter is scaled with the betas/eps of its own parameter group (a user optimizer may have several).
    """
    states = [optimizer.state.get(p, {}) for p in params]
    if not all("exp_avg_sq" in st for st in states):
        return None
    group_of = {id(q): group for group in optimizer.param_groups for q in group["params"]}
    scales = []
    for p, st in zip(params, states):
        group = group_of[id(p)]
        beta2, eps = group.get("betas", (0.9, 0.999))[1], group.get("eps", 1e-8)
        scales.append(1.0 / ((st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).sqrt() + eps))
    return lambda v: [g * scale.to(g.dtype) for g, scale in zip(v, scales)]
