"""WeightHead: uniform at init, mean-1 normalisations, clip, regularisers, feature switches."""

import pytest
import torch

from boost_lightning.models import WeightHead, effective_sample_size
from boost_lightning.models.features import SCALAR_FEATURES


def features(batch=8, seed=0, hidden=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, len(SCALAR_FEATURES), generator=g), torch.randn(batch, hidden, generator=g)


@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_zero_init_gives_exactly_uniform_weights(normalization):
    head = WeightHead(hidden_size=16, normalization=normalization)
    scalars, pooled = features()
    head.observe(scalars)
    assert torch.equal(head(scalars, pooled), torch.ones(8))


@pytest.mark.parametrize("normalization", ["softmax", "sigmoid"])
def test_weights_have_mean_one_and_follow_scores(normalization):
    head = WeightHead(hidden_size=16, normalization=normalization, temperature=0.5)
    scores = torch.tensor([0.0, 1.0, -1.0, 2.0])
    w = head.normalize(scores)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.equal(torch.argsort(w), torch.argsort(scores))
    if normalization == "softmax":
        expected = 4 * torch.softmax(scores / 0.5, 0)
    else:
        s = torch.sigmoid(scores / 0.5)
        expected = s / s.mean()
    torch.testing.assert_close(w, expected)


def test_clip_bounds_weights_before_renormalising():
    head = WeightHead(hidden_size=16, clip=2.0)
    w = head.normalize(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    # The clip applies to the mean-1 weights, which are then renormalised once (documented in WeightHead).
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    raw = 4 * torch.softmax(torch.tensor([10.0, 0.0, 0.0, 0.0]), 0)
    clipped = raw.clamp(max=2.0)
    torch.testing.assert_close(w, clipped / clipped.mean())


def test_reweight_synthetic_keeps_real_rows_at_one_and_normalises_the_synthetic_ones_among_themselves():
    head = WeightHead(hidden_size=16, reweight="synthetic")
    scores = torch.tensor([5.0, 1.0, 0.0, -1.0, 9.0], requires_grad=True)
    synthetic = torch.tensor([0, 1, 1, 1, 0])
    w = head.normalize(scores, synthetic)
    # Hand values: real rows 1; synthetic rows 3·softmax([1, 0, -1]).
    e = torch.exp(torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(w.detach(), torch.cat([torch.ones(1), 3 * e / e.sum(), torch.ones(1)]))
    torch.testing.assert_close(w.mean().detach(), torch.tensor(1.0))
    # The head's gradient flows through the synthetic rows only.
    (w * torch.tensor([1.0, 2.0, -1.0, 0.5, 1.0])).sum().backward()
    assert scores.grad[[0, 4]].abs().sum() == 0 and scores.grad[1:4].abs().sum() > 0
    assert torch.equal(head.normalize(torch.randn(3), torch.zeros(3)), torch.ones(3))
    with pytest.raises(ValueError, match="is_synthetic"):
        head.normalize(torch.randn(3))
    with pytest.raises(ValueError, match="reweight"):
        WeightHead(reweight="real")


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
