"""Rendering, agent/observation masks and truncation of TrajectoryEncoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boost_lightning.data.tokenizer import train_chat_tokenizer
from boost_lightning.data.trajectory import IGNORE_INDEX, Trajectory, TrajectoryEncoder, TrajectoryFormatError

CONVERSATION = [
    {"role": "system", "content": "You are in a maze."},
    {"role": "user", "content": "You are at (0, 0). Walls: north."},
    {"role": "assistant", "content": "move east"},
    {"role": "user", "content": "That move hits a wall."},
    {"role": "assistant", "content": "move south"},
    {"role": "tool", "content": "You reached the goal."},
    {"role": "assistant", "content": "move west"},
]
ASSISTANT_TURNS = [2, 4, 6]


def tokens_of_turn(tokenizer, row: dict, turn: int, mask: str) -> str:
    """Decode the tokens of message ``turn`` selected by ``mask`` ("labels" or "obs_mask")."""
    picked = [
        token
        for token, label, obs, owner in zip(row["input_ids"], row["labels"], row["obs_mask"], row["turn_ids"])
        if owner == turn and (label != IGNORE_INDEX if mask == "labels" else obs)
    ]
    return tokenizer.decode(picked)


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "plain_tokenizer"])
def test_agent_mask_is_each_assistant_content_plus_end_of_turn(fixture, request):
    tokenizer = request.getfixturevalue(fixture)
    row = TrajectoryEncoder(tokenizer).encode(CONVERSATION)

    for turn in ASSISTANT_TURNS:
        assert tokens_of_turn(tokenizer, row, turn, "labels") == CONVERSATION[turn]["content"] + "<|im_end|>"
    labelled = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "move east<|im_end|>move south<|im_end|>move west<|im_end|>"
    # HF convention: labels are the input ids themselves (not shifted) on the mask, -100 elsewhere.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(row["input_ids"], row["labels"]))
    assert row["num_agent_tokens"] == len(labelled) and row["num_turns"] == 3
    assert row["length"] == len(row["input_ids"]) == len(row["attention_mask"]) == len(row["turn_ids"])

    for turn in (1, 3, 5):  # user and tool contents are the observations, without any glue
        assert tokens_of_turn(tokenizer, row, turn, "obs_mask") == CONVERSATION[turn]["content"]
    observed = [t for t, obs in zip(row["input_ids"], row["obs_mask"]) if obs]
    assert tokenizer.decode(observed) == "".join(CONVERSATION[i]["content"] for i in (1, 3, 5))
    # Role headers are template glue: no message.
    glue = tokenizer.decode([t for t, owner in zip(row["input_ids"], row["turn_ids"]) if owner == -1])
    assert "assistant" in glue and "move" not in glue


def test_template_rendering_matches_the_tokenizer(tiny_tokenizer):
    row = TrajectoryEncoder(tiny_tokenizer).encode(CONVERSATION)
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert row["input_ids"] == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The newline after <|im_end|> and the "<|im_start|>assistant\n" header are not trained on.
    decoded = [tiny_tokenizer.decode([t]) for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert "\n" not in decoded and "<|im_start|>" not in decoded


def test_plain_format_is_role_tagged(plain_tokenizer):
    row = TrajectoryEncoder(plain_tokenizer).encode(CONVERSATION[:3])
    assert plain_tokenizer.decode(row["input_ids"]) == (
        "<|im_start|>system:\nYou are in a maze.<|im_end|>\nuser:\nYou are at (0, 0). Walls: north.<|im_end|>\n"
        "assistant:\nmove east<|im_end|>\n"
    )


def test_token_straddling_glue_and_content_belongs_to_the_content():
    tokenizer = train_chat_tokenizer(["assistant: move north", "user: hello there"] * 5, vocab_size=300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}<|im_end|>{% endfor %}"
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "move north"}]
    row = TrajectoryEncoder(tokenizer).encode(messages)
    # " move" starts on the glue space; its first non-space character is content, so the token is content.
    assert tokens_of_turn(tokenizer, row, 1, "labels") == " move north<|im_end|>"


def test_template_that_rewrites_contents_and_uses_its_own_end_of_turn_token():
    tokenizer = train_chat_tokenizer(["move east", "move west", "hello"] * 5, vocab_size=300)
    headers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": headers})
    tokenizer.chat_template = (  # Llama-3 style: contents trimmed, <|eot_id|> ends every turn
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "  move east \n"},
        {"role": "user", "content": "assistant"},  # equals template glue: must not be matched there
        {"role": "assistant", "content": "move west"},
    ]
    row = TrajectoryEncoder(tokenizer).encode(messages)
    assert tokens_of_turn(tokenizer, row, 1, "labels") == "move east<|eot_id|>"
    assert tokens_of_turn(tokenizer, row, 3, "labels") == "move west<|eot_id|>"
    assert tokens_of_turn(tokenizer, row, 2, "obs_mask") == "assistant"


def test_contents_equal_to_template_glue_are_located_exactly(tiny_tokenizer):
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "assistant"}]
    row = TrajectoryEncoder(tiny_tokenizer).encode(messages)
    assert tokens_of_turn(tiny_tokenizer, row, 1, "labels") == "assistant<|im_end|>"
    assert tokens_of_turn(tiny_tokenizer, row, 0, "obs_mask") == "user"


def exchanges_conversation() -> list[dict]:
    """System, then 4 exchanges; the second has a tool reply and two assistant messages."""
    return [
        {"role": "system", "content": "You are in a maze."},
        {"role": "user", "content": "You are at (0, 0). Walls: north."},  # exchange 0: 1-2
        {"role": "assistant", "content": "move east"},
        {"role": "user", "content": "That move hits a wall."},  # exchange 1: 3-6
        {"role": "assistant", "content": "move south"},
        {"role": "tool", "content": "You are at (0, 1)."},
        {"role": "assistant", "content": "move west"},
        {"role": "user", "content": "You are at (1, 1). Is it a cat?"},  # exchange 2: 7-8
        {"role": "assistant", "content": "move north"},
        {"role": "user", "content": "You reached the goal."},  # exchange 3: 9-10
        {"role": "assistant", "content": "move east"},
    ]


def kept_messages(row: dict) -> set[int]:
    return set(row["turn_ids"]) - {-1}


def test_truncation_drops_earliest_exchanges_and_keeps_the_system_prompt(tiny_tokenizer):
    messages = exchanges_conversation()
    full = TrajectoryEncoder(tiny_tokenizer)
    keep_last_two = [0, 7, 8, 9, 10]
    budget = full.encode([messages[i] for i in keep_last_two])["length"]
    one_more = full.encode([messages[i] for i in [0, 3, 4, 5, 6, 7, 8, 9, 10]])["length"]
    assert one_more > budget

    row = TrajectoryEncoder(tiny_tokenizer, max_length=budget).encode(messages)
    assert kept_messages(row) == set(keep_last_two)  # whole exchanges 0 and 1 gone, system kept, nothing cut
    assert row["length"] == budget and row["num_turns"] == 2
    row = TrajectoryEncoder(tiny_tokenizer, max_length=one_more).encode(messages)
    assert kept_messages(row) == {0, 3, 4, 5, 6, 7, 8, 9, 10}  # only as many exchanges as needed

    untouched = TrajectoryEncoder(tiny_tokenizer, max_length=1000).encode_batch([messages])[0]
    assert not untouched.truncated


def test_truncation_cuts_the_tail_when_the_last_exchange_does_not_fit(tiny_tokenizer):
    messages = exchanges_conversation()
    last = TrajectoryEncoder(tiny_tokenizer).encode([messages[i] for i in (0, 9, 10)])
    agent_start = last["labels"].index(next(label for label in last["labels"] if label != IGNORE_INDEX))
    max_length = agent_start + 1  # keeps a single agent token

    (encoded,) = TrajectoryEncoder(tiny_tokenizer, max_length=max_length).encode_batch([messages])
    row = encoded.to_row()
    assert encoded.truncated and row["length"] == max_length
    assert row["input_ids"] == last["input_ids"][:max_length]
    assert row["num_agent_tokens"] == 1


def test_all_agent_tokens_truncated_gives_none(tiny_tokenizer):
    messages = exchanges_conversation()
    encoder = TrajectoryEncoder(tiny_tokenizer, max_length=5)
    assert encoder.encode_batch([messages]) == [None]
    with pytest.raises(ValueError, match="truncated away"):
        encoder.encode(messages)


def test_rows_are_truncated_independently_in_a_batch(tiny_tokenizer):
    short = CONVERSATION[:3]
    budget = TrajectoryEncoder(tiny_tokenizer).encode(short)["length"]
    encoded = TrajectoryEncoder(tiny_tokenizer, max_length=budget).encode_batch([short, exchanges_conversation()])
    assert not encoded[0].truncated and encoded[1].truncated and len(encoded[1]) <= budget


def test_trajectory_from_dict_fills_defaults(make_row):
    row = make_row(3)
    del row["task_id"], row["meta"]
    trajectory = Trajectory.from_dict(row, where="f:1", split="synthetic")
    assert (trajectory.source, trajectory.task_id, trajectory.meta, trajectory.num_turns) == ("synthetic", "", {}, 2)
    summed = Trajectory.from_dict({**make_row(0), "reward": None, "rewards": [0.5, 1]}, where="f:1", split="real")
    assert summed.reward == 1.5 and summed.source == "real"


def test_role_error_message_format():
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "bot"}]}
    with pytest.raises(TrajectoryFormatError) as error:
        Trajectory.from_dict({**row, "reward": 1.0}, where="data.jsonl:7", split="real")
    assert str(error.value) == (
        "data.jsonl:7: field 'messages[2].role': unknown role 'bot' (expected one of system, user, assistant, tool)"
    )


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        TrajectoryEncoder(Slow())


text = st.text(alphabet=st.sampled_from(list("abcxyz019 .,:!?\n\té中")), min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(contents=st.lists(text, min_size=2, max_size=6), plain=st.booleans())
def test_masks_cover_exactly_the_contents_for_any_text(tiny_tokenizer, plain_tokenizer, contents, plain):
    tokenizer = plain_tokenizer if plain else tiny_tokenizer
    messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    row = TrajectoryEncoder(tokenizer).encode(messages)
    labelled_turns = {turn for turn, label in zip(row["turn_ids"], row["labels"]) if label != IGNORE_INDEX}
    assert labelled_turns == set(range(1, len(messages), 2))  # assistant messages only, each of them
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            agent = tokens_of_turn(tokenizer, row, turn, "labels")
            # Everything from the first non-space character on, then the end-of-turn token.
            assert agent.endswith("<|im_end|>") and message["content"].endswith(agent[: -len("<|im_end|>")])
            assert agent[: -len("<|im_end|>")].strip() == message["content"].strip()
        else:
            observed = tokens_of_turn(tokenizer, row, turn, "obs_mask")
            assert message["content"].endswith(observed) and observed.strip() == message["content"].strip()
