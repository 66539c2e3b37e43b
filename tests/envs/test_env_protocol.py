"""The environment protocol: chat-shaped resets, lenient parsing that never raises, determinism, turn limits."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from boost_lightning.envs.base import (
    EVAL_SEED_START,
    SYNTHETIC_SEED_START,
    TASKS,
    TEST_SEED_START,
    VALIDATION_SEED_START,
    make_env,
    seed_split,
    task_spec,
)
from boost_lightning.envs.guess_number import parse_guess
from boost_lightning.envs.maze import parse_move
from boost_lightning.envs.twenty_questions import parse_turn, real_table

GARBAGE = ["", "   ", "\n\t", "🙂🙂", "<|im_end|>", "move", "guess", "ask:", "answer:", "north south", "x" * 5000,
           "9" * 5000, "-" + "9" * 5000, "guess -3", "guess 0", "guess 65", "ask: is it alive and wild?",
           "answer: cat dog", "\x00\x01", "Ω≈ç√∫", "move\u00a0north", "١٢٣"]


@pytest.mark.parametrize("task", TASKS)
def test_reset_is_chat_shaped(task):
    messages = make_env(task).reset(0)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(isinstance(m["content"], str) and m["content"] for m in messages)


@pytest.mark.parametrize("task", TASKS)
def test_step_requires_reset(task):
    with pytest.raises(RuntimeError):
        make_env(task).step("hello")


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task):
    def transcript(seed):
        env = make_env(task)
        out = [env.reset(seed)]
        for action in ["move north", "guess 10", "ask: is it alive?", "answer: cat", "garbage"] * 3:
            out.append(env.step(action))
        return out

    for seed in (0, 7, VALIDATION_SEED_START + 3, EVAL_SEED_START + 1, SYNTHETIC_SEED_START + 11):
        assert transcript(seed) == transcript(seed)
    assert len({str(transcript(s)) for s in range(20)}) > 1, "different seeds should give different instances"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("text", GARBAGE)
def test_garbage_is_penalised_not_raised(task, text):
    env = make_env(task)
    env.reset(3)
    observation, reward, done, info = env.step(text)
    assert isinstance(observation, str) and observation
    assert isinstance(reward, float) and isinstance(done, bool) and isinstance(info, dict)
    if not info["valid"]:
        assert reward < 0


@pytest.mark.parametrize("task", TASKS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text())
def test_parsers_never_raise(task, text):
    env = make_env(task)
    env.reset(5)
    observation, reward, done, info = env.step(text)
    assert isinstance(observation, str) and observation
    assert isinstance(reward, float)
    assert info["valid"] or reward < 0


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_parse_functions_never_raise(text):
    parse_move(text)
    parse_guess(text)
    parse_turn(text, real_table().name_set)


@pytest.mark.parametrize("text,expected", [
    ("move north", "north"), ("Move North!", "north"), ("  MOVE   east.  ", "east"), ("I go west now", "west"),
    ("up", "north"), ("s", "south"), ("move w", "west"), ("north, north", "north"),
    ("north then east", None), ("it's over", None), ("", None),
])
def test_parse_move(text, expected):
    assert parse_move(text)[0] == expected


@pytest.mark.parametrize("text,expected", [
    ("guess 37", 37), ("Guess: 37.", 37), ("I think 12, maybe 13", 12), ("GUESS  5 ", 5), ("guess -4", -4),
    ("no number", None), ("9" * 50, 10**6),
])
def test_parse_guess(text, expected):
    assert parse_guess(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("ask: is it an animal?", ("ask", "animal")), ("Is it ALIVE", ("ask", "alive")),
    ("ask: Does it have wheels?!", ("ask", "wheels")), ("answer: cat", ("answer", "cat")),
    ("Answer: The Cat.", ("answer", "cat")), ("is it a dog?", ("answer", "dog")),
    ("is it an animal like a cat?", ("ask", "animal")), ("answer: unicorn", ("answer", "unicorn")),
    ("ask: is it alive and wild?", None), ("hello there", None),
])
def test_parse_turn(text, expected):
    assert parse_turn(text, real_table().name_set)[0] == expected


def test_maze_rules():
    env = make_env("maze")
    env.reset(0)
    start = env.pos
    blocked = env.layout.blocked(start)[0]
    observation, reward, done, info = env.step(f"move {blocked}")
    assert observation.startswith("Blocked.") and reward == -env.invalid_penalty and not info["valid"]
    assert env.pos == start and not done


def test_guess_number_rules():
    env = make_env("guess_number")
    env.reset(0)
    secret = env.secret
    if secret > 1:
        assert env.step(f"guess {secret - 1}")[0] == "Higher."
    if secret < 64:
        assert env.step(f"guess {secret + 1}")[0] == "Lower."
    observation, reward, done, info = env.step(f"guess {secret}")
    assert (observation, reward, done, info["success"]) == ("Correct!", 1.0, True, True)
    assert env.step("guess 1")[2] is True  # stepping a finished episode is harmless


def test_twenty_questions_rules():
    env = make_env("twenty_questions")
    env.reset(0)
    table = env.table
    assert env.step("ask: is it alive?")[0] == ("Yes." if table.has(env.secret, "alive") else "No.")
    wrong = next(n for n in table.names if n != env.secret)
    observation, reward, done, _ = env.step(f"answer: {wrong}")
    assert observation == f"No, it is not {wrong}." and reward < 0 and not done
    assert env.step(f"answer: {env.secret}")[:3] == ("Correct!", 1.0, True)


@pytest.mark.parametrize("task", TASKS)
def test_max_turns_ends_the_episode(task):
    env = make_env(task, max_turns=3)
    env.reset(1)
    dones = [env.step("nonsense")[2] for _ in range(3)]
    assert dones == [False, False, True] and env.turns == 3 and not env.success


def test_seed_splits():
    assert seed_split(0) == "train" and seed_split(4_999) == "train"
    assert seed_split(VALIDATION_SEED_START) == "validation" and seed_split(TEST_SEED_START - 1) == "validation"
    assert seed_split(TEST_SEED_START) == "test" and seed_split(EVAL_SEED_START - 1) == "test"
    assert seed_split(EVAL_SEED_START) == "eval" and seed_split(SYNTHETIC_SEED_START - 1) == "eval"
    assert seed_split(SYNTHETIC_SEED_START) == "train"


def test_maze_instances_are_disjoint_across_splits():
    assert task_spec("maze").disjoint_instances
    env = make_env("maze")

    def instances(seeds):
        out = set()
        for s in seeds:
            env.reset(s)
            out.add((env.start, env.goal))
        return out

    train = instances(range(0, 200)) | instances(range(SYNTHETIC_SEED_START, SYNTHETIC_SEED_START + 500))
    validation = instances(range(VALIDATION_SEED_START, VALIDATION_SEED_START + 200))
    held_out = instances(range(EVAL_SEED_START, EVAL_SEED_START + 200))
    assert not train & validation and not train & held_out and not validation & held_out
    assert len(instances(range(64))) == 64, "consecutive seeds are distinct instances"


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_env("chess")
