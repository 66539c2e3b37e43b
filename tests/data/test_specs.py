"""Named specs: the data layer's resolver hooks, and the package's ``embedded:`` and model-alias specs."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from boost_lightning.data.sources import load_split
from boost_lightning.data.specs import register_spec_resolver, resolve_spec, unregister_spec_resolver
from boost_lightning.data.tokenizer import load_tokenizer
from boost_lightning.data.trajectory import TrajectoryFormatError


@pytest.fixture()
def scheme_resolver(tmp_path):
    """A data resolver for ``rows:<name>`` (``tmp_path/<name>.jsonl``), removed after the test."""

    def resolve(spec: str):
        return tmp_path / f"{spec.removeprefix('rows:')}.jsonl" if spec.startswith("rows:") else None

    register_spec_resolver("data", "test-rows", resolve)
    yield
    unregister_spec_resolver("data", "test-rows")


def test_a_registered_data_resolver_names_the_file_the_loader_reads(scheme_resolver, tiny_tokenizer, write_jsonl,
                                                                     make_row, tmp_path):
    path = write_jsonl("mine.jsonl", [make_row(0), make_row(1), make_row(2)])
    loaded = load_split("rows:mine", "synthetic", tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert loaded.name == path and len(loaded.dataset) == 3
    assert resolve_spec("data", "not/mine.jsonl") == "not/mine.jsonl", "unclaimed specs pass through unchanged"


def test_without_its_resolver_a_named_spec_is_just_a_missing_path(tiny_tokenizer, tmp_path):
    with pytest.raises(TrajectoryFormatError, match="rows:mine: file not found"):
        load_split("rows:mine", "real", tiny_tokenizer, cache_dir=tmp_path)


def test_a_tokenizer_resolver_may_return_the_tokenizer_itself(tiny_tokenizer, plain_tokenizer):
    register_spec_resolver("tokenizer", "test-tiny", lambda spec: tiny_tokenizer if spec == "tiny" else None)
    try:
        assert load_tokenizer("tiny") is tiny_tokenizer
        register_spec_resolver("tokenizer", "test-tiny", lambda spec: plain_tokenizer if spec == "tiny" else None)
        assert load_tokenizer("tiny") is plain_tokenizer, "registering a name again replaces its resolver"
    finally:
        unregister_spec_resolver("tokenizer", "test-tiny")
    with pytest.raises(ValueError, match="unknown spec kind"):
        register_spec_resolver("model", "x", lambda spec: None)


def test_embedded_tokenizer_spec_is_the_tokenizer_saved_with_the_data(embedded_specs, embedded_data):
    tok = load_tokenizer("embedded:guess_number")
    saved = AutoTokenizer.from_pretrained(str(embedded_data("guess_number")["tokenizer"]))
    assert tok.get_vocab() == saved.get_vocab() and tok.chat_template == saved.chat_template
    for bad in ("embedded:", "embedded:guess_number/real"):
        with pytest.raises(ValueError, match="embedded:<task>"):
            load_tokenizer(bad)
