"""Data-parallel collectives over the default ``torch.distributed`` process group (plain torch, no Lightning).

Every function is the identity (or a local computation) when ``torch.distributed`` is not initialised or the world
has one process, so single-process code paths run them unchanged. Under DDP every rank must call them in the same
order with tensors of the same dtype on its own device (CPU tensors with gloo, CUDA tensors with NCCL).

What BOOST synchronises, and why (see ``BoostModule``):

* per-row quantities the weights depend on (head features, returns, hypergradients) are *gathered* so that every
  rank computes the weights of the whole global batch, bit for bit the same, and keeps its own rows;
* the policy's gradients are *summed*: each rank's loss is Σ_local wᵢℓᵢ / Σ_global wᵢ, so the sum over ranks is
  the gradient of the global weighted loss (DDP's averaging would need an extra world-size factor);
* the validation gradient v = ∇L_val is *averaged*: ranks hold equally sized validation shards, so the mean of the
  shard means is the global mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: Tensor, op) -> Tensor:
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(x: Tensor) -> Tensor:
    """Σ over ranks of ``x`` (a new tensor; ``x`` is untouched). Not differentiable."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks of ``x`` (a new tensor). Not differentiable."""
    if not is_distributed():
        return x
    return all_reduce_sum(x) / dist.get_world_size()


def all_gather_rows(x: Tensor) -> tuple[Tensor, slice]:
    """Concatenate every rank's ``x`` along dim 0 in rank order; also return where this rank's rows sit.

    Ranks may hold different numbers of rows (one extra collective exchanges the sizes). The result is detached.

    Returns:
        ``(x_all, rows)`` with ``x_all[rows]`` equal to this rank's ``x``.
    """
    if not is_distributed():
        return x.detach(), slice(0, x.shape[0])
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    start = sum(counts[: dist.get_rank()])
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), slice(start, start + x.shape[0])


def all_gather_cat(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order (detached)."""
    return all_gather_rows(x)[0]


def all_reduce_tensors_(tensors: Iterable[Tensor], op: str = "sum") -> None:
    """In place: replace each tensor by its sum (``op="sum"``) or mean (``"mean"``) over ranks.

    The tensors are flattened into one buffer per dtype, so a LoRA's worth of gradients costs one collective.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    if not is_distributed():
        return
    for group in _by_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= dist.get_world_size()
        _unflatten_into(flat, group)


@contextlib.contextmanager
def summed_gradients(params: Sequence[Tensor]) -> Iterator[None]:
    """Backward passes run inside add to ``params``' gradients locally; on exit the increment is summed over ranks.

    Gradients accumulated before entering (earlier batches of an accumulation cycle) are already global, so only this
    block's increment is reduced: one flattened all-reduce, the bytes DDP's reducer would move. Parameters without a
    gradient stay without one, as in one process. The identity without a process group.
    """
    if not is_distributed():
        yield
        return
    prior = [None if p.grad is None else p.grad.clone() for p in params]
    yield
    grads = []
    for p, before in zip(params, prior):
        if p.grad is not None:
            if before is not None:
                p.grad.sub_(before)
            grads.append(p.grad)
    all_reduce_tensors_(grads, op="sum")
    for p, before in zip(params, prior):
        if p.grad is not None and before is not None:
            p.grad.add_(before)


def broadcast_tensors_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """In place: overwrite each tensor with rank ``src``'s value (one collective per dtype)."""
    if not is_distributed():
        return
    for group in _by_dtype(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        _unflatten_into(flat, group)


def _by_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
