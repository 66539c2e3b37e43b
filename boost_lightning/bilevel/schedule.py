"""When each level steps, batch by batch: inner (policy) accumulation, outer cadence, warm-up, outer accumulation.

Plain Python, checkpointed with the module. The outer schedule counts *policy* steps: with
``inner_accumulate = A`` a policy step takes A batches, a due policy step feeds the hypergradients of its A batches
into one head step, and ``outer_accumulate = O`` accumulates O due policy steps per head step. So the head steps at
most once per policy step, whatever A is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cycle:
    """What one batch does at each level."""

    first: bool  # first batch of a policy step: zero the policy's gradients
    last: bool  # last batch of a policy step: the policy steps after it
    outer: bool  # the weighting's parameters get this batch's hypergradient
    head_zero: bool  # ... as the first contribution to a head step
    head_step: bool  # ... and the head steps after it


class BilevelSchedule:
    """Says, batch by batch, which level zeroes, accumulates and steps.

    Args:
        inner_accumulate: Batches per policy step (A).
        outer_accumulate: Due policy steps per head step (O).
        outer_every: A policy step is due for the head every this many policy steps...
        warmup: ... once this many policy steps have been taken.
    """

    def __init__(self, inner_accumulate: int = 1, outer_accumulate: int = 1, outer_every: int = 1,
                 warmup: int = 0) -> None:
        for name, value in (("inner_accumulate_grad_batches", inner_accumulate),
                            ("outer_accumulate_grad_batches", outer_accumulate),
                            ("outer_every_n_steps", outer_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.inner_accumulate, self.outer_accumulate = inner_accumulate, outer_accumulate
        self.outer_every, self.warmup = outer_every, warmup
        self.batches_seen = 0  # batches started
        self.outer_evals = 0  # due policy steps whose last batch has started

    def next(self, inner_steps: int, learns: bool) -> Cycle:
        """Advance by one batch, given the policy steps taken so far and whether there is an outer level."""
        seen, self.batches_seen = self.batches_seen, self.batches_seen + 1
        first, last = seen % self.inner_accumulate == 0, (seen + 1) % self.inner_accumulate == 0
        # inner_steps moves only at the end of a policy step, so every batch of one agrees on whether it is due.
        outer = learns and inner_steps >= self.warmup and inner_steps % self.outer_every == 0
        before = self.outer_evals
        if outer and last:
            self.outer_evals += 1
        return Cycle(first=first, last=last, outer=outer,
                     head_zero=outer and first and before % self.outer_accumulate == 0,
                     head_step=outer and last and self.outer_evals % self.outer_accumulate == 0)

    def drop_partial_outer(self) -> None:
        """A skipped step dropped the head's accumulated gradients: the next due step starts a new head step."""
        self.outer_evals -= self.outer_evals % self.outer_accumulate

    def state_dict(self) -> dict[str, int]:
        return {"batches_seen": self.batches_seen, "outer_evals": self.outer_evals}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
        self.outer_evals = int(state.get("outer_evals", 0))
