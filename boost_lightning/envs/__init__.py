"""Embedded multi-turn tasks: text simulators, expert and synthetic trajectory generators, rollout evaluation.

``make_env(task)`` builds an environment (``reset(seed)`` -> chat messages, ``step(text)`` -> observation, reward,
done, info); any object with these and a ``success`` attribute follows ``EnvProtocol``, and ``env_factory(env)`` turns
a task name, an import path or a callable into a factory of fresh environments. ``ensure_embedded(task)`` returns a
cached directory of real / validation / synthetic JSONL files and a tokenizer, ``embedded_splits(task)`` the paths of
those files; ``evaluate_policy(model, tokenizer, task)`` plays a causal LM on held-out instances. The rollout code
(``env_factory`` included) is imported on first use, so the simulators and the synthesizer do not pay for importing
torch (and ``python -m boost_lightning.envs.synthesize`` does not find its module already imported).
"""

from typing import Any

from boost_lightning.envs.base import (
    EVAL_SEED_START,
    REAL_SEED_START,
    SYNTHETIC_SEED_START,
    TASKS,
    TEST_SEED_START,
    VALIDATION_SEED_START,
    Env,
    EnvProtocol,
    TaskSpec,
    make_env,
    seed_split,
    task_spec,
)
from boost_lightning.envs.embedded import embedded_dir, embedded_splits, ensure_embedded
from boost_lightning.envs.generators import (
    DEFAULT_SETTINGS,
    benign_row,
    conflicting_row,
    demonstration_quality,
    expert_rows,
    hacked_row,
    hallucinated_row,
    lm_rows,
    noisy_expert_row,
    play,
    real_rows,
    replay,
    synthetic_pool,
    test_rows,
    validation_rows,
)

__all__ = [
    "DEFAULT_SETTINGS",
    "EVAL_SEED_START",
    "TEST_SEED_START",
    "REAL_SEED_START",
    "SYNTHETIC_SEED_START",
    "TASKS",
    "VALIDATION_SEED_START",
    "Env",
    "EnvProtocol",
    "RolloutResult",
    "TaskSpec",
    "build_splits",
    "demonstration_quality",
    "embedded_dir",
    "embedded_splits",
    "ensure_embedded",
    "env_factory",
    "evaluate_policy",
    "expert_rows",
    "hallucinated_row",
    "lm_rows",
    "make_env",
    "noisy_expert_row",
    "play",
    "play_policy",
    "real_rows",
    "replay",
    "seed_split",
    "benign_row",
    "conflicting_row",
    "hacked_row",
    "test_rows",
    "synthetic_pool",
    "task_spec",
    "validation_rows",
]

_LAZY = {"RolloutResult": "rollout", "env_factory": "rollout", "evaluate_policy": "rollout", "play_policy": "rollout",
         "build_splits": "synthesize"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"boost_lightning.envs.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
