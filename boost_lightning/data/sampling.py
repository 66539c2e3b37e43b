"""Samplers of the training and evaluation loaders: the real/synthetic mix per batch and sharding across ranks.

Plain torch (no lightning import). Both samplers subclass ``DistributedSampler`` so that Lightning neither replaces
nor re-wraps them, whatever ``use_distributed_sampler`` says. :class:`MixedSampler` orders one epoch of training
rows batch by batch, the same global order for any world size (rank ``r`` takes global batches ``r, r + W, ...``), and
can resume mid-epoch from its ``state_dict``. :class:`ShardSampler` splits an evaluation split into unpadded shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler


class MixedSampler(DistributedSampler):
    """Row order of one epoch over a ``[real rows | synthetic rows]`` dataset, batch by batch, for one rank.

    ``real_fraction=None`` (natural mix): all rows form one pool, shuffled. ``real_fraction=f``: every batch holds
    ``round(f * batch_size)`` real rows (first) and synthetic ones for the rest, each pool drawn from its own stream of
    reshuffled passes, so the smaller pool repeats within an epoch.

    An epoch has enough batches for every row of every drawn pool to appear at least once (``num_batches`` overrides
    this), rounded up to a multiple of ``world_size``; batches are always full, a stream running out continues into a
    fresh shuffle. The global batch order depends on ``(seed, stream, epoch)`` only: rank ``r`` takes global batches
    ``r, r + W, r + 2W, ...``, so ranks get disjoint shards that together are the single-process order.

    It yields flat indices in batch order: use it as the ``sampler`` of a DataLoader with the same ``batch_size``.
    It subclasses ``DistributedSampler`` so that Lightning neither replaces nor re-wraps it.

    Args:
        num_real: Real rows, indices ``0 .. num_real - 1``.
        num_synthetic: Synthetic rows, indices ``num_real ..``.
        batch_size: Rows per batch (per rank).
        real_fraction: Share of real rows in every batch; ``None`` for the natural mix.
        seed: Base seed.
        stream: Tells apart samplers sharing a seed (inner and outer loaders).
        rank: This process's rank.
        world_size: Number of ranks.
        num_batches: Global batches per epoch instead of the pass-over-the-data default.
    """

    def __init__(
        self,
        num_real: int,
        num_synthetic: int = 0,
        batch_size: int = 8,
        real_fraction: float | None = None,
        *,
        seed: int = 0,
        stream: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if real_fraction is None:
            quotas = [("", 0, num_real + num_synthetic, batch_size)]
        else:
            if not 0.0 <= real_fraction <= 1.0:
                raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
            num = round(real_fraction * batch_size)
            quotas = [("real ", 0, num_real, num), ("synthetic ", num_real, num_synthetic, batch_size - num)]
        for kind, _, size, quota in quotas:
            if quota > 0 and size == 0:
                raise ValueError(f"no {kind}rows to draw {quota} per batch from (real_fraction={real_fraction})")
        # (first index, pool size, rows per batch) of each pool actually drawn from.
        self.pools = [(offset, size, quota) for _, offset, size, quota in quotas if quota > 0]
        if num_batches is None:
            num_batches = max(math.ceil(size / quota) for _, size, quota in self.pools)
        self.num_global_batches = math.ceil(num_batches / world_size) * world_size
        self.batch_size = batch_size
        self.real_fraction = real_fraction
        # The DistributedSampler attributes, for code that inspects them.
        self.num_replicas, self.rank, self.seed, self.stream = world_size, rank, seed, stream
        self.epoch, self.shuffle, self.drop_last = 0, True, False
        self.num_samples = len(self)
        self.total_size = self.num_samples * world_size
        self.start_batch = 0  # where the next iteration over ``self.epoch`` starts (resume); reset once used

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (Lightning calls this before every epoch)."""
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "start_batch"}``: the epoch and the batch the next iteration starts at."""
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration yields epoch ``state["epoch"]`` from its batch ``state["start_batch"]`` on.

        Earlier batches are skipped as indices, so their rows are never read or collated. ``len()`` stays the full
        epoch: the trainer's restored batch counter accounts for the skipped batches.
        """
        epoch, start = int(state["epoch"]), int(state["start_batch"])
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start_batch {start} outside an epoch of {self.num_batches} batches")
        self.epoch, self.start_batch = epoch, start

    @property
    def num_batches(self) -> int:
        """Batches this rank gets per epoch."""
        return self.num_global_batches // self.num_replicas

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch."""
        parts = []
        for pool, (offset, size, quota) in enumerate(self.pools):
            needed = self.num_global_batches * quota
            passes = [
                np.random.default_rng([self.seed, self.stream, self.epoch, pool, p]).permutation(size)
                for p in range(math.ceil(needed / size))
            ]
            parts.append(np.concatenate(passes)[:needed].reshape(self.num_global_batches, quota) + offset)
        order = np.concatenate(parts, axis=1)
        return order[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start_batch = self.start_batch, 0
        for batch in self.batches()[start:]:
            yield from batch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


class ShardSampler(DistributedSampler):
    """Rows ``rank, rank + W, rank + 2W, ...`` of a dataset, in order: disjoint shards whose union is every row once.

    Unlike ``DistributedSampler`` it never pads a shard with repeated rows (shards differ by at most one row), so
    metrics synchronised over ranks count every validation row exactly once.

    Args:
        size: Rows in the dataset.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.size, self.num_replicas, self.rank = size, world_size, rank
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0
        self.num_samples = len(range(rank, size, world_size))
        self.total_size = size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
