"""Data layer: trajectory schema and tokenization, split loading with caching, the Lightning datamodule.

The datamodule names are imported lazily so that ``boost_lightning.data.trajectory`` and friends do not pull in
lightning.
"""

from boost_lightning.data.sources import LoadedSplit, load_split, load_splits
from boost_lightning.data.tokenizer import load_tokenizer, train_chat_tokenizer
from boost_lightning.data.trajectory import Trajectory, TrajectoryEncoder, TrajectoryFormatError

_LIGHTNING = ("BoostDataModule", "MixedSampler", "TrajectoryCollator")

__all__ = [
    "LoadedSplit",
    "Trajectory",
    "TrajectoryEncoder",
    "TrajectoryFormatError",
    "load_split",
    "load_splits",
    "load_tokenizer",
    "train_chat_tokenizer",
    *_LIGHTNING,
]


def __getattr__(name: str):
    if name in _LIGHTNING:
        from boost_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
