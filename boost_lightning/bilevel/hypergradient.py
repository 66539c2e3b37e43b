"""Hypergradients of the validation loss with respect to per-unit weights: one per trajectory, or per assistant turn
(pure torch; a unit is whatever ``inner_losses`` returns one loss for).

The bilevel problem, with one inner step as the lookahead (B rows, weights of mean 1):

    θ'(w) = θ − α/B · Σᵢ wᵢ ∇ℓᵢ(θ)          (inner: weighted SFT step)
    ∂L_val(θ'(w))/∂wᵢ = −α/B · ⟨∇L_val(θ'), ∇ℓᵢ(θ)⟩

* :func:`first_order_hypergradient` (default) takes v = ∇L_val(θ) and estimates every ⟨v, ∇ℓᵢ⟩ with a finite
  difference along v: one backward on the validation batch plus one no-grad forward of the inner batch at
  θ + εv (two for the central difference). No second derivatives, so SDPA / flash attention and bf16 work.
* :func:`gradient_norms` estimates every ‖∇ℓᵢ‖ from random probe directions (forward differences again), for
  ``alignment="cosine"``: raw inner products of sequence gradients grow with a row's gradient norm (its length,
  its loss), so a long or badly fit row can look aligned without pointing the right way.
* :func:`exact_hypergradient` differentiates through the unrolled step with ``create_graph``; it is the
  reference for small models and needs an attention kernel with double backward (math SDPA or eager).

Both take the parameters as a name → tensor mapping and two functions of such a mapping, so the same code serves
an HF policy (through ``torch.func.functional_call``) and the closed-form toys in the tests.

Data parallel: pass ``all_reduce`` (a sum over replicas, e.g. :func:`boost_lightning.distributed.all_reduce_sum`),
let ``val_loss`` return this replica's *term* of the global validation loss (its shard mean / world size) and give
the global ``batch_size``. Then v and the validation loss are global, and each replica gets ∂L_val/∂wᵢ for its own
rows, equal to what one process would compute on the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Params = Mapping[str, Tensor]
Reduce = Callable[[Tensor], Tensor]


@dataclass
class HypergradientOptions:
    """How the outer level estimates ∂L_val/∂w (``--model.hypergradient.*``).

    Args:
        method: ``first_order`` (finite differences, no double backward; works with SDPA/flash attention and bf16) or
            ``exact`` (unrolled step with ``create_graph``; needs eager or math attention; a reference for small
            models).
        lookahead_lr: α of the one-step lookahead θ' = θ − α∇L_in. Defaults to the policy optimizer's lr.
        fd_eps: Norm of the finite-difference probe step along v = ∇L_val.
        fd_central: Central differences (one more forward of the inner batch per outer step).
        preconditioner: ``adam``: precondition v with the policy optimizer's second moments, 1/(√v̂ + eps), as an
            Adam/AdamW step does, so that alignment is measured in the geometry the policy moves in (first-order
            only; P = I while the optimizer keeps no second moments). ``none``: the lookahead is a plain SGD step.
        alignment: ``dot``: gᵢ ∝ −⟨Pv, ∇ℓᵢ⟩, the one-step lookahead's own derivative. ``cosine``: each row's term is
            divided by its gradient norm ‖∇ℓᵢ‖ and multiplied by the batch's root-mean-square norm, so rows compete on
            direction alone and the scale stays the dot product's. The norms are estimated from ``norm_probes``
            random directions (:func:`gradient_norms`; first-order only, one no-grad forward of the inner batch per
            probe).
        norm_probes: Random probe directions per outer step for ``alignment="cosine"``; a norm's relative error is
            about 1/√(2·probes).
        normalize: Divide the per-row hypergradient by its root mean square over the batch before the head's backward
            (surrogate (1/B)·Σ gᵢwᵢ/rms(g)). Its raw scale follows the policy's lr and loss scale (often ~1e-4), so
            without this the head regulariser's strength has no fixed meaning; with it, a strength of ≈ 1 weighs the
            ESS penalty as much as the validation signal.
    """

    method: str = "first_order"
    lookahead_lr: float | None = None
    fd_eps: float = 1e-2
    fd_central: bool = False
    preconditioner: str = "adam"
    alignment: str = "dot"
    norm_probes: int = 8
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.alignment not in ("dot", "cosine"):
            raise ValueError(f"hypergradient alignment must be 'dot' or 'cosine', got {self.alignment!r}")
        if self.alignment == "cosine" and self.method != "first_order":
            raise ValueError("alignment='cosine' needs method='first_order' (its norms come from forward probes)")
        if self.norm_probes < 1:
            raise ValueError(f"norm_probes must be >= 1, got {self.norm_probes}")
        if self.method not in ("first_order", "exact"):
            raise ValueError(f"hypergradient method must be 'first_order' or 'exact', got {self.method!r}")
        if self.preconditioner not in ("none", "adam"):
            raise ValueError(f"hypergradient preconditioner must be 'none' or 'adam', got {self.preconditioner!r}")
        if self.fd_eps <= 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")


@dataclass
class Hypergradient:
    """Result of one hypergradient evaluation.

    Attributes:
        grad_weights: [B] ∂L_val/∂wᵢ.
        val_loss: Validation loss at the point where v was taken (detached scalar).
        v_norm: ‖∇L_val‖ over the trainable parameters (detached scalar).
        directional: [B] ⟨∇L_val, ∇ℓᵢ⟩ estimates (detached).
        val_pooled: [V, H] pooled hidden states of this rank's validation rows (detached), when the caller collects
            them.
    """

    grad_weights: Tensor
    val_loss: Tensor
    v_norm: Tensor
    directional: Tensor
    val_pooled: Tensor | None = None

    def is_finite(self) -> bool:
        """True when every returned quantity is finite (a non-finite one must never reach the head)."""
        return bool(torch.isfinite(self.grad_weights).all() and torch.isfinite(self.val_loss))


def unit_rms(g: Tensor) -> Tensor:
    """``g`` divided by its root mean square over the rows: the hypergradient's direction across a batch, whose raw
    scale follows the policy's learning rate and loss scale."""
    return g / (g.pow(2).mean().sqrt() + 1e-30)


def first_order_hypergradient(
    params: Params,
    inner_losses: Callable[[Params], Tensor],
    val_loss: Callable[[Params], Tensor],
    lr: float,
    base_losses: Tensor | None = None,
    eps: float = 1e-2,
    central: bool = False,
    batch_size: int | None = None,
    all_reduce: Reduce | None = None,
    precondition: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> Hypergradient:
    """Finite-difference hypergradient ∂L_val/∂w ≈ −α/B · [ℓ(θ + εPv) − ℓ(θ)] / ε, v = ∇L_val(θ).

    Args:
        params: The live trainable parameters θ (e.g. the LoRA tensors). They are read, never modified.
        inner_losses: θ ↦ per-unit (trajectory or turn) inner losses [B]; called under ``torch.no_grad``.
        val_loss: θ ↦ scalar validation loss; differentiated once.
        lr: α, the inner learning rate of the lookahead step (scales the result only).
        base_losses: ℓ(θ) [B] if the caller already has it (the inner step computed it): saves one forward.
        eps: Length of the probe step along v; the step is ε/‖v‖·v so its norm is ``eps`` whatever ‖v‖ is.
        central: Use [ℓ(θ+εv) − ℓ(θ−εv)] / 2ε (second-order accurate, one more forward).
        batch_size: B of the lookahead step: the global batch under data parallelism (default: this call's rows).
        all_reduce: Sum over data-parallel replicas; ``val_loss`` then returns this replica's term of the global
            validation loss (module docstring). None: a single process.
        precondition: The inner optimizer's diagonal preconditioner P, as a map of the per-tensor v list. An
            adaptive inner step θ' = θ − αP·Σwᵢ∇ℓᵢ/B gives ∂L_val/∂wᵢ = −α/B·⟨Pv, ∇ℓᵢ⟩ (P symmetric), so the probe
            goes along Pv. None: P = I (the SGD lookahead). ``directional`` is then ⟨Pv, ∇ℓᵢ⟩.
    """
    names = list(params)
    live = [params[n] for n in names]
    val = val_loss(params)
    grads = torch.autograd.grad(val, live, allow_unused=True)
    v = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(live, grads)]
    if all_reduce is not None:
        # Sync point: v must be ∇ of the *global* validation loss before the probe; the loss rides in the same
        # collective (one all-reduce of |θ| + 1 floats per outer step).
        val, v = _reduce_flat(all_reduce, val.detach(), v)
    v_norm = _global_norm(v)
    probe = v if precondition is None else list(precondition(v))
    step = eps / (v_norm if precondition is None else _global_norm(probe)).clamp(min=1e-12)

    with torch.no_grad():
        def shifted(sign: float) -> dict[str, Tensor]:
            return {n: (_up(p.detach()) + sign * step * _up(g)).to(p.dtype) for n, p, g in zip(names, live, probe)}

        plus = _up(inner_losses(shifted(1.0)))
        if central:
            directional = (plus - _up(inner_losses(shifted(-1.0)))) / (2 * step)
        else:
            base = inner_losses({n: p.detach() for n, p in zip(names, live)}) if base_losses is None else base_losses
            directional = (plus - _up(base.detach())) / step
    batch = batch_size or directional.shape[0]
    return Hypergradient(
        grad_weights=-lr * directional / batch,
        val_loss=val.detach(),
        v_norm=v_norm.detach(),
        directional=directional.detach(),
    )


def gradient_norms(
    params: Params,
    inner_losses: Callable[[Params], Tensor],
    base_losses: Tensor,
    probes: int,
    eps: float = 1e-2,
    seed: int = 0,
) -> Tensor:
    """Per-unit gradient norms ‖∇ℓᵢ(θ)‖ [B] from ``probes`` random unit directions u over all of θ.

    For u uniform on the unit sphere of the D trainable dimensions, E[(∇ℓᵢ·u)²] = ‖∇ℓᵢ‖²/D, and ∇ℓᵢ·u is a forward
    difference [ℓᵢ(θ + εu) − ℓᵢ(θ)]/ε: no per-sample backward, so any attention kernel and bf16 work, at one no-grad
    forward of the inner batch per probe. The directions depend only on ``seed`` and the parameter shapes: every
    data-parallel replica draws the same ones, so a row's estimate does not depend on the world size.

    Args:
        params: The live trainable parameters θ (read, never modified).
        inner_losses: θ ↦ per-unit losses [B]; called under ``torch.no_grad``.
        base_losses: ℓ(θ) [B].
        probes: Number of directions K; the relative error of a norm is about 1/√(2K).
        eps: Length of each probe step.
        seed: Seed of the directions (e.g. the outer step, so a resumed run draws the same ones).
    """
    names = list(params)
    live = [params[n].detach() for n in names]
    dims = sum(p.numel() for p in live)
    base = _up(base_losses.detach())
    squares = torch.zeros_like(base)
    generator = torch.Generator(device=live[0].device).manual_seed(seed)
    with torch.no_grad():
        for _ in range(probes):
            z = [torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32) for p in live]
            step = eps / _global_norm(z).clamp(min=1e-12)
            shifted = {n: (_up(p) + step * d).to(p.dtype) for n, p, d in zip(names, live, z)}
            squares += ((_up(inner_losses(shifted)) - base) / eps) ** 2
    return (squares * dims / probes).sqrt()


def exact_hypergradient(
    params: Params,
    inner_losses: Callable[[Params], Tensor],
    val_loss: Callable[[Params], Tensor],
    weights: Tensor,
    lr: float,
    batch_size: int | None = None,
    all_reduce: Reduce | None = None,
) -> Hypergradient:
    """Exact one-step unrolled hypergradient (second-order autograd through the inner step).

    Runs with SDPA forced to its math kernel, the only one that can differentiate twice; eager attention works as
    is. Flash-attention kernels raise a clear error.

    Args:
        params: The live trainable parameters θ (read, never modified).
        inner_losses: θ ↦ per-unit (trajectory or turn) inner losses [B], differentiable in θ.
        val_loss: θ ↦ scalar validation loss.
        weights: [B] the weights w at which the hypergradient is taken.
        lr: α, the inner learning rate of the unrolled step.
        batch_size: B of the unrolled step: the global batch under data parallelism (default: this call's rows).
        all_reduce: Sum over data-parallel replicas (module docstring). None: a single process.
    """
    names = list(params)
    theta = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    w = weights.detach().clone().requires_grad_(True)
    batch = batch_size or w.shape[0]
    try:
        with _math_attention():
            inner = (w * inner_losses(theta)).sum() / batch
            grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True, allow_unused=True)
            if all_reduce is not None:
                # The step takes the value of the global gradient; only this replica's rows carry a graph to w.
                _, total = _reduce_flat(all_reduce, inner.detach(), [torch.zeros_like(theta[n]) if g is None
                                                                    else g.detach() for n, g in zip(names, grads)])
                grads = [None if g is None else g + (t.to(g.dtype) - g.detach()) for g, t in zip(grads, total)]
            updated = {n: theta[n] - lr * g if g is not None else theta[n] for n, g in zip(names, grads)}
            val = val_loss(updated)
            if all_reduce is None:
                outs = torch.autograd.grad(val, [w, *updated.values()], allow_unused=True)
            else:
                # v' = ∇L_val(θ') of the global validation loss, then ∂L_val/∂w = ⟨v', ∂θ'/∂w⟩ for this rank's rows.
                local = torch.autograd.grad(val, list(updated.values()), retain_graph=True, allow_unused=True)
                val, v = _reduce_flat(all_reduce, val.detach(), [torch.zeros_like(p) if g is None else g
                                                                  for p, g in zip(updated.values(), local)])
                moved = [(u, g) for u, g in zip(updated.values(), v) if u.grad_fn is not None]
                grad_w = torch.autograd.grad([u for u, _ in moved], w, grad_outputs=[g.to(u.dtype) for u, g in moved],
                                             allow_unused=True)[0]
                outs = (torch.zeros_like(w) if grad_w is None else grad_w, *v)
    except RuntimeError as err:
        if "derivative for" in str(err) or "double backward" in str(err) or "not implemented" in str(err):
            raise RuntimeError(
                "the exact hypergradient differentiates twice through attention, which this attention kernel "
                "cannot do; build the policy with attn_implementation='eager' (or 'sdpa', run under the math "
                f"kernel) or use hypergradient='first_order'. Original error: {err}"
            ) from err
        raise
    grad_w = outs[0].detach()
    v = [g for g in outs[1:] if g is not None]
    v_norm = _global_norm(v) if v else grad_w.new_zeros(())
    return Hypergradient(
        grad_weights=grad_w,
        val_loss=val.detach(),
        v_norm=v_norm.detach(),
        directional=(-grad_w * batch / lr).detach(),
    )


def _reduce_flat(all_reduce: Reduce, scalar: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One collective for a scalar and a list of tensors (float32 at least); returns them reduced, same shapes."""
    flat = all_reduce(torch.cat([_up(scalar).reshape(1), *(_up(t).reshape(-1) for t in tensors)]))
    out, offset = [], 1
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return flat[0], out


def _global_norm(tensors: list[Tensor]) -> Tensor:
    """‖·‖₂ over all the tensors together, accumulated in at least fp32."""
    return torch.sqrt(sum((_up(t) ** 2).sum() for t in tensors))


def _up(x: Tensor) -> Tensor:
    """At least float32: differences of bf16 losses would drown in rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextlib.contextmanager
def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield
