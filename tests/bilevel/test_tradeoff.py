import math

import pytest
import torch

from boost_lightning.bilevel.tradeoff import tradeoff, weighted_mmd


def test_mmd_matches_hand_value_in_one_dimension():
    # real {0}, synthetic {+1, -1} with equal weight, σ = 1: k(0, ±1) = e^{-1/2}, k(1, -1) = e^{-2}.
    real = torch.tensor([[0.0]])
    synthetic = torch.tensor([[1.0], [-1.0]])
    expected = 0.25 * (2 + 2 * math.exp(-2)) - 2 * math.exp(-0.5) + 1.0
    got = weighted_mmd(real, synthetic, torch.tensor([1.0, 1.0]), bandwidth=1.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_mmd_is_zero_when_the_weight_sits_on_the_real_point_and_ignores_weight_scale():
    real = torch.tensor([[0.0, 1.0]])
    synthetic = torch.tensor([[0.0, 1.0], [5.0, 5.0]])
    assert weighted_mmd(real, synthetic, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-7)
    a = weighted_mmd(real, synthetic, torch.tensor([1.0, 3.0]))
    b = weighted_mmd(real, synthetic, torch.tensor([10.0, 30.0]))
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and a.item() > 0


def test_moving_weight_towards_real_like_rows_lowers_the_shift():
    torch.manual_seed(0)
    real = torch.randn(8, 4)
    near, far = real + 0.05 * torch.randn(8, 4), real + 3.0
    synthetic = torch.cat([near, far])
    toward_near = weighted_mmd(real, synthetic, torch.cat([torch.full((8,), 2.0), torch.full((8,), 0.5)]))
    uniform = weighted_mmd(real, synthetic, torch.ones(16))
    toward_far = weighted_mmd(real, synthetic, torch.cat([torch.full((8,), 0.5), torch.full((8,), 2.0)]))
    assert toward_near < uniform < toward_far


def test_tradeoff_risk_and_ess_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    weights = torch.tensor([2.0, 1.0, 1.0, 0.0])
    features = torch.randn(4, 3)
    out = tradeoff(losses, weights, features, torch.tensor([0, 1, 1, 1]))
    assert out.weighted_risk.item() == pytest.approx((2 + 2 + 3) / 4)
    assert out.ess.item() == pytest.approx(16 / 6)
    assert torch.isfinite(out.task_shift)
    assert torch.isnan(tradeoff(losses, weights, features, torch.ones(4)).task_shift)


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal d"):
        weighted_mmd(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        weighted_mmd(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
