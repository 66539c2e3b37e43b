"""Fuzzing the environments' text parsers: whatever an agent writes is parsed into an action or an explanation,
and ``step`` answers it; nothing raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boost_lightning.envs.base import TASKS, make_env
from boost_lightning.envs.guess_number import parse_guess
from boost_lightning.envs.maze import parse_move
from boost_lightning.envs.twenty_questions import parse_turn, real_table

FUZZ = settings(max_examples=150, deadline=None, database=None)
# Arbitrary unicode plus text built from the words the parsers look for, so that both paths get exercised.
KEYWORDS = ["move", "go", "north", "south", "east", "west", "n", "up", "guess", "answer", "ask", "is", "it", "a",
            "animal", "cat", "bigger", "-", "42", "9" * 40, "?", "!", "\n", " "]
texts = st.text(max_size=200) | st.lists(st.sampled_from(KEYWORDS), max_size=12).map(" ".join)
NAMES = real_table().name_set


@FUZZ
@given(text=texts)
def test_parsers_return_an_action_or_an_explanation(text):
    direction, why = parse_move(text)
    assert (direction is None) != (why == "") and (direction is None or direction in ("north", "south", "east",
                                                                                       "west"))
    guess = parse_guess(text)
    assert guess is None or isinstance(guess, int)
    action, why = parse_turn(text, NAMES)
    assert (action is None) != (why == "")
    assert action is None or (action[0] in ("ask", "answer") and isinstance(action[1], str))


@pytest.mark.parametrize("task", TASKS)
@settings(max_examples=40, deadline=None, database=None)
@given(replies=st.lists(texts | st.integers() | st.none(), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_step_answers_anything_an_agent_writes(task, replies, seed):
    env = make_env(task)
    env.reset(seed)
    for reply in replies:
        observation, reward, done, info = env.step(reply)
        assert isinstance(observation, str) and observation
        assert isinstance(reward, float) and reward == reward
        assert isinstance(done, bool) and isinstance(info["valid"], bool)
        if done:
            break
