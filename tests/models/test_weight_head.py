"""WeightHead: uniform at init, mean-1 normalisations, clip, regularisers, feature switches."""

import math

import pytest
import torch

from boost_lightning.models import WeightHead, effective_sample_size, ess_floor
from boost_lightning.models.features import DEFAULT_FEATURES


def features(batch=8, seed=0, hidden=16):
    g = torch.Generator().manual_seed(seed)
    scalars = len([name for name in DEFAULT_FEATURES if name != "hidden"])  # the default head's scalar inputs
    return torch.randn(batch, scalars, generator=g), torch.randn(batch, hidden, generator=g)


@pytest.mark.parametrize("reweight", ["all", "synthetic"])
@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_zero_init_gives_exactly_uniform_weights(normalization, reweight):
    head = WeightHead(hidden_size=16, normalization=normalization, reweight=reweight)
    scalars, pooled = features()
    head.observe(scalars)
    assert torch.equal(head(scalars, pooled, torch.tensor([0, 1] * 4)), torch.ones(8))


# Scores chosen so that exp / sigmoid come out as small fractions: the expected weights are worked out by hand.
LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


@pytest.mark.parametrize(("normalization", "temperature", "scores", "expected"), [
    # exp(s) = 1, 2, 5 (sum 8): 3 * (1/8, 2/8, 5/8)
    ("softmax", 1.0, [0.0, LN2, LN5], [0.375, 0.75, 1.875]),
    # s / T = 0, ln 3: exp = 1, 3 (sum 4): 2 * (1/4, 3/4)
    ("softmax", 2.0, [0.0, 2 * LN3], [0.5, 1.5]),
    # sigmoid(-ln 3, 0, ln 3) = 1/4, 1/2, 3/4 (mean 1/2)
    ("sigmoid", 1.0, [-LN3, 0.0, LN3], [0.5, 1.0, 1.5]),
    ("sigmoid", 0.5, [-LN3 / 2, 0.0, LN3 / 2], [0.5, 1.0, 1.5]),
])
def test_normalised_weights_match_hand_computed_values(normalization, temperature, scores, expected):
    head = WeightHead(hidden_size=16, normalization=normalization, temperature=temperature)
    torch.testing.assert_close(head.normalize(torch.tensor(scores)), torch.tensor(expected))


@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_weights_have_mean_one_and_keep_the_order_of_the_scores(normalization):
    head = WeightHead(hidden_size=16, normalization=normalization, temperature=0.5)
    scores = torch.randn(16, generator=torch.Generator().manual_seed(3))
    w = head.normalize(scores)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.equal(torch.argsort(w), torch.argsort(scores))
    assert (w > 0).all()


@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_a_higher_temperature_flattens_the_weights_toward_uniform(normalization):
    scores = torch.tensor([0.0, 5.0, -3.0, 8.0])

    def weights(temperature):
        return WeightHead(hidden_size=16, normalization=normalization, temperature=temperature).normalize(scores)

    spread = [float(weights(t).max() - weights(t).min()) for t in (0.5, 1.0, 10.0, 100.0)]
    assert spread[0] > 1.0 and all(a > b for a, b in zip(spread, spread[1:])), spread
    torch.testing.assert_close(weights(1e6), torch.ones(4), atol=1e-5, rtol=0)


def test_clip_that_does_not_bind_leaves_the_weights_unchanged():
    head = WeightHead(hidden_size=16, clip=2.0)
    torch.testing.assert_close(head.normalize(torch.tensor([0.0, LN2, LN5])), torch.tensor([0.375, 0.75, 1.875]))


def test_clip_bounds_the_largest_weight_after_renormalising():
    head = WeightHead(hidden_size=16, clip=2.0)
    # Unclipped: exp = 6, 1, 1 (sum 8) → 3 * (6/8, 1/8, 1/8) = 2.25, 0.375, 0.375. Capped at 2, the remaining mass
    # of 1 goes to the other two rows in their original proportion (equal): 0.5 each.
    w = head.normalize(torch.tensor([math.log(6), 0.0, 0.0]))
    assert w.max() <= 2.0 + 1e-6
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 0.5]))


def test_reweight_synthetic_keeps_real_rows_at_one_and_normalises_the_synthetic_ones_among_themselves():
    head = WeightHead(hidden_size=16, reweight="synthetic")
    # Real rows get large scores on purpose: they must be ignored. Synthetic scores 0, ln 2, ln 5 as above.
    scores = torch.tensor([5.0, 0.0, LN2, LN5, 9.0], requires_grad=True)
    synthetic = torch.tensor([0, 1, 1, 1, 0])
    w = head.normalize(scores, synthetic)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 0.375, 0.75, 1.875, 1.0]))
    # The head's gradient flows through the synthetic rows only.
    (w * torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0])).sum().backward()
    assert scores.grad[[0, 4]].abs().sum() == 0 and scores.grad[1:4].abs().sum() > 0
    assert torch.equal(head.normalize(torch.randn(3), torch.zeros(3)), torch.ones(3))
    with pytest.raises(ValueError, match="is_synthetic"):
        head.normalize(torch.randn(3))
    with pytest.raises(ValueError, match="reweight"):
        WeightHead(reweight="real")


def test_ess_floor_mixes_with_uniform_just_enough_by_hand():
    # Σw² = 7 for B = 4 (ESS 16/7 ≈ 0.57·B). A floor of 0.75·B allows Σw² ≤ 16/3:
    # (1 − λ)² = (16/3 − 4) / (7 − 4) = 4/9, λ = 1/3, w' = (2/3)w + 1/3.
    w = torch.tensor([2.5, 0.5, 0.5, 0.5])
    floored = ess_floor(w, 0.75)
    torch.testing.assert_close(floored, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
    assert effective_sample_size(floored).item() == pytest.approx(3.0)
    assert ess_floor(w, 0.5) is w  # already above the floor: untouched
    torch.testing.assert_close(ess_floor(w, 1.0), torch.ones(4))
    # Differentiable through the mixing coefficient too (it depends on the weights).
    x = torch.tensor([2.5, 0.7, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ess_floor(v, 0.9), (x,))


@pytest.mark.parametrize("reweight", ["all", "synthetic"])
def test_min_ess_holds_the_floor_on_the_rows_the_head_normalises(reweight):
    scores = torch.tensor([4.0, 0.0, 3.0, -1.0, 0.5, 2.0])
    synthetic = torch.tensor([0, 1, 1, 1, 1, 1])
    free = WeightHead(hidden_size=16, reweight=reweight).normalize(scores, synthetic)
    floored = WeightHead(hidden_size=16, reweight=reweight, min_ess=0.8).normalize(scores, synthetic)
    rows = slice(None) if reweight == "all" else slice(1, None)
    n = floored[rows].shape[0]
    assert effective_sample_size(free[rows]).item() < 0.8 * n
    assert effective_sample_size(floored[rows]).item() == pytest.approx(0.8 * n, rel=1e-5)
    assert floored[rows].mean().item() == pytest.approx(1.0)
    # The order of the rows is kept; only the spread shrinks.
    assert torch.equal(floored[rows].argsort(), free[rows].argsort())
    if reweight == "synthetic":
        assert floored[0].item() == 1.0
    with pytest.raises(ValueError, match="min_ess"):
        WeightHead(min_ess=1.5)


def test_ess_and_entropy_regularisers_vanish_at_uniform_and_grow_with_concentration():
    for reg in ("ess", "entropy"):
        head = WeightHead(hidden_size=16, regularizer=reg, regularizer_strength=2.0)
        assert head.regularization(torch.ones(4)).abs() < 1e-6
        peaked = head.regularization(torch.tensor([3.7, 0.1, 0.1, 0.1]))
        assert 0 < peaked <= 2.0
    assert effective_sample_size(torch.ones(5)) == pytest.approx(5.0)
    assert effective_sample_size(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_feature_switches_and_validation():
    head = WeightHead(features=["loss", "reward"])
    assert head.scalar_names == ("loss", "reward") and not head.uses_hidden
    assert head(torch.randn(3, 2)).shape == (3,)
    with pytest.raises(ValueError, match="unknown head features"):
        WeightHead(features=["quality"])
    with pytest.raises(ValueError, match="normalization"):
        WeightHead(normalization="relu")


def test_running_norm_makes_scores_independent_of_batch_split():
    head = WeightHead(hidden_size=16)
    torch.nn.init.normal_(head.mlp[-1].weight)
    scalars, pooled = features(batch=8)
    head.observe(scalars)
    full = head.scores(scalars, pooled)
    parts = torch.cat([head.scores(scalars[:3], pooled[:3]), head.scores(scalars[3:], pooled[3:])])
    torch.testing.assert_close(full, parts)
