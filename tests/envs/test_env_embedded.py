"""ensure_embedded: generated once, atomically, keyed by settings, reused afterwards."""

from __future__ import annotations

import json

import pytest

import boost_lightning.envs.embedded as embedded
from boost_lightning.envs.embedded import embedded_dir, ensure_embedded

SMALL = {"num_real": 8, "num_validation": 4, "num_synthetic": 40}


def test_generates_then_reuses(tmp_path, monkeypatch):
    path = ensure_embedded("guess_number", cache_dir=tmp_path, **SMALL)
    assert path == embedded_dir("guess_number", cache_dir=tmp_path, **SMALL) and path.parent == tmp_path
    assert {p.name for p in path.iterdir()} == {"real.jsonl", "validation.jsonl", "synthetic.jsonl", "summary.json",
                                                 "tokenizer"}
    assert json.loads((path / "summary.json").read_text())["splits"]["synthetic"]["count"] == 40
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template

    def boom(*args, **kwargs):
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(embedded, "_build", boom)
    assert ensure_embedded("guess_number", cache_dir=tmp_path, **SMALL) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary directories left behind"


def test_settings_change_the_directory(tmp_path):
    a = embedded_dir("maze", cache_dir=tmp_path, **SMALL)
    assert a != embedded_dir("maze", cache_dir=tmp_path, **{**SMALL, "seed": 1})
    assert a != embedded_dir("guess_number", cache_dir=tmp_path, **SMALL)
    assert a == embedded_dir("maze", cache_dir=tmp_path, **{**SMALL, "noise_levels": [0.1, 0.3, 0.6]})
    with pytest.raises(TypeError, match="unknown"):
        embedded_dir("maze", cache_dir=tmp_path, colour="red")


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path))
    assert embedded_dir("maze").parent == tmp_path / "embedded"


def test_crash_leaves_no_half_made_cache(tmp_path, monkeypatch):
    real_build = embedded._build

    def crash(task, out, settings):
        (out / "real.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded("maze", cache_dir=tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(embedded, "_build", real_build)
    path = ensure_embedded("maze", cache_dir=tmp_path, **SMALL)
    assert len((path / "real.jsonl").read_text().splitlines()) == 8


def test_concurrent_winner_is_kept(tmp_path, monkeypatch):
    """If another process renames its copy into place first, ours is dropped and theirs returned."""
    real_build = embedded._build
    final = embedded_dir("twenty_questions", cache_dir=tmp_path, **SMALL)

    def racing_build(task, out, settings):
        real_build(task, out, settings)
        real_build(task, final, settings)  # the other process finishes first

    monkeypatch.setattr(embedded, "_build", racing_build)
    assert ensure_embedded("twenty_questions", cache_dir=tmp_path, **SMALL) == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
