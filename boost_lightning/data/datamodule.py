"""BoostDataModule: real + synthetic inner batches, real validation outer batches, collation and sampling.

Batch contract (``TrajectoryCollator``): a dict with
    ``input_ids``, ``attention_mask``, ``labels``, ``turn_ids``: LongTensor [B, T], right-padded to the longest row
    (pad: ``pad_token_id``, 0, -100, -1); ``labels`` are the input ids on agent tokens (assistant contents and their
    end-of-turn tokens) and -100 elsewhere, not shifted; ``turn_ids`` the index, in the original row, of the message
    a token belongs to (its content, or the end-of-turn token of an assistant message), -1 for template glue and pads;
    ``obs_mask``: BoolTensor [B, T], user/tool content tokens;
    ``num_agent_tokens``, ``num_turns``, ``length``, ``row_id``: LongTensor [B];
    ``reward``, ``is_synthetic``: FloatTensor [B];
    ``task_id``: list[str]; ``meta``: list[dict].
A training batch is ``{"inner": batch, "outer": batch}``.

Sharding. The datamodule shards its own data under DDP; it never relies on Lightning's sampler replacement. Rank and
world size come from the attached trainer when the dataloaders are built (0 and 1 without one). The training
samplers subclass ``DistributedSampler`` (validation/predict use ``ShardSampler``, one too), so Lightning leaves them
alone whatever ``use_distributed_sampler`` says (the project's trainer sets it to False anyway). ``batch_size`` and
``validation_batch_size`` are per rank: with W ranks the global inner batch is W × ``batch_size`` rows, and at every
step the union of the ranks' batches is exactly the batch of a one-process run with W × ``batch_size`` (rank r holds
its r-th slice, so rank order is row order; with ``real_fraction`` this holds when round(f·b)·W = round(f·W·b)).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from boost_lightning.data.sources import DataSpec, LoadedSplit, load_splits
from boost_lightning.data.tokenizer import load_tokenizer
from boost_lightning.data.trajectory import IGNORE_INDEX

logger = logging.getLogger(__name__)


class TrajectoryCollator:
    """Pads tokenized rows into the batch contract (module docstring); right padding to the longest row.

    Args:
        pad_token_id: Id written into padded ``input_ids`` positions.
        pad_to_multiple_of: Round the padded length up to a multiple of this (tensor-core friendly shapes).
    """

    # Column, padding value, dtype.
    RAGGED = (
        ("input_ids", None, torch.long),
        ("attention_mask", 0, torch.long),
        ("labels", IGNORE_INDEX, torch.long),
        ("turn_ids", -1, torch.long),
        ("obs_mask", False, torch.bool),
    )
    SCALAR = (
        ("num_agent_tokens", torch.long),
        ("num_turns", torch.long),
        ("length", torch.long),
        ("row_id", torch.long),
        ("reward", torch.float),
        ("is_synthetic", torch.float),
    )

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, Any] = {}
        for name, pad, dtype in self.RAGGED:
            out = torch.full((len(rows), width), self.pad_token_id if pad is None else pad, dtype=dtype)
            for i, row in enumerate(rows):
                out[i, : len(row[name])] = torch.as_tensor(row[name], dtype=dtype)
            batch[name] = out
        for name, dtype in self.SCALAR:
            batch[name] = torch.tensor([row[name] for row in rows], dtype=dtype)
        batch["task_id"] = [row["task_id"] for row in rows]
        batch["meta"] = [json.loads(row["meta"]) for row in rows]
        return batch


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


class BoostDataModule(LightningDataModule):
    """Real and synthetic trajectories for the inner level, real validation trajectories for the outer level.

    Training batches are ``{"inner": batch, "outer": batch}`` (see the batch contract in the module docstring): inner
    batches mix real and synthetic rows, outer batches are shuffled validation rows. Both loaders have the same number
    of batches per epoch, set by the inner data: one pass over it (``real_fraction=None``), or enough batches to show
    every row of each pool drawn from at least once (``real_fraction`` set).

    Every split is validated in full before anything is tokenized, and tokenized once into ``cache_dir``
    (``prepare_data`` does it on one process, ``setup`` then loads from the cache). ``self.tokenizer`` resolves the
    tokenizer on first access (no need to call ``setup`` first). After ``setup``, ``num_dropped`` and ``num_truncated``
    give per-split counts of rows dropped and truncated (see ``max_length``). Under DDP the datamodule shards every
    loader itself, reading rank and world size from the attached trainer.

    Args:
        real: Real trajectories: a JSONL file, a dataset directory saved with ``save_to_disk``, a ``.parquet`` /
            ``.arrow`` file, ``embedded:<task>/real``, or a ``datasets.Dataset``. Rows without ``source`` are real;
            a synthetic row here is an error.
        synthetic: Synthetic trajectories, same kinds of spec; rows without ``source`` are synthetic.
        validation: Held-out real trajectories: the outer objective and ``val_dataloader``. Required.
        tokenizer: A tokenizer object, a local tokenizer directory, ``embedded:<task>`` or a model alias such as
            ``smollm2-135m-instruct`` (the pretrained model's own tokenizer); a fast tokenizer is needed.
            Conversations are rendered with its chat template, or without one in the plain format
            ``{role}:\\n{content}{eos}\\n`` per message.
        batch_size: Rows per inner batch (per device).
        validation_batch_size: Rows per outer batch and per validation/predict batch (per device).
        max_length: Longest row in tokens. Longer rows lose whole earliest user/assistant exchanges (system
            messages kept) until they fit, then their tail.
        real_fraction: ``None`` draws inner batches from the natural mix of all real and synthetic rows; a float ``f``
            puts exactly ``round(f * batch_size)`` real rows in every inner batch (``1.0``: real only, ``0.0``:
            synthetic only), reshuffling and repeating the smaller pool within an epoch.
        drop_truncated: Drop rows whose agent tokens are all truncated away (counted in ``num_dropped``, with a
            warning) instead of raising an error.
        num_workers: DataLoader worker processes.
        seed: Seed of the batch order; the same seed gives the same batches, epoch by epoch.
        cache_dir: Directory of the tokenized-split cache; default ``~/.cache/boost_lightning/datasets``.
        predict: Trajectories for ``predict_dataloader`` (e.g. to score every synthetic row); defaults to
            ``synthetic`` (or ``real`` when there is no synthetic split). Rows without ``source`` are synthetic.
    """

    def __init__(
        self,
        real: str | Dataset | None = None,
        synthetic: str | Dataset | None = None,
        validation: str | Dataset | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        batch_size: int = 8,
        validation_batch_size: int = 8,
        max_length: int = 512,
        real_fraction: float | None = None,
        drop_truncated: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        predict: str | Dataset | None = None,
    ) -> None:
        super().__init__()
        if validation is None:
            raise ValueError("BoostDataModule needs a validation split (held-out real trajectories)")
        if real is None and synthetic is None:
            raise ValueError("BoostDataModule needs a real or a synthetic split (or both)")
        if tokenizer is None:
            raise ValueError("BoostDataModule needs a tokenizer")
        if real_fraction is not None and not 0.0 <= real_fraction <= 1.0:
            raise ValueError(f"real_fraction must be in [0, 1], got {real_fraction}")
        self.specs: dict[str, DataSpec | None] = {"real": real, "synthetic": synthetic, "validation": validation}
        # Datasets and tokenizer objects do not belong in checkpoints' hyperparameters.
        objects = {**self.specs, "tokenizer": tokenizer, "predict": predict}
        self.save_hyperparameters(ignore=[name for name, value in objects.items() if not _plain(value)])
        if predict is not None:
            self.specs["predict"] = predict
        self._tokenizer_spec = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.batch_size = batch_size
        self.validation_batch_size = validation_batch_size
        self.max_length = max_length
        self.real_fraction = real_fraction
        self.drop_truncated = drop_truncated
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.splits: dict[str, LoadedSplit] = {}
        self._resume: dict[str, int] | None = None  # position loaded from a checkpoint, for the next train loader

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The resolved tokenizer (loaded on first access)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    @property
    def num_dropped(self) -> dict[str, int]:
        """Rows dropped per loaded split because all their agent tokens were truncated away."""
        return {name: split.num_dropped for name, split in self.splits.items()}

    @property
    def num_truncated(self) -> dict[str, int]:
        """Rows truncated (and kept) per loaded split."""
        return {name: split.num_truncated for name, split in self.splits.items()}

    def _stage_splits(self, stage: str | None) -> list[str]:
        train = [name for name in ("real", "synthetic") if self.specs[name] is not None]
        if stage == "fit":
            return [*train, "validation"]
        if stage in ("validate", "test"):
            return ["validation"]
        if stage == "predict":
            return [self._predict_split]
        return [*train, "validation", *(["predict"] if "predict" in self.specs else [])]

    @property
    def _predict_split(self) -> str:
        if "predict" in self.specs:
            return "predict"
        return "synthetic" if self.specs["synthetic"] is not None else "real"

    def _load(self, names: list[str]) -> dict[str, LoadedSplit]:
        return load_splits(
            {name: self.specs[name] for name in names},
            self.tokenizer,
            max_length=self.max_length,
            drop_truncated=self.drop_truncated,
            cache_dir=self.cache_dir,
        )

    def prepare_data(self) -> None:
        """Validate and tokenize every split into the cache (one process per node)."""
        self._load(self._stage_splits(None))

    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs (from the cache ``prepare_data`` filled, or building it)."""
        missing = [name for name in self._stage_splits(stage) if name not in self.splits]
        if missing:
            self.splits.update(self._load(missing))

    def _dataset(self, name: str) -> Dataset:
        if name not in self.splits:
            self.splits.update(self._load([name]))
        return self.splits[name].dataset

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=TrajectoryCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def inner_sampler(self) -> MixedSampler:
        """The sampler of the inner loader (this rank's share of the real/synthetic mix)."""
        rank, world_size = self._distributed()
        real, synthetic = (len(self._dataset(n)) if self.specs[n] is not None else 0 for n in ("real", "synthetic"))
        return MixedSampler(
            real,
            synthetic,
            self.batch_size,
            self.real_fraction,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> CombinedLoader:
        """``{"inner": real+synthetic batch, "outer": shuffled validation batch}``, same number of batches."""
        inner = concatenate_datasets([self._dataset(n) for n in ("real", "synthetic") if self.specs[n] is not None])
        inner_sampler = self.inner_sampler()
        rank, world_size = self._distributed()
        outer_sampler = MixedSampler(
            len(self._dataset("validation")),
            batch_size=self.validation_batch_size,
            seed=self.seed,
            stream=1,
            rank=rank,
            world_size=world_size,
            num_batches=inner_sampler.num_global_batches,
        )
        if self._resume is not None:
            for sampler in (inner_sampler, outer_sampler):
                sampler.load_state_dict(self._resume)
            self._resume = None
        loaders = {
            "inner": self._loader(inner, self.batch_size, inner_sampler),
            "outer": self._loader(self._dataset("validation"), self.validation_batch_size, outer_sampler),
        }
        return CombinedLoader(loaders, mode="max_size_cycle")

    def state_dict(self) -> dict[str, int]:
        """The position in the training epoch, saved in checkpoints: ``{"epoch", "start_batch"}``.

        Read from the trainer's loop (batches trained so far this epoch), not from the samplers, which the
        dataloader and its workers read ahead of training.
        """
        loop = getattr(self.trainer, "fit_loop", None)
        if loop is None:
            return {}
        trainer = self.trainer
        epoch, done = loop.epoch_progress.current.completed, loop.epoch_loop.batch_progress.current.processed
        if trainer.num_training_batches != float("inf") and done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0  # saved at the end of an epoch: the next one starts from its beginning
        return {"epoch": int(epoch), "start_batch": int(done)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next ``train_dataloader`` at the saved position (consumed batches are skipped, not read)."""
        self._resume = dict(state_dict) if state_dict else None

    def _sequential(self, name: str) -> DataLoader:
        dataset = self._dataset(name)
        rank, world_size = self._distributed()
        # Unpadded shards: synced metrics see every row once; shards may differ by one row (no per-step collectives
        # run in validation/predict, so uneven batch counts are fine).
        sampler = None
        if world_size > 1:
            sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
        return self._loader(dataset, self.validation_batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        """The validation split in file order (sharded across ranks under DDP)."""
        return self._sequential("validation")

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` split (default: synthetic) in file order (sharded across ranks under DDP)."""
        return self._sequential(self._predict_split)


def _plain(value: Any) -> bool:
    """Worth saving as a hyperparameter (datasets and tokenizer objects are not)."""
    return value is None or isinstance(value, (str, int, float, bool))
