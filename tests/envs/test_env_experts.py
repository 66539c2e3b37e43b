"""The experts solve every real instance in their optimal number of turns, within the turn limit."""

from __future__ import annotations

import pytest

from boost_lightning.envs.base import EVAL_SEED_START, SYNTHETIC_SEED_START, VALIDATION_SEED_START, make_env, task_spec
from boost_lightning.envs.generators import expert_policy, play
from boost_lightning.envs.guess_number import bisection_turns
from boost_lightning.envs.maze import REAL_LAYOUT, MazeEnv, get_layout
from boost_lightning.envs.twenty_questions import ATTRIBUTES, TwentyQuestionsEnv, real_table, shifted_table


def test_maze_expert_solves_every_instance():
    layout = get_layout(REAL_LAYOUT)
    assert len(layout.pairs) >= 200
    env = MazeEnv()
    for start, goal in layout.pairs:
        env.reset(0)
        env.start, env.goal, env.pos = start, goal, start  # every (start, goal) pair, whatever its split
        turns = 0
        while not env.done:
            env.step(env.expert_action())
            turns += 1
        assert env.success and turns == layout.dist[goal][start] <= env.max_turns


@pytest.mark.parametrize("task", ["maze", "guess_number", "twenty_questions"])
def test_expert_solves_every_seeded_instance(task):
    env = make_env(task)
    for base in (0, VALIDATION_SEED_START, EVAL_SEED_START, SYNTHETIC_SEED_START):
        for seed in range(base, base + 150):
            ep = play(env, seed, expert_policy)
            assert ep.success and ep.turns == ep.optimal_turns <= env.max_turns, (task, seed)


@pytest.mark.parametrize("variant", ["range-1-100", "reversed-feedback"])
def test_guess_number_shifted_expert_solves_its_own_task(variant):
    env = task_spec("guess_number").conflicting[variant]()
    for seed in range(200):
        ep = play(env, seed, expert_policy)
        assert ep.success and ep.turns == ep.optimal_turns


def test_guess_number_bisection():
    assert max(bisection_turns(t, 1, 64) for t in range(1, 65)) == 7
    env = make_env("guess_number")
    seen = set()
    for seed in range(400):
        env.reset(seed)
        seen.add(env.secret)
    assert seen == set(range(1, 65))


def test_twenty_questions_table():
    table = real_table()
    assert len(table.names) >= 60 and len(ATTRIBUTES) >= 12
    signatures = [frozenset(table.facts[n]) for n in table.names]
    assert len(set(signatures)) == len(signatures), "every object must be identifiable"
    assert all(len(n.split()) == 1 for n in table.names)
    keywords = {k for _, keys in ATTRIBUTES.values() for k in keys}
    assert not keywords & set(table.names), "an object name must not read as a question"
    for name in table.names:
        env = TwentyQuestionsEnv()
        env.reset(0)
        env.secret = name
        while not env.done:
            env.step(env.expert_action())
        assert env.success and env.turns == env.optimal_turns() <= 9


def test_shifted_table_differs_but_stays_identifiable():
    real, shifted = real_table(), shifted_table()
    assert real.names == shifted.names
    differing = sum(real.has(n, a) != shifted.has(n, a) for n in real.names for a in ATTRIBUTES)
    assert 0.1 < differing / (len(real.names) * len(ATTRIBUTES)) < 0.3
    assert len({frozenset(shifted.facts[n]) for n in shifted.names}) == len(shifted.names)
