"""Weights read from a file: train on what an earlier ``predict`` scored (BOOST's head, or any weighting).

``python main.py predict ... --data.predict train --predict_writer.output_path weights.parquet`` writes one weight per
trajectory (:class:`~boost_lightning.callbacks.TrajectoryWeightWriter`); :class:`FixedWeights` gives every training
row its weight from that file, so a fresh policy trains on the weighted (or, with ``top_fraction``, the selected) data
without the head or its outer level.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import torch
from datasets import DatasetDict, load_from_disk
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings.base import Weighting
from boost_lightning.weightings.fixed import top_fraction_mask

#: The columns of a weights file that :class:`FixedWeights` reads, per key.
KEY_COLUMNS = {"row_id": "row_id", "hash": "content_hash"}


class MissingWeightError(LookupError):
    """A training row has no weight in the weights file."""


class FixedWeights(Weighting):
    """Each row's weight from a file written by ``predict`` (the weight writer): JSONL, Parquet or a saved dataset.

    A training row is matched to a file row by its source (real or synthetic) and ``key``:

    * ``hash`` (default): the row's ``content_hash``, a digest of its messages
      (:func:`~boost_lightning.data.sources.content_hash`). Independent of row order and of the file the row sits in;
      identical trajectories of one source share the mean of their weights.
    * ``row_id``: the row's index in its split's input. The file must have been scored from the same inputs as the
      training splits (``--data.predict train`` scores both with their own ``row_id``); a file in which two rows share
      a source and ``row_id`` is refused.

    The weights are used as they are (the inner loss Σ wᵢℓᵢ / Σ wᵢ only sees their ratios). A training row that the
    file does not cover stops training with an error naming the file and the rows.

    Args:
        path: The weights file: ``.jsonl``, ``.parquet``, or a ``save_to_disk`` directory. Columns read: ``source``,
            ``weight`` and ``content_hash`` or ``row_id``.
        key: How training rows find their weight: ``hash`` or ``row_id`` (above).
        top_fraction: Keep only this fraction of the file's rows, those with the highest weights (ties kept), at
            their weight; every other row gets weight 0. ``None``: keep every row.
        equal_weights: Give every kept row (weight > 0 in the file, and in the top fraction) weight 1: the file is then
            a selection to train on uniformly (select-then-retrain, as SEAL does), not a set of loss coefficients.
    """

    input_names = ("weight",)

    def __init__(self, path: str, key: Literal["row_id", "hash"] = "hash", top_fraction: float | None = None,
                 equal_weights: bool = False) -> None:
        super().__init__()
        if key not in KEY_COLUMNS:
            raise ValueError(f"key must be one of {', '.join(KEY_COLUMNS)}, got {key!r}")
        if top_fraction is not None and not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.path, self.key, self.top_fraction, self.equal_weights = str(path), key, top_fraction, equal_weights
        self.table = self._lookup_table(read_weights(path, KEY_COLUMNS[key]))

    def _lookup_table(self, columns: dict[str, list[Any]]) -> dict[tuple[bool, Any], float]:
        """(is synthetic, key value) → weight, after ``top_fraction``."""
        ids, weights = columns[KEY_COLUMNS[self.key]], columns["weight"]
        synthetic = [_is_synthetic(s, self.path, i) for i, s in enumerate(columns["source"])]
        for i, w in enumerate(weights):
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{self.path} (row {i}): field 'weight': expected a finite number >= 0, got {w!r}")
        if self.top_fraction is not None:
            tensor = torch.tensor(weights, dtype=torch.float64)
            keep = top_fraction_mask(tensor, torch.ones_like(tensor, dtype=torch.bool), self.top_fraction).tolist()
            weights = [w if k else 0.0 for w, k in zip(weights, keep)]
        if self.equal_weights:
            weights = [1.0 if w > 0 else 0.0 for w in weights]
        groups: dict[tuple[bool, Any], list[float]] = defaultdict(list)
        for s, i, w in zip(synthetic, ids, weights):
            groups[s, i].append(w)
        if self.key == "row_id":
            shared = next((k for k, ws in groups.items() if len(ws) > 1), None)
            if shared is not None:
                raise ValueError(f"{self.path}: {len(groups[shared])} {_source(shared[0])} rows share row_id "
                                 f"{shared[1]} (rows of several inputs); match rows by content with key='hash'")
        return {k: sum(ws) / len(ws) for k, ws in groups.items()}

    def select(self, rows: Mapping[str, Sequence[Any]]) -> list[bool] | None:
        """Check that the file covers every training row (before the first step), and keep the rows it weighs > 0.

        Rows at weight 0 (those ``top_fraction`` drops, or zeros in the file) are dropped before batching, so every
        batch is full of rows that count.

        Raises:
            MissingWeightError: a training row has no weight in the file.
        """
        ids = rows["content_hash"] if self.key == "hash" else [int(i) for i in rows["row_id"]]
        weights = self._lookup([float(s) > 0.5 for s in rows["is_synthetic"]], ids, "training rows")
        keep = [w > 0 for w in weights]
        return None if all(keep) else keep

    def inputs(self, out: TrajectoryOutput, batch: Mapping[str, Any]) -> Tensor:
        """[b, 1]: each row's weight from the file.

        Raises:
            MissingWeightError: a row of the batch has no weight in the file.
        """
        if self.key == "hash":
            if "content_hash" not in batch:
                raise ValueError("key='hash' needs the batch's content_hash (BoostDataModule's batches have it); "
                                 "use key='row_id' with other loaders")
            ids: list[Any] = list(batch["content_hash"])
        else:
            ids = [int(i) for i in batch["row_id"].tolist()]
        weights = self._lookup((batch["is_synthetic"] > 0.5).tolist(), ids, "rows of this batch")
        return torch.tensor(weights, dtype=torch.float32, device=batch["is_synthetic"].device).unsqueeze(1)

    def _lookup(self, synthetic: Sequence[bool], ids: Sequence[Any], what: str) -> list[float]:
        keys = list(zip(synthetic, ids))
        missing = [k for k in keys if k not in self.table]
        if missing:
            shown = ", ".join(f"{_source(s)} {self.key} {i}" for s, i in missing[:5])
            raise MissingWeightError(
                f"{self.path}: no weight for {len(missing)} of the {len(keys)} {what} ({shown}"
                f"{', ...' if len(missing) > 5 else ''}): score every training row first, e.g. "
                f"`python main.py predict ... --data.predict train`")
        return [self.table[k] for k in keys]

    def forward(self, inputs: Tensor, hypergradient: Hypergradient | None = None) -> Tensor:
        return inputs[:, 0].clone()


def read_weights(path: str | os.PathLike, key_column: str) -> dict[str, list[Any]]:
    """The columns ``source``, ``weight`` and ``key_column`` of a weights file (JSONL, Parquet or dataset directory).

    Raises:
        FileNotFoundError: no such file or directory.
        ValueError: a column is missing, or a JSONL line is not a JSON object.
    """
    target = Path(os.fspath(path)).expanduser()
    names = ["source", "weight", key_column]
    if target.is_dir():
        loaded = load_from_disk(str(target))
        if isinstance(loaded, DatasetDict):
            if len(loaded) != 1:
                raise ValueError(f"{target}: a DatasetDict with splits {list(loaded)}; save one split")
            loaded = next(iter(loaded.values()))
        _require(target, names, loaded.column_names)
        return loaded.select_columns(names).to_dict()
    if not target.is_file():
        raise FileNotFoundError(f"{target}: weights file not found (write it with `python main.py predict ... "
                                f"--predict_writer.output_path {target.name}`)")
    if target.suffix == ".parquet":
        schema_names = pq.read_schema(target).names
        _require(target, names, schema_names)
        return pq.read_table(target, columns=names).to_pydict()
    columns: dict[str, list[Any]] = {name: [] for name in names}
    with open(target, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{target}:{line_number}: malformed JSON: {error}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{target}:{line_number}: expected a JSON object")
            _require(f"{target}:{line_number}", names, row)
            for name in names:
                columns[name].append(row[name])
    return columns


def _require(where: Any, names: list[str], present: Any) -> None:
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(f"{where}: no {', '.join(repr(m) for m in missing)} field; a weights file written by "
                         f"`python main.py predict` has them")


def _is_synthetic(source: Any, path: str, row: int) -> bool:
    if source not in ("real", "synthetic"):
        raise ValueError(f"{path} (row {row}): field 'source': expected 'real' or 'synthetic', got {source!r}")
    return source == "synthetic"


def _source(synthetic: bool) -> str:
    return "synthetic" if synthetic else "real"


__all__ = ["FixedWeights", "MissingWeightError", "read_weights"]
