"""Data layer: trajectory schema and tokenization, split loading with caching, sampling, collation, the datamodule.

Dependencies point into this package, never out of it (except to :mod:`boost_lightning.cache`): simulators and model
aliases reach it through the named-spec resolvers of :mod:`boost_lightning.data.specs`.

Every name is imported on first access: ``import boost_lightning`` registers those resolvers through
``boost_lightning.data.specs``, and that must not pull in datasets, transformers or lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BoostDataModule": "datamodule",
    "IGNORE_INDEX": "trajectory",
    "LoadedSplit": "sources",
    "MixedSampler": "sampling",
    "ShardSampler": "sampling",
    "Trajectory": "trajectory",
    "TrajectoryCollator": "collate",
    "TrajectoryEncoder": "trajectory",
    "TrajectoryFormatError": "trajectory",
    "concat_batches": "collate",
    "load_split": "sources",
    "load_splits": "sources",
    "load_tokenizer": "tokenizer",
    "register_spec_resolver": "specs",
    "resolve_spec": "specs",
    "take_rows": "collate",
    "train_chat_tokenizer": "tokenizer",
    "unregister_spec_resolver": "specs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"boost_lightning.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
