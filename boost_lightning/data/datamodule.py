"""BoostDataModule: real + synthetic inner batches, real validation outer batches, collation and sampling.

Batches follow the contract of :mod:`boost_lightning.data.collate`; a training batch is ``{"inner": batch, "outer":
batch}``. Row order comes from the samplers of :mod:`boost_lightning.data.sampling`.

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
import os
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, concatenate_datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from boost_lightning.data.collate import TrajectoryCollator
from boost_lightning.data.report import DataReport
from boost_lightning.data.sampling import MixedSampler, ShardSampler
from boost_lightning.data.sources import DataSpec, LoadedSplit, load_splits, split_row_stats
from boost_lightning.data.tokenizer import load_tokenizer
from boost_lightning.loggers import tensorboard_experiment

logger = logging.getLogger(__name__)

#: ``predict`` value that scores the real and synthetic splits together.
PREDICT_TRAIN = "train"


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
        seed: Seed of the batch order; the same seed gives the same batches, epoch by epoch. ``None`` (default): the
            seed given to ``seed_everything`` (``--seed_everything`` on the command line), or 0 without one; every
            DDP rank must see the same value.
        cache_dir: Directory of the tokenized-split cache; default ``$BOOST_LIGHTNING_CACHE/datasets`` (see
            :mod:`boost_lightning.cache`).
        predict: Trajectories for ``predict_dataloader`` (e.g. to score every synthetic row); defaults to
            ``synthetic`` (or ``real`` when there is no synthetic split). Rows without ``source`` are synthetic.
            ``train``: the real and synthetic splits together, in that order, so that one ``predict`` call puts
            both on one scale; every row keeps its own split's ``row_id``.
        test: Held-out real trajectories for ``test`` (``python main.py test``: the policy's NLL on them, a
            low-variance metric disjoint from validation); defaults to the validation split.
        report_only: Print a report of the training data and stop: per split, per source and per
            ``meta.generator``, the rows, turns, token lengths before truncation (p50/p90/p99/max), rows truncated and
            agent tokens lost. ``python main.py fit --config ... --data.report_only true`` then exits without
            training and writes nothing. Without it, a ``fit`` writes the same table to TensorBoard (text
            ``data/report``) when a TensorBoard logger is attached; ``report()`` returns it.
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
        seed: int | None = None,
        cache_dir: str | None = None,
        predict: str | Dataset | None = None,
        test: str | Dataset | None = None,
        report_only: bool = False,
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
        objects = {**self.specs, "tokenizer": tokenizer, "predict": predict, "test": test}
        self.save_hyperparameters(ignore=[name for name, value in objects.items() if not _plain(value)])
        self._predict_train = isinstance(predict, str) and predict == PREDICT_TRAIN
        if predict is not None and not self._predict_train:
            self.specs["predict"] = predict
        self._tokenizer_spec = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.batch_size = batch_size
        self.validation_batch_size = validation_batch_size
        self.max_length = max_length
        self.real_fraction = real_fraction
        self.drop_truncated = drop_truncated
        self.num_workers = num_workers
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.cache_dir = cache_dir
        if test is not None:
            self.specs["test"] = test
        self.splits: dict[str, LoadedSplit] = {}
        # The training splits cut to the rows a weighting keeps (``keep_rows``); None: every row.
        self._kept: dict[str, Dataset] | None = None
        self._resume: dict[str, int] | None = None  # position loaded from a checkpoint, for the next train loader
        self._real_stream = False  # real rows in a batch stream of their own (draw_real_stream)
        self.report_only = report_only

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

    @property
    def _train_splits(self) -> list[str]:
        return [name for name in ("real", "synthetic") if self.specs[name] is not None]

    @property
    def _test_split(self) -> str:
        return "test" if "test" in self.specs else "validation"

    def _stage_splits(self, stage: str | None) -> list[str]:
        train = self._train_splits
        if stage == "fit":
            return [*train, "validation"]
        if stage == "validate":
            return ["validation"]
        if stage == "test":
            return [self._test_split]
        if stage == "predict":
            return self.predict_splits
        return [*train, "validation", *(name for name in ("predict", "test") if name in self.specs)]

    @property
    def predict_splits(self) -> list[str]:
        """The splits ``predict_dataloader`` reads, in order (their specs are in ``specs``)."""
        if "predict" in self.specs:
            return ["predict"]
        train = self._train_splits
        return train if self._predict_train else train[-1:]

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
        if stage == "fit":
            self._log_report()

    def report(self) -> DataReport:
        """The data report of the ``fit`` splits (see ``report_only``).

        Loaded splits reuse the statistics gathered when they were tokenized; the others are validated and tokenized
        in memory, with nothing cached or written.
        """
        stats = {}
        for name in self._stage_splits("fit"):
            loaded = self.splits.get(name)
            row_stats = loaded.row_stats if loaded is not None else None
            if row_stats is None:
                row_stats = split_row_stats(self.specs[name], name, self.tokenizer, max_length=self.max_length)
            stats[name] = row_stats
        return DataReport.from_row_stats(stats, self.max_length)

    def _log_report(self) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        experiment = tensorboard_experiment(trainer)
        if experiment is not None:
            experiment.add_text("data/report", self.report().to_markdown(), 0)

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
        real, synthetic = (len(self._training(n)) if self.specs[n] is not None else 0 for n in ("real", "synthetic"))
        return MixedSampler(
            real,
            synthetic,
            self.batch_size,
            self.real_fraction,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def _training(self, name: str) -> Dataset:
        return self._dataset(name) if self._kept is None else self._kept[name]

    def keep_rows(self, select: Callable[[dict[str, list]], list[bool] | None]) -> None:
        """Batch only the training rows ``select`` keeps (``BoostModule`` passes its weighting's ``select``).

        A weighting that drops rows by their content (a return cut, a ground-truth label, a file of weights) then
        trains on full batches of the rows it keeps, as filtering the data first would. ``select`` gets the columns
        ``is_synthetic``, ``reward``, ``meta`` (dicts), ``row_id`` and ``content_hash`` of every real row then every
        synthetic row; returning ``None`` keeps everything.

        Raises:
            ValueError: ``select`` keeps no row, or returns the wrong number of flags.
        """
        names = self._train_splits
        parts = [self._dataset(name) for name in names]
        columns = ("is_synthetic", "reward", "meta", "row_id", "content_hash")
        rows: dict[str, Any] = {name: [] for name in columns}
        for part in parts:
            for name in columns:
                rows[name] += part[name]
        rows["meta"] = _JsonColumn(rows["meta"])  # decoded on access: a weighting that decides per batch pays nothing
        flags = select(rows)
        if flags is None:
            self._kept = None
            return
        if len(flags) != len(rows["reward"]):
            raise ValueError(f"select returned {len(flags)} flags for {len(rows['reward'])} training rows")
        if not any(flags):
            raise ValueError("the weighting keeps no training row")
        kept, start = {}, 0
        for name, part in zip(names, parts):
            kept[name] = part.select([i for i in range(len(part)) if flags[start + i]])
            start += len(part)
        self._kept = kept
        logger.info("inner batches draw %s of the training rows the weighting keeps",
                    ", ".join(f"{len(kept[n])}/{len(p)} {n}" for n, p in zip(names, parts)))

    def draw_only(self, source: str) -> None:
        """Draw inner batches from one source only (``real`` or ``synthetic``): a weighting that gives the other
        source weight 0 then trains on full batches of the rows it keeps (``BoostModule`` calls this at setup).

        Under the natural mix it sets ``real_fraction`` to 1.0 or 0.0; an explicit ``real_fraction`` is kept, with a
        warning when it puts rows of the other source into every batch.
        """
        if source not in ("real", "synthetic"):
            raise ValueError(f"source must be 'real' or 'synthetic', got {source!r}")
        wanted = 1.0 if source == "real" else 0.0
        if self.real_fraction is None:
            logger.info("inner batches draw %s rows only (real_fraction=%s)", source, wanted)
            self.real_fraction = wanted
        elif self.real_fraction != wanted:
            logger.warning("real_fraction=%s puts rows the weighting ignores into every batch; %s keeps %s rows only "
                           "(real_fraction=%s gives full batches of them)", self.real_fraction, source, source, wanted)

    def draw_real_stream(self) -> dict[str, int]:
        """Draw real rows in a stream of their own: training batches become ``{"inner": synthetic rows only, "real":
        real rows only, "outer": validation rows}``, each full, and the model composes the rows it trains on
        (``BoostModule(source_sampling="weights")`` calls this at setup).

        Returns:
            The training rows per source, ``{"real": n, "synthetic": m}`` (after :meth:`keep_rows`).

        Raises:
            ValueError: ``real_fraction`` is set (the model decides each batch's share), or a source has no rows.
        """
        if self.real_fraction is not None and not self._real_stream:  # a second fit finds its own 0.0 of the first
            raise ValueError(f"real_fraction={self.real_fraction} fixes the share of real rows per batch, which "
                             f"source_sampling='weights' decides batch by batch: leave data.real_fraction unset")
        counts = {n: len(self._training(n)) if self.specs[n] is not None else 0 for n in ("real", "synthetic")}
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise ValueError(f"source_sampling='weights' draws from both sources, but there are no {empty[0]} rows")
        self._real_stream = True
        self.real_fraction = 0.0  # the inner stream: synthetic rows only
        logger.info("inner batches compose real rows (%d) and synthetic rows (%d) from two streams",
                    counts["real"], counts["synthetic"])
        return counts

    def train_dataloader(self) -> CombinedLoader:
        """``{"inner": real+synthetic batch, "outer": shuffled validation batch}``, same number of batches; with
        :meth:`draw_real_stream`, ``"inner"`` holds synthetic rows and ``"real"`` a batch of real rows."""
        inner = concatenate_datasets([self._training(n) for n in self._train_splits])
        inner_sampler = self.inner_sampler()
        rank, world_size = self._distributed()
        streams = {"outer": (self._dataset("validation"), self.validation_batch_size, 1)}
        if self._real_stream:
            streams["real"] = (self._training("real"), self.batch_size, 2)
        samplers = {name: MixedSampler(len(data), batch_size=size, seed=self.seed, stream=stream, rank=rank,
                                       world_size=world_size, num_batches=inner_sampler.num_global_batches)
                    for name, (data, size, stream) in streams.items()}
        if self._resume is not None:
            for sampler in (inner_sampler, *samplers.values()):
                sampler.load_state_dict(self._resume)
            self._resume = None
        loaders = {"inner": self._loader(inner, self.batch_size, inner_sampler)}
        loaders.update({name: self._loader(streams[name][0], streams[name][1], sampler)
                        for name, sampler in samplers.items()})
        return CombinedLoader(loaders, mode="max_size_cycle")

    def state_dict(self) -> dict[str, int]:
        """The position in the training epoch, saved in checkpoints: ``{"epoch", "start_batch", "seed"}``.

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
        return {"epoch": int(epoch), "start_batch": int(done), "seed": int(self.seed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next ``train_dataloader`` at the saved position (consumed batches are skipped, not read)."""
        self._resume = dict(state_dict) if state_dict else None
        # The position means something in the saved run's batch order only: a resumed process whose seed came from
        # another seed_everything (e.g. a random one) keeps the saved seed.
        if state_dict and "seed" in state_dict:
            self.seed = int(state_dict["seed"])

    def _sequential(self, *names: str) -> DataLoader:
        parts = [self._dataset(name) for name in names]
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
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

    def test_dataloader(self) -> DataLoader:
        """The ``test`` split (held-out real rows, default: validation) in file order (sharded under DDP)."""
        return self._sequential(self._test_split)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` splits (default: synthetic; ``train``: real, then synthetic) in file order (sharded across
        ranks under DDP)."""
        return self._sequential(*self.predict_splits)


class _JsonColumn(Sequence):
    """A column of JSON strings, each decoded when read (empty: ``{}``)."""

    def __init__(self, raw: list[str | None]) -> None:
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [json.loads(m) if m else {} for m in self._raw[index]]
        m = self._raw[index]
        return json.loads(m) if m else {}


def _plain(value: Any) -> bool:
    """Worth saving as a hyperparameter (datasets and tokenizer objects are not)."""
    return value is None or isinstance(value, (str, int, float, bool))
