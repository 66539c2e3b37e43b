"""The per-generator alignment diagnostic: snapshots, the forward difference it shares with the hypergradient, and
its table."""

import math

import pytest
import torch

from boost_lightning.bench.alignment import REAL, Snapshot, group_means, markdown
from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import HypergradientOptions, policy_hypergradient, row_alignment
from boost_lightning.bilevel.preconditioner import adam_preconditioner


def _train_one_step(policy, batch):
    params = list(policy.trainable_named_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    policy.functional_losses(batch, policy.trainable_named_parameters()).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("preconditioner", ["none", "adam"])
def test_alignment_at_a_snapshot_is_the_first_order_hypergradients_directional_derivative(tiny_policy,
                                                                                         preconditioner):
    policy = tiny_policy.eval()
    inner, outer = random_batch(policy.vocab_size, 5, seed=0), random_batch(policy.vocab_size, 3, seed=1)
    optimizer = _train_one_step(policy, inner)
    options = HypergradientOptions(preconditioner=preconditioner)
    expected = policy_hypergradient(policy, inner, outer, options, optimizer, torch.ones(5)).directional
    snapshot = Snapshot(policy.trainable_named_parameters(), optimizer if preconditioner == "adam" else None)
    direction = snapshot.direction(policy, [outer])
    torch.testing.assert_close(row_alignment(policy, snapshot.params, direction, [inner]).float(), expected,
                               rtol=1e-4, atol=1e-4)


def test_a_snapshot_copies_the_parameters_and_the_adam_preconditioner(tiny_policy):
    policy = tiny_policy.eval()
    batch = random_batch(policy.vocab_size, 4, seed=0)
    optimizer = _train_one_step(policy, batch)
    live = policy.trainable_named_parameters()
    snapshot = Snapshot(live, optimizer)
    v = [torch.randn_like(p) for p in live.values()]
    expected = adam_preconditioner(optimizer, list(live.values()))(v)
    got = snapshot.precondition(v)
    assert all(torch.allclose(a, b) for a, b in zip(got, expected))
    before = {n: p.clone() for n, p in snapshot.params.items()}
    # The live policy and its Adam moments move on; the snapshot and its preconditioner do not.
    policy.functional_losses(batch, live).mean().backward()
    optimizer.step()
    assert all(torch.equal(snapshot.params[n], before[n]) for n in before)
    assert any(not torch.equal(live[n], before[n]) for n in before)
    assert all(torch.allclose(a, b) for a, b in zip(snapshot.precondition(v), expected))
    assert Snapshot(live, None).precondition is None  # no Adam state: P = I


def test_table_means_per_group_and_rank_correlation_with_utility():
    groups = [REAL, "a", "a", "b", "c"]
    result = {"groups": groups, "alignment": {"10": [5.0, 1.0, 3.0, 0.0, -1.0], "10@20": [0, 1, 1, 2, 3],
                                              "20": [1.0, 2.0, 2.0, 1.0, 0.0]}}
    assert group_means(result["alignment"]["10"], groups) == {REAL: 5.0, "a": 2.0, "b": 0.0, "c": -1.0}
    table = markdown(result, {"a": 30.0, "b": 10.0, "c": -5.0})
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:6]] == [REAL, "a", "b", "c"]  # real, then by utility
    # step 10 ranks a > b > c as utility does (+1); step 10 vs v@20 reverses it (−1); step 20: a > b > c (+1).
    assert lines[-1].split("|")[3:6] == [" +1.00 ", " -1.00 ", " +1.00 "]


@pytest.mark.slow
def test_the_command_trains_a_quick_run_and_measures_every_snapshot(tmp_path, capsys):
    import json

    from boost_lightning.bench.alignment import main

    result = main(["--task", "guess_number", "--method", "uniform", "--preset", "quick", "--snapshots", "5,10,999",
                   "--rows-per-generator", "2", "--out", str(tmp_path), "--override=--model.max_inner_steps=10"])
    assert result["steps"] == [5, 10]  # 999 lies past the budget
    assert set(result["alignment"]) == {"5", "10", "5@10"}
    groups = result["groups"]
    assert groups.count(REAL) == 16 and all(groups.count(g) <= 2 for g in set(groups) - {REAL})
    assert all(len(v) == len(groups) and all(math.isfinite(x) for x in v) for v in result["alignment"].values())
    assert json.loads((tmp_path / "alignment-guess_number-uniform-s0.json").read_text()) == result
    assert "| real |" in capsys.readouterr().out
