"""Which level zeroes, accumulates and steps, batch by batch."""

import pytest

from boost_lightning.bilevel.schedule import BilevelSchedule


def run(schedule: BilevelSchedule, batches: int, learns: bool = True) -> list[str]:
    """Simulate the module: one letter code per batch (z/s: head zero/step, P: policy step)."""
    inner_steps, out = 0, []
    for _ in range(batches):
        c = schedule.next(inner_steps, learns)
        out.append(("z" if c.head_zero else "") + ("s" if c.head_step else "") + ("P" if c.last else ""))
        inner_steps += c.last
    return out


def test_defaults_step_both_levels_every_batch():
    assert run(BilevelSchedule(), 3) == ["zsP", "zsP", "zsP"]
    assert run(BilevelSchedule(), 2, learns=False) == ["P", "P"]


def test_inner_accumulation_gives_one_head_step_per_policy_step():
    assert run(BilevelSchedule(inner_accumulate=3), 6) == ["z", "", "sP", "z", "", "sP"]


def test_cadence_and_warmup_count_policy_steps():
    # warm-up 1, every 2: due at policy steps 2 and 4 (inner_steps before the step)
    assert run(BilevelSchedule(outer_every=2, warmup=1), 6) == ["P", "P", "zsP", "P", "zsP", "P"]
    assert run(BilevelSchedule(inner_accumulate=2, outer_every=2, warmup=1), 8) == ["", "P", "", "P", "z", "sP",
                                                                                  "", "P"]


def test_outer_accumulation_spans_due_policy_steps_and_a_skip_restarts_it():
    schedule = BilevelSchedule(outer_accumulate=2)
    assert run(schedule, 4) == ["zP", "sP", "zP", "sP"]
    schedule = BilevelSchedule(outer_accumulate=2)
    schedule.next(0, True)
    schedule.drop_partial_outer()  # the first batch was skipped: its head gradient is gone
    assert schedule.next(0, True).head_zero
    state = schedule.state_dict()
    restored = BilevelSchedule(outer_accumulate=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == state == {"batches_seen": 2, "outer_evals": 1}


def test_counts_must_be_positive():
    with pytest.raises(ValueError, match="outer_every_n_steps"):
        BilevelSchedule(outer_every=0)
