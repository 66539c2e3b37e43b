"""Guess the number: find a secret integer in ``1..64``; the environment answers higher, lower or correct.

The expert bisects (``(lo + hi) // 2`` of the interval the replies allow), at most 7 guesses. An instance is the secret;
every split draws secrets from the whole range (the range is the task), keyed by seed. Rewards: ``-0.05`` per wrong
guess, ``-0.1`` for an unparseable or out-of-range guess, ``+1`` when correct.

Conflicting variants read just as well but teach the wrong behaviour: another range (1..100: wrong midpoints) and
reversed feedback (``Higher.`` meaning *your guess* is higher, with the very same system prompt). The benign variant
is the real game with the expert's guesses worded in other ways (``My guess is 32.``): the same correct decisions in
another surface form.
"""

from __future__ import annotations

import random
import re
from typing import Any

from boost_lightning.envs.base import Env, HallucinationMixin, TaskSpec

_NUMBER = re.compile(r"-?[0-9]+")
_MAX_DIGITS = 6  # longer digit runs are out of range anyway, and int() of huge strings is slow (or refused)


def parse_guess(text: str) -> int | None:
    """The first integer in ``text`` (``"Guess: 37."``, ``"I guess 37"``, ``"37"``), or ``None``."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    digits = match.group().lstrip("-")
    if len(digits) > _MAX_DIGITS:
        return -1 if match.group().startswith("-") else 10**_MAX_DIGITS
    return int(match.group())


def bisection_turns(target: int, low: int, high: int) -> int:
    """Guesses binary search (lower midpoint) needs to hit ``target`` in ``[low, high]``."""
    turns = 0
    while low <= high:
        turns += 1
        mid = (low + high) // 2
        if mid == target:
            return turns
        low, high = (mid + 1, high) if target > mid else (low, mid - 1)
    raise ValueError(f"{target} is not in the range")


class GuessNumberEnv(Env):
    """Find the secret number by guessing.

    Args:
        low: Smallest possible secret.
        high: Largest possible secret.
        reversed_feedback: ``Higher.`` means the guess is above the secret (a task-shifted variant).
        max_turns: Agent turns before the episode ends unsolved (default 10).
    """

    task = "guess_number"
    default_max_turns = 10

    def __init__(self, low: int = 1, high: int = 64, reversed_feedback: bool = False,
                 max_turns: int | None = None) -> None:
        super().__init__(max_turns)
        if low > high:
            raise ValueError(f"empty range {low}..{high}")
        self.low, self.high, self.reversed_feedback = low, high, reversed_feedback
        self.secret = low
        self.lo, self.hi = low, high  # the interval the replies so far allow: the agent's belief

    @property
    def system_prompt(self) -> str:
        return (f"I am thinking of a number from {self.low} to {self.high}. Find it. "
                "Each turn reply: guess N. I reply higher, lower or correct.")

    @property
    def instance(self) -> dict[str, Any]:
        return {"secret": self.secret, "low": self.low, "high": self.high, "reversed": self.reversed_feedback}

    def _setup(self, seed: int) -> None:
        # Keyed by task and range, not class, so a hallucinating simulator gets the same secret for a seed.
        self.secret = random.Random(f"guess_number/{self.low}-{self.high}/{seed}").randint(self.low, self.high)
        self.lo, self.hi = self.low, self.high

    def _first_observation(self) -> str:
        return "Make your first guess."

    def _parse(self, text: str) -> tuple[int | None, str]:
        guess = parse_guess(text)
        if guess is None or not self.low <= guess <= self.high:
            return None, f"Invalid. Reply: guess N, with N from {self.low} to {self.high}."
        return guess, ""

    def _reply(self, guess: int, secret_above: bool) -> str:
        """The text for 'the secret is above / below ``guess``', and the belief update it implies."""
        if secret_above:
            self.lo = max(self.lo, guess + 1)
        else:
            self.hi = min(self.hi, guess - 1)
        says_higher = secret_above != self.reversed_feedback
        return "Higher." if says_higher else "Lower."

    def _apply(self, guess: int) -> tuple[str, float, bool]:
        if guess == self.secret:
            self.success = True
            return "Correct!", self.success_reward, True
        return self._reply(guess, self.secret > guess), -self.step_cost, True

    def expert_action(self) -> str:
        lo, hi = (self.lo, self.hi) if self.lo <= self.hi else (self.low, self.high)
        return f"guess {(lo + hi) // 2}"

    def random_action(self, rng: random.Random) -> str:
        return f"guess {rng.randint(self.low, self.high)}"

    def optimal_turns(self) -> int:
        return bisection_turns(self.secret, self.low, self.high)


class HallucinatingGuessNumberEnv(HallucinationMixin, GuessNumberEnv):
    """A number-game simulator that changes its mind, the way an LLM playing the environment does.

    On a corrupted turn it either declares a wrong guess correct or gives the opposite direction and quietly switches
    to a new secret consistent with everything it has said, so the expert (which trusts the replies) still converges,
    on the wrong number. One turn before the expert would finish is always corrupted.

    Args:
        rate: Probability that any other turn is corrupted too.
        max_turns: Agent turns before the episode ends unsolved.
    """



    def _apply(self, guess: int) -> tuple[str, float, bool]:
        if not (self.turns - 1 == self._forced or self._rng.random() < self.rate):
            return super()._apply(guess)
        options = [] if guess == self.secret else ["correct"]
        truth = None if guess == self.secret else ("above" if self.secret > guess else "below")
        # A lie about the direction needs a new secret on the other side that the earlier replies still allow.
        for side, feasible in (("above", max(self.lo, guess + 1) <= self.hi),
                               ("below", self.lo <= min(self.hi, guess - 1))):
            if side != truth and feasible:
                options.append(side)
        if not options:
            return super()._apply(guess)
        kind = self._rng.choice(options)
        self.corrupted_turns.append(self.turns - 1)
        if kind == "correct":
            self.success = True
            return "Correct!", self.success_reward, True
        above = kind == "above"
        if above:
            self.secret = self._rng.randint(max(self.lo, guess + 1), self.hi)
        else:
            self.secret = self._rng.randint(self.lo, min(self.hi, guess - 1))
        return self._reply(guess, above), -self.step_cost, True


_PARAPHRASES = ("guess {n}", "My guess is {n}.", "I guess {n}", "{n}", "Is it {n}?")


class ParaphrasedGuessNumberEnv(GuessNumberEnv):
    """The real game; its expert words each guess in one of several ways (the same bisection)."""

    def expert_action(self) -> str:
        n = super().expert_action().split()[-1]
        return random.Random(f"paraphrase/{self.seed}/{self.turns}").choice(_PARAPHRASES).format(n=n)


SPEC = TaskSpec(
    name="guess_number",
    env=GuessNumberEnv,
    conflicting={
        "range-1-100": lambda: GuessNumberEnv(1, 100),
        "reversed-feedback": lambda: GuessNumberEnv(reversed_feedback=True),
    },
    benign={"paraphrased": ParaphrasedGuessNumberEnv},
    hallucinating=HallucinatingGuessNumberEnv,
    disjoint_instances=False,
)
