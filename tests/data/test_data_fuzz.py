"""Fuzzing the data contract: arbitrary bytes, JSON values and unicode reach the JSONL loader and the row validator;
only ``TrajectoryFormatError`` (naming the file, the line and the field) may come out, and nothing loads silently."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from boost_lightning.data.sources import load_split
from boost_lightning.data.trajectory import ROLES, Trajectory, TrajectoryEncoder, TrajectoryFormatError

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "robot"]) | json_values,
                           "content": st.text(max_size=30) | json_values}),
    max_size=4,
)
# Rows that look like the contract, with any field possibly wrong or missing.
rows = st.fixed_dictionaries(
    {},
    optional={"messages": messages | json_values, "reward": json_values, "rewards": json_values,
              "source": st.sampled_from(["real", "synthetic", "other"]) | json_values, "task_id": json_values,
              "meta": json_values},
)

GOOD = {"messages": [{"role": "user", "content": "You are at (0, 0)."}, {"role": "assistant", "content": "move east"}],
        "reward": 1.0}


def load(path: Path, tokenizer, split: str = "real"):
    with tempfile.TemporaryDirectory() as cache:
        return load_split(str(path), split, tokenizer, cache_dir=cache, max_length=256)


@FUZZ
@given(row=rows | json_values, split=st.sampled_from(["real", "synthetic", "validation", "predict"]))
def test_row_validation_raises_only_trajectory_format_errors_naming_the_row(row, split):
    try:
        trajectory = Trajectory.from_dict(row, where="data.jsonl:7", split=split)
    except TrajectoryFormatError as error:
        assert str(error).startswith("data.jsonl:7: ")
        return
    assert trajectory.num_turns >= 1 and trajectory.source in ("real", "synthetic")


@FUZZ
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_in_a_jsonl_file_fail_with_file_and_line(tiny_tokenizer, raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(raw)
        try:
            split = load(path, tiny_tokenizer)
        except TrajectoryFormatError as error:
            assert str(path) in str(error)
            return
        assert split.num_rows >= 1  # bytes that happen to be valid rows load in full


@FUZZ
@given(bad=rows | json_values | st.binary(min_size=1, max_size=60), position=st.integers(0, 5))
def test_one_bad_line_among_good_ones_is_named_and_nothing_loads(tiny_tokenizer, bad, position):
    if isinstance(bad, bytes):
        line = bad.replace(b"\n", b" ").replace(b"\r", b" ")
        assume(line.strip())
    else:
        line = json.dumps(bad).encode()
    try:  # skip the draws that are in fact valid rows
        Trajectory.from_dict(json.loads(line), where="probe", split="real")
        assume(False)
    except (TrajectoryFormatError, ValueError, RecursionError):
        pass
    lines = [json.dumps(GOOD).encode()] * 5
    lines.insert(position, line)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixed.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(TrajectoryFormatError) as error:
            load(path, tiny_tokenizer)
    assert str(error.value).startswith(f"{path}:{position + 1}: "), str(error.value)


@pytest.mark.parametrize("line, field", [
    ("[" * 50_000, "malformed JSON: nested too deeply"),
    ('{"reward": ' + "9" * 5000 + "}", "malformed JSON"),
    (json.dumps({**GOOD, "reward": 10**400}), "field 'reward': not a finite number"),
    (json.dumps({**GOOD, "reward": float("nan")}), "field 'reward': not a finite number"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\\ud800"}], "reward": 1}',
     "field 'messages[1].content': not valid unicode text"),
    (json.dumps({**GOOD, "task_id": "\ud800"}), "field 'task_id': not valid unicode text"),
    (b"\xff\xfe{}", "malformed JSON"),
])
def test_edge_cases_the_fuzzer_found_name_file_line_and_field(tiny_tokenizer, tmp_path, line, field):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), line if isinstance(line, bytes) else line.encode()]))
    with pytest.raises(TrajectoryFormatError, match="^" + str(path) + ":2: .*" + field.replace("[", r"\[")):
        load(path, tiny_tokenizer)


@FUZZ
@given(turns=st.lists(st.tuples(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40)),
                      min_size=1, max_size=3))
def test_any_unicode_conversation_encodes_with_agent_tokens(tiny_tokenizer, turns):
    conversation = []
    for user, assistant in turns:
        conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    try:
        trajectory = Trajectory.from_dict({"messages": conversation, "reward": 0}, where="x:1", split="real")
    except TrajectoryFormatError as error:  # whitespace-only or non-UTF-8 content: refused by name
        assert "content" in str(error)
        return
    row = TrajectoryEncoder(tiny_tokenizer).encode(trajectory.messages)
    assert row["num_agent_tokens"] >= len(turns)  # every assistant turn has its end-of-turn token at least
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["obs_mask"])
