"""The one cache root and its atomic directory writer."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from boost_lightning.cache import cache_dir, cache_root, write_dir_atomically


def test_root_is_the_variable_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert [cache_dir(kind) for kind in ("embedded", "models", "datasets")] == [
        tmp_path / "mine" / kind for kind in ("embedded", "models", "datasets")]
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", "")  # set but empty counts as unset
    assert cache_root() == tmp_path / "xdg" / "boost_lightning"
    monkeypatch.delenv("BOOST_LIGHTNING_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "boost_lightning"
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", "~/elsewhere")
    assert cache_root() == tmp_path / "home" / "elsewhere"
    with pytest.raises(ValueError, match="unknown cache kind 'model'"):
        cache_dir("model")


def fill(directory: Path) -> None:
    (directory / "sub").mkdir()
    (directory / "sub" / "data.txt").write_text("complete")
    (directory / "done").write_text("")


def complete(directory: Path) -> bool:
    return (directory / "done").is_file()


def test_writes_once_readable_and_reuses(tmp_path):
    target = tmp_path / "entry"
    assert write_dir_atomically(target, fill, complete) == target
    assert (target / "sub" / "data.txt").read_text() == "complete"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755, "mkdtemp's private mode must not reach the cache"
    assert stat.S_IMODE((target / "sub" / "data.txt").stat().st_mode) == 0o644

    def never(directory):
        raise AssertionError("rebuilt a complete entry")

    assert write_dir_atomically(target, never, complete) == target
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_a_failing_build_leaves_nothing_behind(tmp_path):
    def crash(directory):
        fill(directory)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(tmp_path / "entry", crash, complete)
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_leftover_is_replaced(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "stale").write_text("")
    write_dir_atomically(tmp_path / "entry", fill, complete)
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["done", "sub"]


def test_the_first_writer_wins_and_everyone_gets_its_copy(tmp_path):
    target = tmp_path / "entry"

    def slow_loser(directory):
        (directory / "done").write_text("ours")
        write_dir_atomically(target, lambda d: (d / "done").write_text("theirs"), complete)  # finishes first

    assert write_dir_atomically(target, slow_loser, complete) == target
    assert (target / "done").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"], "the losing copy is removed"


def test_losing_the_race_at_the_rename_keeps_the_winner(tmp_path, monkeypatch):
    import boost_lightning.cache as cache

    target, real_replace = tmp_path / "entry", cache.os.replace

    def other_process_renames_first(src, dst):
        monkeypatch.setattr(cache.os, "replace", real_replace)
        write_dir_atomically(target, lambda d: (d / "done").write_text("theirs"), complete)
        real_replace(src, dst)  # a non-empty directory is there now: OSError

    monkeypatch.setattr(cache.os, "replace", other_process_renames_first)
    assert write_dir_atomically(target, lambda d: (d / "done").write_text("ours"), complete) == target
    assert (target / "done").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
