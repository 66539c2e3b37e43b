"""Collation of tokenized trajectory rows into padded tensors: the batch contract.

Batch contract (:class:`TrajectoryCollator`): a dict with
    ``input_ids``, ``attention_mask``, ``labels``, ``turn_ids``: LongTensor [B, T], right-padded to the longest row
    (pad: ``pad_token_id``, 0, -100, -1); ``labels`` are the input ids on agent tokens (assistant contents and their
    end-of-turn tokens) and -100 elsewhere, not shifted; ``turn_ids`` the index, in the original row, of the message
    a token belongs to (its content, or the end-of-turn token of an assistant message), -1 for template glue and pads;
    ``obs_mask``: BoolTensor [B, T], user/tool content tokens;
    ``num_agent_tokens``, ``num_turns``, ``length``, ``row_id``: LongTensor [B];
    ``reward``, ``is_synthetic``: FloatTensor [B];
    ``task_id``: list[str]; ``meta``: list[dict]; ``content_hash``: list[str], the
    :func:`~boost_lightning.data.sources.content_hash` of each row's messages (when the rows carry it, as the splits of
    :func:`~boost_lightning.data.sources.load_splits` do).
A training batch of :class:`~boost_lightning.data.datamodule.BoostDataModule` is ``{"inner": batch, "outer": batch}``.

Plain torch: no lightning import, usable with any ``DataLoader`` over the tokenized splits of
:func:`~boost_lightning.data.sources.load_splits`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from boost_lightning.data.trajectory import IGNORE_INDEX


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
        if "content_hash" in rows[0]:
            batch["content_hash"] = [row["content_hash"] for row in rows]
        return batch


def concat_batches(parts: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Collated batches → one batch of all their rows, in order, right-padded to the widest part.

    ``pad_token_id`` goes into the new ``input_ids`` padding; those positions have ``attention_mask`` 0 and ``labels``
    -100, so no loss, pooled state or feature reads them. A part with no rows is skipped.
    """
    parts = [p for p in parts if p["input_ids"].shape[0] > 0] or parts[:1]
    width = max(p["input_ids"].shape[1] for p in parts)
    pads = {name: pad_token_id if pad is None else pad for name, pad, _ in TrajectoryCollator.RAGGED}
    out: dict[str, Any] = {}
    for name in parts[0]:
        values = [p[name] for p in parts]
        if name in pads:
            values = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pads[name]) for v in values]
        out[name] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
    return out


def take_rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start`` to ``stop`` (exclusive) of a collated batch (every per-row tensor and list column)."""
    return {name: value[start:stop] for name, value in batch.items()}


def row_keys(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per row of a collated batch: ``row_id``, ``task_id``, ``source`` (``real`` / ``synthetic``) and, when the batch
    has it, ``content_hash``: what a weights file keys a row by."""
    hashes = batch.get("content_hash")
    return [{"row_id": int(batch["row_id"][i]), "task_id": batch["task_id"][i],
             "source": "synthetic" if float(batch["is_synthetic"][i]) > 0.5 else "real",
             **({"content_hash": hashes[i]} if hashes is not None else {})}
            for i in range(batch["input_ids"].shape[0])]
