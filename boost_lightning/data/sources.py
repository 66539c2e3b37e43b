"""Loading splits: JSONL files, HF datasets and named specs, validated in full, tokenized once, cached.

A split spec is one of:
    * a JSONL file (one row per line, blank lines skipped; errors name ``file:line``);
    * a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` needs a split named like ours, or only
      one split), or a ``.parquet`` / ``.arrow`` data file (errors name ``file (row i)``);
    * a ``datasets.Dataset`` object in memory;
    * a named spec such as ``embedded:<task>/<split>`` (the file ``<split>.jsonl`` of an embedded task's generated
      data): any string is first passed through the resolvers registered in :mod:`boost_lightning.data.specs`.
Paths are only ever opened and read: nothing in a spec is executed or evaluated, and no loading script runs.

Every row of a split is validated (:class:`~boost_lightning.data.trajectory.Trajectory`) before any row is
tokenized, so a bad row fails the whole load with one error and nothing is half-loaded. Tokenization then runs once
through ``datasets.map`` into ``<cache_dir>/<split>-<fingerprint>/data.arrow``, next to a ``summary.json`` of the
row counts; the directory is written atomically (:func:`boost_lightning.cache.write_dir_atomically`), so a crash or
a concurrent load never leaves a half-written entry. ``cache_dir`` defaults to ``$BOOST_LIGHTNING_CACHE/datasets`` (see
:mod:`boost_lightning.cache`). The fingerprint covers the input's content
(sha256 of the file, or the HF dataset fingerprint), the split, the tokenizer (vocabulary, merges, chat template,
special tokens), ``max_length``, ``drop_truncated`` and the format version, so a second load of the same data with the
same settings memory-maps the arrow file and skips reading, validating and tokenizing.

Stored columns are the per-row fields of the batch contract (see ``TrajectoryEncoder``), plus ``reward``,
``is_synthetic``, ``row_id`` (index of the row in its input, blank lines not counted), ``task_id``, ``meta`` as a
JSON string (so heterogeneous meta dicts survive arrow; the collator decodes it) and ``content_hash``
(:func:`content_hash` of the messages). :func:`iter_rows` and :func:`read_rows` give a split's input rows as they
are, every field kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk
from transformers import PreTrainedTokenizerBase

from boost_lightning import cache
from boost_lightning.data.specs import resolve_spec
from boost_lightning.data.trajectory import (
    IGNORE_INDEX,
    IMPLIED_SOURCE,
    EncodedTrajectory,
    Trajectory,
    TrajectoryEncoder,
    TrajectoryFormatError,
)

logger = logging.getLogger(__name__)

DataSpec = Union[str, os.PathLike, Dataset]
# Bump when the stored columns or the tokenization rules change: old cache entries are then never read.
FORMAT_VERSION = 3
DATA_FILE, SUMMARY_FILE = "data.arrow", "summary.json"

RAW_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "reward": Value("float64"),
        "is_synthetic": Value("int8"),
        "task_id": Value("string"),
        "meta": Value("string"),
        "row_id": Value("int64"),
        "content_hash": Value("string"),
        "where": Value("string"),
    }
)
TOKENIZED_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int8")),
        "labels": List(Value("int32")),
        "turn_ids": List(Value("int32")),
        "obs_mask": List(Value("bool")),
        "num_agent_tokens": Value("int32"),
        "num_turns": Value("int32"),
        "length": Value("int32"),
        "reward": Value("float64"),
        "is_synthetic": Value("int8"),
        "row_id": Value("int64"),
        "task_id": Value("string"),
        "meta": Value("string"),
        "content_hash": Value("string"),
    }
)


def content_hash(messages: Iterable[Mapping[str, Any]]) -> str:
    """The identity of a trajectory's content: a hex digest of its messages' roles and contents, in order.

    Other fields (reward, source, meta, extra message keys) do not enter it, so a row keeps its hash across files,
    formats and row orders. Written by ``predict`` as ``content_hash`` and read by
    :class:`~boost_lightning.weightings.FixedWeights` (``key="hash"``).

    Args:
        messages: The row's ``messages`` (``{"role", "content"}`` mappings).
    """
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


@dataclass
class LoadedSplit:
    """A tokenized split and what happened while loading it.

    ``num_agent_tokens`` counts the agent tokens of every input row before truncation, ``num_agent_tokens_lost``
    those truncation cut (dropped rows' included); ``row_stats`` holds the per-row statistics of :data:`ROW_STATS`.
    """

    split: str
    name: str
    dataset: Dataset
    num_rows: int
    num_dropped: int
    num_truncated: int
    from_cache: bool
    num_agent_tokens: int = 0
    num_agent_tokens_lost: int = 0
    row_stats: dict[str, list] | None = None


class TruncationWarning(UserWarning):
    """Rows of a split were longer than ``max_length`` and lost tokens (filter it with ``warnings`` to silence it)."""


#: Per-row statistics gathered while tokenizing, one list each, in row order (dropped rows included): ``length``
#: (tokens before truncation), ``turns`` (assistant messages), ``agent_tokens`` (before truncation),
#: ``agent_tokens_lost`` (cut by truncation), ``synthetic`` (0 / 1) and ``generator`` (``meta.generator`` or None).
ROW_STATS = ("length", "turns", "agent_tokens", "agent_tokens_lost", "synthetic", "generator")


def _target(spec: DataSpec) -> Path | Dataset:
    """A ``Dataset`` as is; a string through the registered named-spec resolvers; the rest to a ``Path``."""
    if isinstance(spec, str):
        spec = resolve_spec("data", spec)
    if isinstance(spec, Dataset):
        return spec
    if isinstance(spec, DatasetDict):
        raise TypeError(f"pass one split of the DatasetDict (it has {list(spec)}), not the whole dict")
    return Path(os.fspath(spec)).expanduser()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything about a tokenizer that changes the encoded rows."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Source:
    """An opened input: a display name, a content fingerprint, and a way to read its rows."""

    def __init__(self, spec: DataSpec, split: str) -> None:
        self.split = split
        self.jsonl: Path | None = None
        self.dataset: Dataset | None = None
        target = _target(spec)
        if isinstance(target, Dataset):
            self.name, self.dataset, self.fingerprint = f"<in-memory {split} dataset>", target, target._fingerprint
            return
        self.name = str(target)
        if target.is_dir():
            self.dataset = self._load_saved(target)
            self.fingerprint = self.dataset._fingerprint
            return
        if not target.is_file():
            raise TrajectoryFormatError(f"{target}: file not found (the {split} split)")
        if target.suffix == ".parquet":  # not Dataset.from_parquet: it leaves a builder cache in ~/.cache/huggingface
            self.dataset = Dataset(pq.read_table(target))
        elif target.suffix == ".arrow":
            self.dataset = Dataset.from_file(str(target))
        else:
            self.jsonl = target
        self.fingerprint = _file_digest(target)

    def _load_saved(self, path: Path) -> Dataset:
        if not any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
            raise TrajectoryFormatError(f"{path}: a directory that is not a dataset saved with save_to_disk")
        loaded = load_from_disk(str(path))
        if isinstance(loaded, Dataset):
            return loaded
        if self.split in loaded:
            return loaded[self.split]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise TrajectoryFormatError(f"{path}: a DatasetDict with splits {list(loaded)} and none named {self.split!r}")

    def rows(self) -> Iterable[tuple[str, Any]]:
        """``(where, decoded row)`` for every row, in order."""
        if self.dataset is not None:
            for i, row in enumerate(self.dataset.with_format(None)):
                yield f"{self.name} (row {i})", row
            return
        with open(self.jsonl, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.name}:{line_number}"
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, over-long integers
                    problem = "nested too deeply" if isinstance(error, RecursionError) else error
                    raise TrajectoryFormatError(f"{where}: malformed JSON: {problem}") from None
                yield where, row

    def read(self) -> Dataset:
        """Validate every row, then return them as an in-memory dataset with ``RAW_FEATURES`` columns."""
        columns: dict[str, list] = {name: [] for name in RAW_FEATURES}
        for row_id, (where, row) in enumerate(self.rows()):
            trajectory = Trajectory.from_dict(row, where=where, split=self.split)
            columns["messages"].append(trajectory.messages)
            columns["reward"].append(trajectory.reward)
            columns["is_synthetic"].append(int(trajectory.source == "synthetic"))
            columns["task_id"].append(trajectory.task_id)
            columns["meta"].append(json.dumps(trajectory.meta, default=str))
            columns["row_id"].append(row_id)
            columns["content_hash"].append(content_hash(trajectory.messages))
            columns["where"].append(where)
        if not columns["where"]:
            raise TrajectoryFormatError(f"{self.name}: the {self.split} split is empty (no rows)")
        # Typed arrow arrays up front: datasets would otherwise re-encode every nested message in python.
        schema = RAW_FEATURES.arrow_schema
        return Dataset.from_dict({k: pa.array(v, type=schema.field(k).type) for k, v in columns.items()}, RAW_FEATURES)


class _Tokenize:
    """The batched ``datasets.map`` function; counts truncated and dropped rows and gathers :data:`ROW_STATS`."""

    def __init__(self, encoder: TrajectoryEncoder, drop_truncated: bool) -> None:
        self.encoder = encoder
        self.drop_truncated = drop_truncated
        self.num_truncated = 0
        self.num_dropped = 0
        self.dropped_examples: list[str] = []
        self.row_stats: dict[str, list] = {name: [] for name in ROW_STATS}
        self._untruncated: TrajectoryEncoder | None = None

    def _record(self, batch: dict[str, list], encoded: list[EncodedTrajectory | None]) -> None:
        # Only the rows truncation touched are encoded a second time, in full, to know what they lost.
        full: dict[int, EncodedTrajectory | None] = dict(enumerate(encoded))
        touched = [i for i, row in enumerate(encoded) if row is None or row.truncated]
        if touched:
            if self._untruncated is None:
                self._untruncated = TrajectoryEncoder(self.encoder.tokenizer, None)
            again = self._untruncated.encode_batch([batch["messages"][i] for i in touched],
                                                   where=[batch["where"][i] for i in touched])
            full.update(zip(touched, again))
        stats = self.row_stats
        for i, row in enumerate(encoded):
            agent = int(full[i].agent_mask.sum())
            lost = agent - (int(row.agent_mask.sum()) if row is not None else 0)
            generator = json.loads(batch["meta"][i]).get("generator")
            stats["length"].append(len(full[i]))
            stats["turns"].append(sum(m["role"] == "assistant" for m in batch["messages"][i]))
            stats["agent_tokens"].append(agent)
            stats["agent_tokens_lost"].append(lost)
            stats["synthetic"].append(int(batch["is_synthetic"][i]))
            stats["generator"].append(None if generator is None else str(generator))

    def __call__(self, batch: dict[str, list]) -> pa.Table:
        encoded = self.encoder.encode_batch(batch["messages"], where=batch["where"])
        self._record(batch, encoded)
        kept: list[int] = []
        for i, row in enumerate(encoded):
            if row is not None:
                kept.append(i)
                self.num_truncated += row.truncated
            elif self.drop_truncated:
                self.num_dropped += 1
                if len(self.dropped_examples) < 5:
                    self.dropped_examples.append(batch["where"][i])
            else:
                raise TrajectoryFormatError(
                    f"{batch['where'][i]}: field 'messages': every agent token is truncated away at "
                    f"max_length={self.encoder.max_length} (raise max_length, or pass drop_truncated=True)"
                )
        rows = [encoded[i] for i in kept]
        # Arrow columns straight from concatenated numpy arrays: much faster than lists of python ints.
        offsets = pa.array(np.cumsum([0] + [len(row) for row in rows]), type=pa.int32())

        def ragged(part: Callable[[EncodedTrajectory], np.ndarray]) -> pa.ListArray:
            return pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([part(r) for r in rows] or [[]])))

        columns = {
            "input_ids": ragged(lambda r: r.input_ids.astype(np.int32)),
            "attention_mask": ragged(lambda r: np.ones(len(r), dtype=np.int8)),
            "labels": ragged(lambda r: np.where(r.agent_mask, r.input_ids, IGNORE_INDEX).astype(np.int32)),
            "turn_ids": ragged(lambda r: r.turn_ids.astype(np.int32)),
            "obs_mask": ragged(lambda r: r.obs_mask),
            "num_agent_tokens": [int(r.agent_mask.sum()) for r in rows],
            "num_turns": [r.num_turns for r in rows],
            "length": [len(r) for r in rows],
        }
        for name in ("reward", "is_synthetic", "row_id", "task_id", "meta", "content_hash"):
            columns[name] = [batch[name][i] for i in kept]
        return pa.table({name: columns[name] for name in TOKENIZED_FEATURES}, schema=TOKENIZED_FEATURES.arrow_schema)


def _tokenize_into(
    directory: Path, raw: Dataset, encoder: TrajectoryEncoder, drop_truncated: bool, key: str, split: str
) -> None:
    """Build one cache entry: tokenize ``raw`` into ``directory/data.arrow``, then write ``directory/summary.json``."""
    tokenize = _Tokenize(encoder, drop_truncated)
    raw.map(
        tokenize,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        features=TOKENIZED_FEATURES,
        new_fingerprint=key,
        cache_file_name=str(directory / DATA_FILE),
        load_from_cache_file=False,  # the entry check in load_splits is the one that counts (it needs the summary)
        desc=f"Tokenizing {split}",
    )
    summary = {
        "num_rows": len(raw),
        "num_truncated": tokenize.num_truncated,
        "num_dropped": tokenize.num_dropped,
        "dropped_examples": tokenize.dropped_examples,
        "max_length": encoder.max_length,
        "num_agent_tokens": sum(tokenize.row_stats["agent_tokens"]),
        "num_agent_tokens_lost": sum(tokenize.row_stats["agent_tokens_lost"]),
        "row_stats": tokenize.row_stats,
    }
    (directory / SUMMARY_FILE).write_text(json.dumps(summary))


def load_splits(
    specs: Mapping[str, DataSpec],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    drop_truncated: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, LoadedSplit]:
    """Load, validate and tokenize several splits; every split is validated before any is tokenized.

    Args:
        specs: Split name (``real``, ``synthetic``, ``validation`` or ``predict``) to spec (see module docstring).
        tokenizer: A fast HF tokenizer.
        max_length: Longest row in tokens; longer rows are truncated (``TrajectoryEncoder``).
        drop_truncated: Drop (and count) rows whose agent tokens are all truncated away instead of raising.
        cache_dir: Where tokenized splits are cached; default ``$BOOST_LIGHTNING_CACHE/datasets`` (see
            :mod:`boost_lightning.cache`).

    Raises:
        TrajectoryFormatError: the first bad input, naming file, line (or row) and field.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache.cache_dir("datasets")
    root.mkdir(parents=True, exist_ok=True)
    encoder = TrajectoryEncoder(tokenizer, max_length)  # refuses unusable tokenizers before any work
    token_fp = tokenizer_fingerprint(tokenizer)
    loaded: dict[str, LoadedSplit] = {}
    pending: list[tuple[str, _Source, Dataset, str, Path]] = []
    for split, spec in specs.items():
        if split not in IMPLIED_SOURCE:
            raise ValueError(f"unknown split {split!r} (expected one of {', '.join(IMPLIED_SOURCE)})")
        source = _Source(spec, split)
        key = hashlib.sha256(
            json.dumps([FORMAT_VERSION, source.fingerprint, split, token_fp, max_length, drop_truncated]).encode()
        ).hexdigest()[:32]
        entry = root / f"{split}-{key}"
        if _complete(entry):
            loaded[split] = _from_cache(split, source.name, entry, from_cache=True)
        else:
            pending.append((split, source, source.read(), key, entry))

    for split, source, raw, key, entry in pending:
        build = functools.partial(_tokenize_into, raw=raw, encoder=encoder, drop_truncated=drop_truncated, key=key,
                                  split=split)
        cache.write_dir_atomically(entry, build, _complete)
        loaded[split] = _from_cache(split, source.name, entry, from_cache=False)
    return {split: loaded[split] for split in specs}


def iter_rows(spec: DataSpec, split: str) -> Iterable[tuple[str, Any]]:
    """``(where, row)`` for every input row of a split, in order, as decoded: every field kept, nothing validated.

    ``where`` is ``file:line`` (or ``name (row i)``), the prefix of error messages; the i-th row has ``row_id`` i.

    Args:
        spec: A split spec (module docstring).
        split: The split it is read as (``real``, ``synthetic``, ``validation`` or ``predict``): it picks the split of
            a ``DatasetDict`` and names the input in errors.
    """
    return _Source(spec, split).rows()


def split_row_stats(
    spec: DataSpec, split: str, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 512
) -> dict[str, list]:
    """Validate and tokenize a split in memory and return its :data:`ROW_STATS`; nothing is cached or written.

    Rows whose agent tokens would all be truncated away are counted (``agent_tokens_lost == agent_tokens``), not
    raised on, whatever ``drop_truncated`` a load would use.

    Args:
        spec: A split spec (module docstring).
        split: ``real``, ``synthetic``, ``validation`` or ``predict``.
        tokenizer: A fast HF tokenizer.
        max_length: The truncation length to measure against.

    Raises:
        TrajectoryFormatError: the first bad row, naming file, line (or row) and field.
    """
    raw = _Source(spec, split).read()
    tokenize = _Tokenize(TrajectoryEncoder(tokenizer, max_length), drop_truncated=True)
    for batch in raw.iter(batch_size=1000):
        tokenize(batch)
    return tokenize.row_stats


def read_rows(spec: DataSpec, split: str) -> list[dict[str, Any]]:
    """The input rows of a split (see :func:`iter_rows`) as a list: ``row_id`` is the list index."""
    return [row for _, row in iter_rows(spec, split)]


def load_split(
    spec: DataSpec,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 512,
    drop_truncated: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedSplit:
    """Load one split; see :func:`load_splits`."""
    return load_splits(
        {split: spec}, tokenizer, max_length=max_length, drop_truncated=drop_truncated, cache_dir=cache_dir
    )[split]


def _complete(entry: Path) -> bool:
    return (entry / DATA_FILE).is_file() and (entry / SUMMARY_FILE).is_file()


def _from_cache(split: str, name: str, entry: Path, from_cache: bool) -> LoadedSplit:
    # Always opened from its final place (never from the temporary directory it was written in), so the dataset's
    # cache_files point at a path that exists: DataLoader workers reopen the memory map from that path.
    summary = json.loads((entry / SUMMARY_FILE).read_text())
    return _report(split, name, Dataset.from_file(str(entry / DATA_FILE)), summary, from_cache=from_cache)


def _report(split: str, name: str, dataset: Dataset, summary: dict, from_cache: bool) -> LoadedSplit:
    if summary["num_dropped"] == summary["num_rows"]:
        raise TrajectoryFormatError(
            f"{name}: every row of the {split} split was dropped: their agent tokens are all truncated away "
            f"(first: {', '.join(summary['dropped_examples'])}); raise max_length"
        )
    if summary["num_dropped"]:
        logger.warning(
            "%s: dropped %d of %d rows of the %s split whose agent tokens were all truncated away (first: %s)",
            name, summary["num_dropped"], summary["num_rows"], split, ", ".join(summary["dropped_examples"]),
        )  # fmt: skip
    if summary["num_truncated"]:
        # A warning, not a log line: a split silently cut down loses what its rows were meant to teach.
        warnings.warn(_truncation_message(split, name, summary), TruncationWarning, stacklevel=2)
    counts = {key: summary[key] for key in ("num_rows", "num_dropped", "num_truncated")}
    counts.update({key: summary.get(key, 0) for key in ("num_agent_tokens", "num_agent_tokens_lost")})
    return LoadedSplit(split, name, dataset, from_cache=from_cache, row_stats=summary.get("row_stats"), **counts)


def _truncation_message(split: str, name: str, summary: dict) -> str:
    rows, truncated = summary["num_rows"], summary["num_truncated"]
    text = (f"{name}: {truncated} of {rows} rows of the {split} split ({truncated / rows:.0%}) are longer than "
            f"max_length={summary.get('max_length', '?')} tokens and lost their earliest exchanges")
    total, lost = summary.get("num_agent_tokens"), summary.get("num_agent_tokens_lost")
    if total:
        text += f"; {lost} of {total} agent tokens ({lost / total:.1%}) are lost"
    return text + ". Raise --data.max_length, or see the per-source report of --data.report_only true."
