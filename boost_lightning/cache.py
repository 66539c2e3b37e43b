"""The one cache of boost_lightning: where things built once and reused live, and how they are written.

:func:`cache_root` is, read afresh on every call:

1. ``$BOOST_LIGHTNING_CACHE`` when that variable is set and not empty (``~`` is expanded);
2. else ``$XDG_CACHE_HOME/boost_lightning`` when ``XDG_CACHE_HOME`` is set and not empty;
3. else ``~/.cache/boost_lightning``.

Under it, one folder per kind of entry (:func:`cache_dir`):

* ``embedded/``: generated data of the embedded tasks, one directory per task and settings
  (:mod:`boost_lightning.envs.embedded`);
* ``models/``: pretrained models converted to float32 safetensors (:mod:`boost_lightning.models.pretrained`);
* ``datasets/``: tokenized splits, one directory per input, tokenizer and settings
  (:mod:`boost_lightning.data.sources`).

Every entry is a directory written by :func:`write_dir_atomically`: built in a hidden temporary sibling and renamed
into place, so a crash never leaves a half-written entry and concurrent first writers agree on one result. Entries are
never modified after the rename; a deleted entry is rebuilt on its next use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "BOOST_LIGHTNING_CACHE"
KINDS = ("embedded", "models", "datasets")


def cache_root() -> Path:
    """The cache root: ``$BOOST_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/boost_lightning``, else
    ``~/.cache/boost_lightning`` (see the module docstring)."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "boost_lightning"


def cache_dir(kind: str) -> Path:
    """The folder of one kind of entry: ``cache_root() / kind``; not created here.

    Args:
        kind: ``"embedded"``, ``"models"`` or ``"datasets"``.

    Raises:
        ValueError: an unknown kind (a typo would otherwise scatter entries over new folders).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r} (expected one of {', '.join(KINDS)})")
    return cache_root() / kind


def write_dir_atomically(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Make the directory ``target`` with ``build``, all at once or not at all.

    ``build(tmp)`` fills ``tmp``, an empty hidden sibling of ``target`` (same file system, so the final rename is
    atomic). If ``build`` raises, ``target`` is left as it was and ``tmp`` is removed; a killed process leaves at most
    a ``.<name>.tmp-*`` sibling, never a partial ``target``. If another process renames its copy into place while
    ``build`` runs, that copy is kept and ours is dropped, so every caller returns the same, complete directory.

    Args:
        target: The directory to create.
        build: Writes the directory's contents into the path it is given.
        is_complete: Whether a directory found at ``target`` is a finished entry. Anything else found there did not
            come from this function (renames are atomic) and is replaced.

    Returns:
        ``target`` as a ``Path``.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        if is_complete(target):  # another process finished first while we were building
            return target
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy into place between our check and our rename: theirs is complete.
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_file_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write the file ``target`` with ``write``, all at once or not at all.

    ``write(tmp)`` writes a hidden sibling of ``target`` (same file system, so the final rename is atomic), which then
    replaces ``target``: a reader sees the old file or the complete new one, and an interrupted writer leaves
    ``target`` as it was.

    Returns:
        ``target`` as a ``Path``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _make_readable(root: Path) -> None:
    # mkdtemp makes the directory private (0700) and some writers create private files; cache entries are ordinary
    # shared data, readable by whoever may read the cache folder.
    root.chmod(0o755)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            Path(parent, name).chmod(0o755)
        for name in files:
            Path(parent, name).chmod(0o644)
