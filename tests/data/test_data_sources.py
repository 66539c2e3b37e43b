"""Loading splits: validation errors, the source rules, HF datasets, embedded specs and the tokenization cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from boost_lightning.data.sources import load_split, load_splits
from boost_lightning.data.trajectory import TrajectoryEncoder, TrajectoryFormatError


def bad_rows(make_row):
    """(description, bad line or row, split, field expected in the message, problem expected in the message)."""
    row = make_row(0)
    message = row["messages"]
    return [
        ("malformed JSON", '{"messages": [', "real", None, "malformed JSON"),
        ("not an object", "[1, 2]", "real", None, "expected a JSON object"),
        ("missing messages", {"reward": 1.0}, "real", "messages", "missing"),
        ("missing role", {**row, "messages": [message[0], {"content": "x"}]}, "real", "messages[1].role", "missing"),
        ("unknown role", {**row, "messages": [*message[:2], {"role": "bot", "content": "x"}]}, "real",
         "messages[2].role", "unknown role 'bot' (expected one of system, user, assistant, tool)"),
        ("empty content", {**row, "messages": [*message[:3], {"role": "user", "content": "  "}]}, "real",
         "messages[3].content", "empty content"),
        ("content not text", {**row, "messages": [*message[:1], {"role": "user", "content": 3}]}, "real",
         "messages[1].content", "expected a string"),
        ("no assistant turn", {**row, "messages": message[:2]}, "real", "messages", "no assistant turn"),
        ("NaN reward", {**row, "reward": float("nan")}, "real", "reward", "not a finite number"),
        ("infinite reward", {**row, "reward": float("inf")}, "real", "reward", "not a finite number"),
        ("missing reward", {k: v for k, v in row.items() if k != "reward"}, "real", "reward", "missing"),
        ("reward not a number", {**row, "reward": "high"}, "real", "reward", "expected a number"),
        ("inf in rewards", {**row, "rewards": [0.0, float("-inf")]}, "real", "rewards[1]", "not a finite number"),
        ("rewards length", {**row, "rewards": [1.0]}, "real", "rewards", "1 values for 2 assistant turns"),
        ("unknown source", {**row, "source": "llm"}, "synthetic", "source", "unknown source 'llm'"),
        ("synthetic in validation", {**row, "source": "synthetic"}, "validation", "source", "validation split"),
        ("synthetic in real", {**row, "source": "synthetic"}, "real", "source", "real split"),
        ("meta not an object", {**row, "meta": [1]}, "real", "meta", "expected an object"),
        ("task_id not text", {**row, "task_id": [1]}, "real", "task_id", "expected a string"),
    ]  # fmt: skip


def test_every_bad_input_names_file_line_and_field(tiny_tokenizer, write_jsonl, make_row, tmp_path):
    for description, bad, split, field, problem in bad_rows(make_row):
        # Line 1 good, line 2 blank (skipped but counted), line 3 bad, line 4 good.
        path = write_jsonl(f"{split}.jsonl", [make_row(1), "", bad, make_row(2)])
        with pytest.raises(TrajectoryFormatError) as error:
            load_split(path, split, tiny_tokenizer, cache_dir=tmp_path / "cache")
        text = str(error.value)
        assert text.startswith(f"{path}:3: "), (description, text)
        if field is not None:
            assert f"field '{field}'" in text, (description, text)
        assert problem in text, (description, text)
    assert not any((tmp_path / "cache").iterdir()), "nothing may be cached from a failed load"


def test_empty_and_missing_splits(tiny_tokenizer, write_jsonl, tmp_path):
    empty = write_jsonl("real.jsonl", ["", "  "])
    with pytest.raises(TrajectoryFormatError, match=r"real\.jsonl: the real split is empty"):
        load_split(empty, "real", tiny_tokenizer, cache_dir=tmp_path)
    with pytest.raises(TrajectoryFormatError, match=r"nope\.jsonl: file not found \(the validation split\)"):
        load_split(tmp_path / "nope.jsonl", "validation", tiny_tokenizer, cache_dir=tmp_path)


def test_every_split_is_validated_before_anything_is_tokenized(tiny_tokenizer, write_jsonl, make_row, monkeypatch):
    real = write_jsonl("real.jsonl", [make_row(i) for i in range(3)])
    validation = write_jsonl("validation.jsonl", [make_row(0), make_row(1, source="synthetic")])

    def never(*args, **kwargs):
        raise AssertionError("tokenized before validation finished")

    monkeypatch.setattr(TrajectoryEncoder, "encode_batch", never)
    with pytest.raises(TrajectoryFormatError, match=r"validation\.jsonl:2: field 'source'"):
        load_splits({"real": real, "validation": validation}, tiny_tokenizer, cache_dir=Path(real).parent / "cache")


def test_sources_implied_by_split_and_explicit_real_rows_in_synthetic(tiny_tokenizer, write_jsonl, make_row, tmp_path):
    real = write_jsonl("real.jsonl", [make_row(0), make_row(1, source="real")])
    mixed = [make_row(0), make_row(1, source="real"), make_row(2, source="synthetic")]
    synthetic = write_jsonl("synthetic.jsonl", mixed)
    loaded = load_splits({"real": real, "synthetic": synthetic}, tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert loaded["real"].dataset["is_synthetic"] == [0, 0]
    assert loaded["synthetic"].dataset["is_synthetic"] == [1, 0, 1]


def test_row_fields_are_stored(tiny_tokenizer, write_jsonl, make_row, tmp_path):
    rows = [make_row(0, meta={"generator": "noisy", "quality": [0.1, 0.2]}), make_row(1, meta={"other": {"a": None}})]
    rows[1]["task_id"] = 17  # an integer task id becomes text
    path = write_jsonl("synthetic.jsonl", ["", *rows])
    dataset = load_split(path, "synthetic", tiny_tokenizer, cache_dir=tmp_path / "cache").dataset
    assert dataset["row_id"] == [0, 1]
    assert dataset["task_id"] == ["maze-0", "17"]
    assert [json.loads(m) for m in dataset["meta"]] == [rows[0]["meta"], rows[1]["meta"]]
    assert dataset["reward"] == [0.0, 1.0]
    expected = TrajectoryEncoder(tiny_tokenizer).encode(rows[0]["messages"])
    assert {k: dataset[0][k] for k in expected} == expected


def test_hf_datasets_in_memory_saved_to_disk_parquet_and_arrow(tiny_tokenizer, make_row, tmp_path):
    rows = [make_row(i, meta={"i": i}) for i in range(4)]
    in_memory = Dataset.from_list(rows)
    from_memory = load_split(in_memory, "synthetic", tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert len(from_memory.dataset) == 4 and from_memory.dataset["is_synthetic"] == [1, 1, 1, 1]

    in_memory.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": in_memory, "validation": in_memory.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    in_memory.to_parquet(str(tmp_path / "rows.parquet"))
    loaded = load_splits(
        {"real": str(tmp_path / "saved"), "validation": str(tmp_path / "dict"), "synthetic": tmp_path / "rows.parquet"},
        tiny_tokenizer,
        cache_dir=tmp_path / "cache",
    )
    assert loaded["real"].dataset["input_ids"] == from_memory.dataset["input_ids"]
    assert len(loaded["validation"].dataset) == 2  # the split named like ours
    assert loaded["synthetic"].dataset["labels"] == from_memory.dataset["labels"]
    (arrow_file,) = (tmp_path / "saved").glob("*.arrow")
    from_arrow = load_split(arrow_file, "synthetic", tiny_tokenizer, cache_dir=tmp_path / "cache")
    assert from_arrow.dataset["input_ids"] == from_memory.dataset["input_ids"]


def test_bad_hf_row_names_the_row(tiny_tokenizer, make_row, tmp_path):
    rows = [make_row(0), make_row(1, reward=float("nan"))]
    with pytest.raises(TrajectoryFormatError, match=r"<in-memory real dataset> \(row 1\): field 'reward'"):
        load_split(Dataset.from_list(rows), "real", tiny_tokenizer, cache_dir=tmp_path)


def test_embedded_spec_reads_the_generated_split(tiny_tokenizer, embedded_specs, embedded_data, tmp_path):
    loaded = load_split("embedded:guess_number/validation", "validation", tiny_tokenizer, cache_dir=tmp_path)
    path = embedded_data("guess_number")["validation"]
    assert loaded.name == str(path)
    task_ids = [json.loads(line)["task_id"] for line in path.read_text().splitlines()]
    assert loaded.dataset["task_id"] == task_ids and len(task_ids) == 64
    for bad in ("embedded:guess_number", "embedded:/validation", "embedded:guess_number/train"):
        with pytest.raises(ValueError, match="embedded:<task>/<split>|unknown split 'train'"):
            load_split(bad, "validation", tiny_tokenizer, cache_dir=tmp_path)


def test_tokenized_splits_are_cached_under_the_cache_root(tiny_tokenizer, write_jsonl, make_row, tmp_path, monkeypatch):
    path = write_jsonl("real.jsonl", [make_row(0), make_row(1)])
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path / "root"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    loaded = load_split(path, "real", tiny_tokenizer)
    (entry,) = (tmp_path / "root" / "datasets").iterdir()
    assert loaded.dataset.cache_files[0]["filename"] == str(entry / "data.arrow")
    assert not (tmp_path / "xdg").exists()


def test_second_load_reuses_the_cache(tiny_tokenizer, plain_tokenizer, write_jsonl, make_row, tmp_path, monkeypatch):
    path = write_jsonl("synthetic.jsonl", [make_row(i) for i in range(5)])
    cache = tmp_path / "cache"
    first = load_split(path, "synthetic", tiny_tokenizer, max_length=64, cache_dir=cache)
    assert not first.from_cache
    (entry,) = cache.iterdir()  # one directory per split, renamed into place complete
    assert sorted(p.name for p in entry.iterdir()) == ["data.arrow", "summary.json"]
    assert first.dataset.cache_files[0]["filename"] == str(entry / "data.arrow")

    def never(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(TrajectoryEncoder, "encode_batch", never)
        second = load_split(path, "synthetic", tiny_tokenizer, max_length=64, cache_dir=cache)
    assert second.from_cache and second.dataset["input_ids"] == first.dataset["input_ids"]
    assert second.dataset.cache_files[0]["filename"] == first.dataset.cache_files[0]["filename"]

    # Anything that changes the rows misses: max_length, the tokenizer (its template), the file's content.
    assert not load_split(path, "synthetic", tiny_tokenizer, max_length=65, cache_dir=cache).from_cache
    assert not load_split(path, "synthetic", plain_tokenizer, max_length=64, cache_dir=cache).from_cache
    Path(path).write_text(Path(path).read_text() + json.dumps(make_row(9)) + "\n")
    assert not load_split(path, "synthetic", tiny_tokenizer, max_length=64, cache_dir=cache).from_cache


def test_all_agent_tokens_truncated_raises_or_drops_and_counts(tiny_tokenizer, write_jsonl, make_row, tmp_path, caplog):
    long_system = make_row(1)
    long_system["messages"][0]["content"] = "You are in a maze. " * 20
    path = write_jsonl("synthetic.jsonl", [make_row(0), long_system, make_row(2)])
    with pytest.raises(TrajectoryFormatError, match=r"synthetic\.jsonl:2: .*truncated away at max_length=60"):
        load_split(path, "synthetic", tiny_tokenizer, max_length=60, cache_dir=tmp_path / "cache")

    for expected_cache in (False, True):
        with caplog.at_level(logging.WARNING, logger="boost_lightning.data.sources"):
            caplog.clear()
            loaded = load_split(
                path, "synthetic", tiny_tokenizer, max_length=60, drop_truncated=True, cache_dir=tmp_path / "cache"
            )
        assert loaded.from_cache == expected_cache
        assert (loaded.num_rows, loaded.num_dropped) == (3, 1)
        assert loaded.dataset["row_id"] == [0, 2]
        assert "dropped 1 of 3 rows" in caplog.text and "synthetic.jsonl:2" in caplog.text


def test_a_split_with_every_row_dropped_is_an_error(tiny_tokenizer, write_jsonl, make_row, tmp_path):
    path = write_jsonl("real.jsonl", [make_row(0), make_row(1)])
    with pytest.raises(TrajectoryFormatError, match=r"every row of the real split was dropped.*real\.jsonl:1"):
        load_split(path, "real", tiny_tokenizer, max_length=4, drop_truncated=True, cache_dir=tmp_path / "cache")
