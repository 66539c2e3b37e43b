"""Each baseline weighting pinned on a hand-made batch."""

import pytest
import torch

from boost_lightning.baselines import RunningBaseline, fixed_weights, l2rw_weights

SYN = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
REWARD = torch.tensor([1.0, 0.5, 0.9, -1.0, 0.2, 0.8])


def test_uniform_real_only_synthetic_only():
    assert torch.equal(fixed_weights("uniform", SYN, REWARD), torch.ones(6))
    assert torch.equal(fixed_weights("real_only", SYN, REWARD), torch.tensor([1.0, 1, 0, 0, 0, 0]))
    assert torch.equal(fixed_weights("synthetic_only", SYN, REWARD), torch.tensor([0.0, 0, 1, 1, 1, 1]))


def test_filtered_bc_keeps_real_and_top_synthetic():
    # synthetic rewards 0.9, -1.0, 0.2, 0.8: top half = 0.9 and 0.8
    assert torch.equal(fixed_weights("filtered_bc", SYN, REWARD, filter_fraction=0.5),
                       torch.tensor([1.0, 1, 1, 0, 0, 1]))


def test_return_weighted_is_softmax_of_return_over_alpha_up_to_a_constant():
    w = fixed_weights("return_weighted", SYN, REWARD, temperature=0.1)
    expected = torch.softmax(REWARD / 0.1, 0)
    torch.testing.assert_close(w / w.sum(), expected)
    assert w.max() == 1.0


def test_advantage_weighted_uses_baseline():
    baseline = torch.tensor([1.0, 0.5, 0.9, -1.0, 0.2, 0.8])
    w = fixed_weights("advantage_weighted", SYN, REWARD, temperature=0.5, baseline=baseline)
    assert torch.equal(w, torch.ones(6))  # zero advantage everywhere ⇒ uniform


def test_l2rw_clips_negative_alignment_and_normalises():
    w = l2rw_weights(torch.tensor([2.0, -1.0, 1.0, 0.0]))
    torch.testing.assert_close(w, torch.tensor([8 / 3, 0.0, 4 / 3, 0.0]))
    assert torch.equal(l2rw_weights(torch.tensor([-1.0, -2.0])), torch.zeros(2))


def test_running_baseline_recovers_a_linear_return():
    fit = RunningBaseline(ridge=1e-9)
    length = torch.tensor([10.0, 20.0, 40.0, 80.0])
    turns = torch.tensor([1.0, 2.0, 5.0, 3.0])
    reward = 0.5 + 0.25 * torch.log1p(length) - 0.1 * turns
    pred = fit.update_and_predict(reward, length, turns)
    torch.testing.assert_close(pred, reward, atol=1e-4, rtol=0)


def test_unknown_weighting():
    with pytest.raises(ValueError, match="unknown weighting"):
        fixed_weights("oracle", SYN, REWARD)
