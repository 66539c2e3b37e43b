"""The weighted reduction and the per-trajectory objectives, against hand-derived values."""

import torch

from boost_lightning.objectives import (
    advantage_weighted,
    behaviour_cloning,
    filtered_bc,
    reward_weighted,
    weighted_loss,
)


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


def test_objectives_hand_values():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    reward = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(behaviour_cloning(nll, reward), nll)
    assert torch.equal(filtered_bc(nll, reward, 0.5), torch.tensor([0.0, 0.0, 3.0, 4.0]))
    # exp(β(R − max R)) with β = 1
    torch.testing.assert_close(reward_weighted(nll, reward), nll * torch.exp(reward - 3.0))
    # exp(β(R − mean R)) clipped at 2
    expected = nll * torch.exp(reward - 1.5).clamp(max=2.0)
    torch.testing.assert_close(advantage_weighted(nll, reward, max_weight=2.0), expected)
