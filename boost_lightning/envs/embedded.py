"""Generated-on-first-use data directories for the embedded tasks, cached per task and settings.

``ensure_embedded("maze")`` returns ``<root>/maze-<hash>/`` holding ``real.jsonl``, ``validation.jsonl``,
``synthetic.jsonl``, ``summary.json`` and ``tokenizer/`` (a 1024-vocab ChatML byte-level BPE trained on every message
of the three files); :func:`embedded_splits` names those paths. ``<root>`` is ``cache_dir`` if given, else
``cache_dir("embedded")`` of :mod:`boost_lightning.cache` (``$BOOST_LIGHTNING_CACHE/embedded``). The hash covers
the task, the synthesizer settings and a format version, so a change of settings never reuses stale data. The
directory is written atomically (:func:`boost_lightning.cache.write_dir_atomically`): an interrupted run never leaves a
half-made entry, and concurrent first uses agree on one result.

The specs ``embedded:<task>/<split>`` and ``embedded:<task>`` of configs resolve to these paths (with the default
settings) through :mod:`boost_lightning.resolve`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from boost_lightning import cache
from boost_lightning.envs.base import task_spec
from boost_lightning.envs.generators import DEFAULT_SETTINGS

FORMAT_VERSION = 4
SPLITS = ("real", "synthetic", "validation", "test")
FILES = (*(f"{split}.jsonl" for split in SPLITS), "summary.json", "tokenizer")
TOKENIZER_VOCAB_SIZE = 1024

log = logging.getLogger(__name__)


def _settings(synth_kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(synth_kwargs) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown synthesizer settings: {', '.join(sorted(unknown))}")
    settings = {**DEFAULT_SETTINGS, **synth_kwargs}
    settings["noise_levels"] = [float(x) for x in settings["noise_levels"]]
    return settings


def embedded_dir(task: str, cache_dir: str | os.PathLike | None = None, **synth_kwargs: Any) -> Path:
    """The directory :func:`ensure_embedded` uses for these settings (nothing is generated).

    Args:
        task: Task name.
        cache_dir: Root directory (default: ``$BOOST_LIGHTNING_CACHE/embedded``, see :mod:`boost_lightning.cache`).
        **synth_kwargs: Synthesizer settings overriding
            :data:`~boost_lightning.envs.generators.DEFAULT_SETTINGS`.

    Returns:
        ``<root>/<task>-<12 hex digits>``.
    """
    task_spec(task)
    key = json.dumps({"task": task, "version": FORMAT_VERSION, **_settings(synth_kwargs)}, sort_keys=True)
    root = Path(cache_dir) if cache_dir is not None else cache.cache_dir("embedded")
    return root / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _complete(path: Path) -> bool:
    return all((path / name).exists() for name in FILES)


def _build(task: str, out: Path, settings: dict[str, Any]) -> None:
    from boost_lightning.data.tokenizer import train_chat_tokenizer
    from boost_lightning.envs.synthesize import build_splits, write_splits

    splits = build_splits(task, **settings)
    write_splits(out, task, splits, settings)
    texts = [m["content"] for rows in splits.values() for row in rows for m in row["messages"]]
    train_chat_tokenizer(texts, vocab_size=TOKENIZER_VOCAB_SIZE).save_pretrained(str(out / "tokenizer"))


def ensure_embedded(task: str, cache_dir: str | os.PathLike | None = None, **synth_kwargs: Any) -> Path:
    """Return the data directory of ``task``, generating it on first use.

    Args:
        task: Task name (``maze``, ``guess_number``, ``twenty_questions``).
        cache_dir: Root directory (default ``$BOOST_LIGHTNING_CACHE/embedded``, see :mod:`boost_lightning.cache`).
        **synth_kwargs: Synthesizer settings (the keys of
            :data:`~boost_lightning.envs.generators.DEFAULT_SETTINGS`: ``num_real``, ``num_validation``,
            ``num_test``, ``num_synthetic``, the generator families' fractions, ``noise_levels``,
            ``hallucination_rate``, ``seed``).

    Returns:
        A directory with ``real.jsonl``, ``validation.jsonl``, ``test.jsonl``, ``synthetic.jsonl``,
        ``summary.json`` and ``tokenizer/``.
    """
    final = embedded_dir(task, cache_dir, **synth_kwargs)
    if _complete(final):
        return final
    settings = _settings(synth_kwargs)
    log.info("generating embedded %s data in %s", task, final)
    return cache.write_dir_atomically(final, lambda out: _build(task, out, settings), _complete)


def embedded_splits(task: str, cache_dir: str | os.PathLike | None = None, **synth_kwargs: Any) -> dict[str, Path]:
    """The files of an embedded task's data, generated on first use (see :func:`ensure_embedded`).

    Args:
        task: Task name (``maze``, ``guess_number``, ``twenty_questions``).
        cache_dir: Root directory (default ``$BOOST_LIGHTNING_CACHE/embedded``).
        **synth_kwargs: Synthesizer settings, as for :func:`ensure_embedded`.

    Returns:
        ``{"real": Path, "synthetic": Path, "validation": Path, "test": Path, "tokenizer": Path}``: the JSONL
        splits and the tokenizer directory, ready for ``BoostDataModule(real=..., synthetic=..., validation=...,
        tokenizer=...)``.
    """
    root = ensure_embedded(task, cache_dir, **synth_kwargs)
    return {**{split: root / f"{split}.jsonl" for split in SPLITS}, "tokenizer": root / "tokenizer"}
