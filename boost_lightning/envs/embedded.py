"""Generated-on-first-use data directories for the embedded tasks, cached per task and settings.

``ensure_embedded("maze")`` returns ``<root>/maze-<hash>/`` holding ``real.jsonl``, ``validation.jsonl``,
``synthetic.jsonl``, ``summary.json`` and ``tokenizer/`` (a 1024-vocab ChatML byte-level BPE trained on every message
of the three files). ``<root>`` is ``cache_dir`` if given, else ``$BOOST_LIGHTNING_CACHE/embedded``, else
``~/.cache/boost_lightning/embedded``. The hash covers the task, the synthesizer settings and a format version, so a
change of settings never reuses stale data. The directory is built in a temporary sibling and renamed into place, so
an interrupted run never leaves a half-made cache, and concurrent first uses agree on one result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from boost_lightning.envs.base import task_spec

FORMAT_VERSION = 1
FILES = ("real.jsonl", "validation.jsonl", "synthetic.jsonl", "summary.json", "tokenizer")
DEFAULT_SETTINGS: dict[str, Any] = {
    "num_real": 64,
    "num_validation": 64,
    "num_synthetic": 2000,
    "shifted_fraction": 0.3,
    "hallucinated_fraction": 0.1,
    "noise_levels": (0.1, 0.3, 0.6),
    "hallucination_rate": 0.2,
    "seed": 0,
}
TOKENIZER_VOCAB_SIZE = 1024

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where embedded task directories live (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("BOOST_LIGHTNING_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "boost_lightning"
    return base / "embedded"


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
        cache_dir: Root directory (default: see the module docstring).
        **synth_kwargs: Synthesizer settings overriding :data:`DEFAULT_SETTINGS`.

    Returns:
        ``<root>/<task>-<12 hex digits>``.
    """
    task_spec(task)
    key = json.dumps({"task": task, "version": FORMAT_VERSION, **_settings(synth_kwargs)}, sort_keys=True)
    return cache_root(cache_dir) / f"{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


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
        cache_dir: Root directory (default ``$BOOST_LIGHTNING_CACHE/embedded`` or
            ``~/.cache/boost_lightning/embedded``).
        **synth_kwargs: Synthesizer settings (``num_real``, ``num_validation``, ``num_synthetic``,
            ``shifted_fraction``, ``hallucinated_fraction``, ``noise_levels``, ``hallucination_rate``, ``seed``).

    Returns:
        A directory with ``real.jsonl``, ``validation.jsonl``, ``synthetic.jsonl``, ``summary.json`` and
        ``tokenizer/``.
    """
    final = embedded_dir(task, cache_dir, **synth_kwargs)
    if all((final / name).exists() for name in FILES):
        return final
    settings = _settings(synth_kwargs)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("generating embedded %s data in %s", task, final)
        _build(task, tmp, settings)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary shared data
        if final.exists():
            # A leftover without all its files can only come from outside this function (renames are atomic).
            if all((final / name).exists() for name in FILES):
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its copy into place first: theirs is complete, use it.
            if not all((final / name).exists() for name in FILES):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
