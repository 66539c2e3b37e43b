"""The environment protocol shared by the embedded tasks, the seed ranges that keep splits apart, and the registry.

An environment speaks chat: ``reset(seed)`` returns the opening messages (a system prompt with the rules and the first
observation as a user turn), ``step(agent_text)`` takes whatever the agent wrote and answers with an observation.
Free-form text never raises: an unparseable or illegal action costs a penalty and gets an explanatory observation,
because rollouts of half-trained models produce every kind of garbage and one bad turn must not end an evaluation.

Seeds name task instances and decide which split an instance belongs to (see :func:`seed_split`), so real
demonstrations, the validation split, the synthetic pool and the held-out rollout instances never share a seed
(and, for tasks with a large enough instance space, never share an instance).
"""

from __future__ import annotations

import importlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

TASKS = ("maze", "guess_number", "twenty_questions")

REAL_SEED_START = 0
VALIDATION_SEED_START = 5_000
TEST_SEED_START = 7_500
EVAL_SEED_START = 10_000
SYNTHETIC_SEED_START = 20_000

Message = dict[str, str]


def seed_split(seed: int) -> str:
    """Which split a seed's instance is drawn from.

    Args:
        seed: Instance seed.

    Returns:
        ``"train"`` for real demonstrations (``[0, 5000)``) and the synthetic pool (``>= 20000``), ``"validation"``
        for ``[5000, 7500)``, ``"test"`` for the held-out real test rows ``[7500, 10000)`` (a low-variance metric,
        disjoint from validation and evaluation) and ``"eval"`` for the held-out rollout instances ``[10000, 20000)``.
    """
    if VALIDATION_SEED_START <= seed < TEST_SEED_START:
        return "validation"
    if TEST_SEED_START <= seed < EVAL_SEED_START:
        return "test"
    if EVAL_SEED_START <= seed < SYNTHETIC_SEED_START:
        return "eval"
    return "train"


def split_instances(num_instances: int, key: str,
                    fractions: Sequence[float] = (0.5, 0.2, 0.1, 0.2)) -> dict[str, list]:
    """Partition ``range(num_instances)`` into disjoint train / validation / test / eval pools, each in a fixed
    shuffled order.

    Args:
        num_instances: Size of the instance space.
        key: Seeds the shuffle, so each task (and layout) gets its own fixed partition.
        fractions: Shares of train, validation and test (eval gets the rest).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...], "eval": [...]}`` of instance indices.
    """
    order = list(range(num_instances))
    random.Random(f"pools/{key}").shuffle(order)
    ends = [round(sum(fractions[: i + 1]) * num_instances) for i in range(3)]
    return {
        "train": order[: ends[0]],
        "validation": order[ends[0] : ends[1]],
        "test": order[ends[1] : ends[2]],
        "eval": order[ends[2] :],
    }


def pool_index(seed: int, pool_size: int) -> int:
    """Position inside a split's pool for ``seed``: consecutive seeds walk the pool, so they are distinct instances."""
    start = {"train": REAL_SEED_START, "validation": VALIDATION_SEED_START, "test": TEST_SEED_START,
             "eval": EVAL_SEED_START}[seed_split(seed)]
    if seed >= SYNTHETIC_SEED_START:
        start = SYNTHETIC_SEED_START
    return (seed - start) % pool_size


def words(text: str) -> list[str]:
    """Lower-case ASCII words and digit runs of ``text``; everything else separates them."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


@runtime_checkable
class EnvProtocol(Protocol):
    """The minimal environment a rollout plays: implement it to evaluate a policy on your own simulator.

    ``reset(seed)`` starts the instance named by ``seed`` and returns the opening chat messages (typically a system
    message with the rules and a user message with the first observation). ``step(agent_text)`` takes the agent's
    reply and returns ``(observation, reward, done, info)``; it should not raise on text it cannot parse (a
    half-trained model writes anything) but answer with a penalty and an explanatory observation, and put
    ``info["invalid"] = True`` so that the reply counts in ``rollout/invalid_action_rate``. ``success`` (an attribute
    or a property) says whether the current episode was solved; it is read after every step.

    Optional: ``optimal_turns()`` and ``instance`` (a JSON-able dict) are recorded with each played episode when
    present. :class:`Env` and the embedded tasks satisfy this protocol (their ``info`` marks an unparseable reply with
    ``action = None`` instead of ``invalid``).
    """

    success: bool

    def reset(self, seed: int) -> list[Message]:
        """Start the instance named by ``seed``; the opening chat messages."""
        ...

    def step(self, agent_text: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Play one agent turn: ``(observation, reward, done, info)``."""
        ...


#: Builds a fresh environment for each episode (a class, a function, a ``functools.partial``).
EnvFactory = Callable[[], EnvProtocol]


class Env(ABC):
    """A text environment that an LLM agent plays through chat messages.

    Subclasses define the instance space, the rules (``system_prompt``), parsing, dynamics and an expert. The expert
    acts on what the environment has *told* the agent (its belief), not on hidden state, so the same expert plays a
    hallucinating simulator by trusting its replies.

    Args:
        max_turns: Agent turns before the episode ends unsolved (``None``: the task's default).
    """

    task: str = ""
    default_max_turns: int = 16
    invalid_penalty: float = 0.1
    step_cost: float = 0.05
    success_reward: float = 1.0

    def __init__(self, max_turns: int | None = None) -> None:
        self.max_turns = int(max_turns) if max_turns else self.default_max_turns
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.seed: int | None = None
        self.turns = 0
        self.done = True
        self.success = False
        self.total_reward = 0.0

    @property
    @abstractmethod
    def system_prompt(self) -> str:
        """The rules, shown once as the system message."""

    @property
    def instance(self) -> dict[str, Any]:
        """JSON-able description of the current instance (ground truth, for ``meta`` only)."""
        return {}

    @abstractmethod
    def _setup(self, seed: int) -> None:
        """Pick the instance for ``seed`` and reset the dynamics."""

    @abstractmethod
    def _first_observation(self) -> str:
        """The first user message after the system prompt."""

    @abstractmethod
    def _parse(self, text: str) -> tuple[Any, str]:
        """Turn agent text into an action, or ``(None, explanation)`` when it is unparseable or illegal."""

    @abstractmethod
    def _apply(self, action: Any) -> tuple[str, float, bool]:
        """Apply a parsed action: ``(observation, reward, legal)``; sets ``self.success`` / ``self._ended``."""

    @abstractmethod
    def expert_action(self) -> str:
        """The expert's next action as agent text, planned on what the environment has told the agent so far."""

    @abstractmethod
    def random_action(self, rng: random.Random) -> str:
        """A random but well-formed action (what a noisy expert does when it errs)."""

    @abstractmethod
    def optimal_turns(self) -> int:
        """Turns the expert needs on the current instance, on this environment's true dynamics."""

    def reset(self, seed: int) -> list[Message]:
        """Start the instance named by ``seed``.

        Args:
            seed: Instance seed; the same seed always gives the same instance and the same dynamics.

        Returns:
            ``[system message with the rules, user message with the first observation]``.
        """
        self.seed = int(seed)
        self.turns = 0
        self.done = False
        self.success = False
        self._ended = False
        self.total_reward = 0.0
        self._rng = random.Random(f"{self.task}/{type(self).__name__}/{self.seed}")
        self._setup(self.seed)
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": self._first_observation()}]

    def step(self, agent_text: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Play one agent turn.

        Args:
            agent_text: Whatever the agent wrote; parsed leniently (case, punctuation, extra words).

        Returns:
            ``(observation, reward, done, info)``; ``info`` has ``valid`` (the action parsed and was legal),
            ``action`` (the canonical action or ``None``), ``success`` and ``turn``.
        """
        if self.seed is None:
            raise RuntimeError("call reset(seed) before step()")
        if self.done:
            return "The episode is over.", 0.0, True, {"valid": False, "action": None, "success": self.success,
                                                       "turn": self.turns}
        self.turns += 1
        action, error = self._parse(agent_text if isinstance(agent_text, str) else str(agent_text))
        if action is None:
            observation, reward, valid = error, -self.invalid_penalty, False
        else:
            observation, reward, valid = self._apply(action)
        if self.success or self._ended:
            self.done = True
        elif self.turns >= self.max_turns:
            self.done = True
            observation = f"{observation} Out of turns."
        self.total_reward += reward
        return observation, reward, self.done, {"valid": valid, "action": action, "success": self.success,
                                                "turn": self.turns}


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task's environments.

    Attributes:
        name: Task name (one of :data:`TASKS`).
        env: Builds the real environment (keyword arguments go to its constructor).
        conflicting: Named builders of tasks with the same surface format and a different correct action (swapped
            action meanings, reversed feedback, another world): expert play there succeeds in its own task and
            teaches the wrong move for the real one.
        benign: Named builders of more diverse instances or strategies that still teach correct moves for the real
            task (other layouts, another valid tie-break).
        hallucinating: Builds a simulator whose replies drift from the true dynamics; takes ``rate`` and
            ``max_turns``.
        disjoint_instances: Whether train / validation / eval seeds map to disjoint instance pools. Tasks whose
            instance is a secret the agent must name (a number, an object) share the instance space across splits:
            an object never seen in training cannot be named.
    """

    name: str
    env: Callable[..., Env]
    conflicting: Mapping[str, Callable[[], Env]] = field(default_factory=dict)
    benign: Mapping[str, Callable[[], Env]] = field(default_factory=dict)
    hallucinating: Callable[..., Env] | None = None
    disjoint_instances: bool = False


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``.

    Args:
        task: One of :data:`TASKS`.

    Returns:
        The task's spec (its module is imported on first use).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return importlib.import_module(f"boost_lightning.envs.{task}").SPEC


def make_env(task: str, **kwargs: Any) -> Env:
    """Build the real environment of ``task``.

    Args:
        task: One of :data:`TASKS`.
        **kwargs: Constructor arguments of the task's environment (e.g. ``max_turns``).

    Returns:
        A fresh environment; call ``reset(seed)`` before ``step``.
    """
    return task_spec(task).env(**kwargs)


class HallucinationMixin:
    """Shared state of the hallucinating simulators: a corruption rate and one turn that is always corrupted.

    Mixed in before a task's environment class; ``_forced_turns`` says how many of the expert's turns the forced
    corruption may fall on (all but the last by default: the last one is the answer that ends the game).
    """

    rate: float
    corrupted_turns: list[int]

    def __init__(self, rate: float = 0.2, max_turns: int | None = None) -> None:
        super().__init__(max_turns=max_turns)  # type: ignore[call-arg]
        self.rate = rate
        self.corrupted_turns = []

    def _forced_turns(self) -> int:
        return max(1, self.optimal_turns() - 1)  # type: ignore[attr-defined]

    def _setup(self, seed: int) -> None:
        super()._setup(seed)  # type: ignore[misc]
        self.corrupted_turns = []
        self._forced = self._rng.randrange(self._forced_turns())  # type: ignore[attr-defined]
