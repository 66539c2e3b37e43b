"""The weighted reduction and the per-trajectory objectives, against hand-derived values."""

import math

import pytest
import torch

from boost_lightning.objectives import AWR, BC, RWR, TopReturnBC, build_objective, weighted_loss


def test_weighted_loss_hand_value():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0])
    # (1·1 + 0·2 + 2·3 + 1·4) / 4 = 11/4
    assert weighted_loss(losses, weights).item() == 2.75


def test_uniform_weights_are_plain_mean():
    losses = torch.rand(7)
    torch.testing.assert_close(weighted_loss(losses, torch.ones(7)), losses.mean())


def test_micro_batch_split_does_not_change_loss_or_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, generator=g, requires_grad=True)
    weights = torch.rand(8, generator=g)
    full = weighted_loss(x**2, weights)
    (grad_full,) = torch.autograd.grad(full, x)
    for size in (1, 2, 4):
        total = weights.sum()
        parts = [weighted_loss(x[i : i + size] ** 2, weights[i : i + size], total) for i in range(0, 8, size)]
        split = torch.stack(parts).sum()
        (grad_split,) = torch.autograd.grad(split, x)
        torch.testing.assert_close(split, full)
        torch.testing.assert_close(grad_split, grad_full)


def test_objective_multipliers_hand_values():
    reward = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(BC().multiplier(reward), torch.ones(4))
    assert torch.equal(TopReturnBC(0.5).multiplier(reward), torch.tensor([0.0, 0.0, 1.0, 1.0]))
    # exp(β(R − max R)), β = 1: 1 for the best row, e⁻³ for the worst
    rwr = RWR().multiplier(reward)
    assert rwr[3].item() == 1.0 and rwr[0].item() == pytest.approx(math.exp(-3.0))
    # exp(β(R − mean R)) clipped at 2: mean 1.5, so e^-1.5, e^-0.5, e^0.5 and e^1.5 clipped to 2
    awr = AWR(max_multiplier=2.0).multiplier(reward)
    torch.testing.assert_close(awr, torch.tensor([math.exp(-1.5), math.exp(-0.5), math.exp(0.5), 2.0]))


def test_objectives_multiply_the_nll_row_by_row():
    nll, reward = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(TopReturnBC(0.5)(nll, reward), torch.tensor([0.0, 0.0, 3.0, 4.0]))
    assert build_objective("bc").__class__ is BC
    with pytest.raises(ValueError, match="unknown objective 'reward_weighted'"):
        build_objective("reward_weighted")
