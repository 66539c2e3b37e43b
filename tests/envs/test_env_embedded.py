"""ensure_embedded: generated once, atomically, keyed by settings, reused afterwards, under the one cache root."""

from __future__ import annotations

import json

import pytest

import boost_lightning.envs.embedded as embedded
from boost_lightning.envs.embedded import embedded_dir, embedded_splits, ensure_embedded

SMALL = {"num_real": 8, "num_validation": 4, "num_synthetic": 40}


def test_generated_once_then_reused(embedded_data, embedded_root, monkeypatch):
    files = embedded_data("guess_number")
    path = files["real"].parent
    assert path == embedded_dir("guess_number", cache_dir=embedded_root / "embedded")
    assert {p.name for p in path.iterdir()} == {"real.jsonl", "validation.jsonl", "test.jsonl", "synthetic.jsonl",
                                                "summary.json", "tokenizer"}
    assert files == {"real": path / "real.jsonl", "synthetic": path / "synthetic.jsonl",
                     "validation": path / "validation.jsonl", "test": path / "test.jsonl",
                     "tokenizer": path / "tokenizer"}
    summary = json.loads((path / "summary.json").read_text())
    assert {name: stats["count"] for name, stats in summary["splits"].items()} == {
        "real": 64, "validation": 64, "test": 64, "synthetic": 2000}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files["tokenizer"]))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template

    def boom(*args, **kwargs):
        raise AssertionError("must not regenerate")

    monkeypatch.setattr(embedded, "_build", boom)
    assert embedded_splits("guess_number", cache_dir=embedded_root / "embedded") == files
    assert not [p.name for p in (embedded_root / "embedded").iterdir() if p.name.startswith(".")], "no temporaries"


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
    def crash(task, out, settings):
        (out / "real.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded("maze", cache_dir=tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []
