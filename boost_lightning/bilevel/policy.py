"""The hypergradient of a LoRA policy's validation loss with respect to the weights of one inner batch.

Binds :func:`~boost_lightning.bilevel.hypergradient.first_order_hypergradient` /
:func:`~boost_lightning.bilevel.hypergradient.exact_hypergradient` to a :class:`~boost_lightning.models.PolicyModel`
and a pair of collated batches (plain torch; data parallel through :mod:`boost_lightning.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from boost_lightning import distributed as dp
from boost_lightning.bilevel.hypergradient import (
    Hypergradient,
    HypergradientOptions,
    exact_hypergradient,
    first_order_hypergradient,
    gradient_norms,
)
from boost_lightning.bilevel.preconditioner import Precondition, adam_preconditioner
from boost_lightning.models.policy import PolicyModel


def policy_hypergradient(
    policy: PolicyModel,
    inner: Mapping[str, Any],
    outer: Mapping[str, Any],
    options: HypergradientOptions,
    optimizer: torch.optim.Optimizer,
    multiplier: Tensor,
    base_losses: Tensor | None = None,
    weights: Tensor | None = None,
    granularity: str = "trajectory",
    probe_seed: int = 0,
) -> Hypergradient:
    """∂L_val(θ')/∂wᵢ for every unit (row, or assistant turn) of the global inner batch, θ' = one ``optimizer``-shaped
    step on the weighted loss.

    Args:
        policy: The policy; its trainable (LoRA) tensors are θ, read and never modified.
        inner: This rank's inner batch.
        outer: This rank's validation batch; v = ∇ of the global mean validation loss.
        options: Method, lookahead lr (default: the optimizer's), probe, preconditioner.
        optimizer: The policy's optimizer: its lr and, for ``preconditioner="adam"``, its second moments.
        multiplier: [u] the objective's multiplier mᵢ of this rank's units (the inner loss is mᵢℓᵢ; a turn has its
            row's).
        base_losses: [u] ℓᵢ(θ) of this rank's units if already computed (saves one forward, one-sided differences).
        weights: [u] this rank's weights, the exact method's point of evaluation (default: uniform).
        granularity: ``trajectory`` (a unit is a row) or ``turn`` (a unit is an assistant turn). The validation loss
            stays the mean over validation rows of their agent-token NLL either way.
        probe_seed: Seed of the random directions of ``alignment="cosine"`` (the same on every rank).

    Returns:
        The hypergradient with [N] per-unit fields of the global batch, identical on every rank, and this rank's
        validation rows' pooled states (``val_pooled``; gathered by the caller only when a weighting reads them).
    """
    params = policy.trainable_named_parameters()
    lr = options.lookahead_lr or optimizer.param_groups[0]["lr"]
    # Sync point: global inner unit and validation row counts (one two-element all-reduce per outer step). The unit
    # count is the B of the lookahead θ − α/B·Σ wᵢ∇ℓᵢ: weights have mean 1 over the units.
    num_inner, num_val = (int(n) for n in dp.all_reduce_sum(torch.tensor(
        [multiplier.shape[0], outer["input_ids"].shape[0]], device=multiplier.device)))
    inner_fn = lambda p: policy.functional_losses(inner, p, granularity) * multiplier  # noqa: E731
    seen: dict[str, Tensor] = {}

    def val_fn(p: Mapping[str, Tensor]) -> Tensor:
        # This rank's term of the global mean validation loss; `all_reduce` sums the terms (and their gradients).
        # The validation rows' pooled states come with the forward for free (the head's validation similarity).
        out = policy.trajectory_forward(outer, p, aux=False)
        seen["pooled"] = out.pooled
        return out.loss.sum() / num_val

    all_reduce = dp.all_reduce_sum if dp.is_distributed() else None
    if options.method == "exact":
        weights = torch.ones_like(multiplier) if weights is None else weights
        local = exact_hypergradient(params, inner_fn, val_fn, weights, lr, batch_size=num_inner, all_reduce=all_reduce)
    else:
        precondition = (adam_preconditioner(optimizer, list(params.values()))
                        if options.preconditioner == "adam" else None)
        base = None if options.fd_central or base_losses is None else base_losses * multiplier
        local = first_order_hypergradient(params, inner_fn, val_fn, lr, base_losses=base, eps=options.fd_eps,
                                          central=options.fd_central, batch_size=num_inner, all_reduce=all_reduce,
                                          precondition=precondition)
    columns = [local.grad_weights, local.directional]
    if options.alignment == "cosine":
        base = (base_losses * multiplier if base_losses is not None
                else inner_fn({n: p.detach() for n, p in params.items()}))
        columns.append(gradient_norms(params, inner_fn, base, options.norm_probes, options.fd_eps, probe_seed))
    # Sync point: every rank's units, so that the head sees the global batch (N·2 or N·3 floats).
    table, _ = dp.all_gather_rows(torch.stack(columns, dim=1))
    grad_weights, directional = table[:, 0], table[:, 1]
    if options.alignment == "cosine":
        # ⟨Pv, ∇ℓᵢ⟩·rms‖∇ℓ‖/‖∇ℓᵢ‖: direction only, on the dot product's scale (rms over the global batch, so the
        # world size does not change it). A unit with no gradient (no agent token) keeps 0.
        norms = table[:, 2]
        scale = torch.where(norms > 0, norms.pow(2).mean().sqrt() / norms.clamp(min=1e-30), torch.zeros_like(norms))
        grad_weights, directional = grad_weights * scale, directional * scale
    return Hypergradient(grad_weights=grad_weights, val_loss=local.val_loss, v_norm=local.v_norm,
                         directional=directional, val_pooled=seen["pooled"].float())


def validation_direction(policy: PolicyModel, params: Mapping[str, Tensor], validation: Sequence[Mapping[str, Any]],
                         precondition: Precondition | None = None) -> list[Tensor]:
    """P·v at ``params``, v = ∇ of the mean agent-token NLL over every row of ``validation`` (a sequence of batches):
    the direction along which :func:`row_alignment` measures each row, computed once for any number of rows.

    Args:
        policy: The policy (its trainable tensors are replaced by ``params``; nothing live moves).
        params: The trainable tensors θ to take the gradient at.
        validation: Validation batches; the loss is the mean over all their rows.
        precondition: The inner optimizer's preconditioner P (:func:`adam_preconditioner`); None: P = I.
    """
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    rows = sum(int(b["input_ids"].shape[0]) for b in validation)
    loss = sum(policy.trajectory_forward(b, leaves, aux=False).loss.sum() for b in validation) / rows
    v = [g.detach() for g in torch.autograd.grad(loss, list(leaves.values()))]
    return v if precondition is None else list(precondition(v))


def row_alignment(policy: PolicyModel, params: Mapping[str, Tensor], direction: Sequence[Tensor],
                  batches: Sequence[Mapping[str, Any]] | Any, eps: float = 1e-2) -> Tensor:
    """⟨direction, ∇ℓᵢ(θ)⟩ for every row of ``batches`` (an iterable of batches), by a forward difference of length
    ``eps`` along the direction, as :func:`~boost_lightning.bilevel.hypergradient.first_order_hypergradient` does for
    one inner batch. With :func:`validation_direction`'s P·v, positive means a step on the row lowers the validation
    loss. Two no-grad forwards per batch."""
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).clamp(min=1e-12)
    step = eps / float(norm)
    base = {n: p.detach() for n, p in params.items()}
    shifted = {n: p + step * d.to(p.dtype) for (n, p), d in zip(base.items(), direction)}
    with torch.no_grad():
        found = [(policy.functional_losses(b, shifted).double() - policy.functional_losses(b, base).double()) / step
                 for b in batches]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.float64)
