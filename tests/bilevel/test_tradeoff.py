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
    assert torch.isnan(tradeoff(losses, weights, features, torch.ones(4)).task_shift)


def test_task_shift_grows_with_a_shifted_synthetic_cloud_and_with_the_weight_on_it():
    real = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    flags = torch.tensor([0] * 6 + [1] * 6)
    losses = torch.ones(12)

    def shift(synthetic, synthetic_weights):
        weights = torch.cat([torch.ones(6), synthetic_weights])
        return tradeoff(losses, weights, torch.cat([real, synthetic]), flags).task_shift.item()

    assert shift(real.clone(), torch.ones(6)) == pytest.approx(0.0, abs=1e-6)
    # Half of the synthetic rows copy real ones, the other half sit 4 units away in every coordinate.
    half_shifted = torch.cat([real[:3], real[3:] + 4.0])
    uniform = shift(half_shifted, torch.ones(6))
    assert uniform > 0.05
    toward_shifted = shift(half_shifted, torch.tensor([0.5, 0.5, 0.5, 2.0, 2.0, 2.0]))
    toward_copies = shift(half_shifted, torch.tensor([2.0, 2.0, 2.0, 0.5, 0.5, 0.5]))
    assert toward_copies < uniform < toward_shifted


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal d"):
        weighted_mmd(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        weighted_mmd(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
