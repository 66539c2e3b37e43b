"""Each weighting pinned on a hand-made batch, through the one interface the module uses."""

import math

import pytest
import torch
from torch import Tensor

from boost_lightning.bilevel.hypergradient import Hypergradient
from boost_lightning.models import WeightHead
from boost_lightning.weightings import (
    L2RW,
    WEIGHTINGS,
    AdvantageSoftmax,
    Learned,
    RealOnly,
    ReturnFilter,
    ReturnSoftmax,
    SyntheticOnly,
    Uniform,
    Weighting,
    build_weighting,
)

# Columns: source (1 synthetic), reward, length, turns.
ROWS = torch.tensor([[0.0, 1.0, 10, 1], [0.0, 0.5, 20, 2], [1.0, 0.9, 30, 1],
                     [1.0, -1.0, 40, 3], [1.0, 0.2, 50, 2], [1.0, 0.8, 60, 1]])


def test_one_source_weightings_and_what_they_keep():
    assert torch.equal(Uniform()(ROWS), torch.ones(6))
    assert torch.equal(RealOnly()(ROWS), torch.tensor([1.0, 1, 0, 0, 0, 0]))
    assert torch.equal(SyntheticOnly()(ROWS), torch.tensor([0.0, 0, 1, 1, 1, 1]))
    assert (Uniform.keeps, RealOnly.keeps, SyntheticOnly.keeps) == ("all", "real", "synthetic")


def test_return_filter_keeps_real_rows_and_the_top_synthetic_fraction():
    # synthetic returns 0.9, -1.0, 0.2, 0.8: the top half is 0.9 and 0.8
    assert torch.equal(ReturnFilter(0.5)(ROWS), torch.tensor([1.0, 1, 1, 0, 0, 1]))
    assert torch.equal(ReturnFilter(0.25)(ROWS), torch.tensor([1.0, 1, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="fraction"):
        ReturnFilter(0.0)


def test_return_softmax_hand_values():
    w = ReturnSoftmax(temperature=0.5)(ROWS)
    # exp((R − max R)/T) with max R = 1: row 0 gets 1, row 1 exp(-1), row 3 exp(-4)
    assert w[0].item() == 1.0
    assert w[1].item() == pytest.approx(math.exp(-1.0))
    assert w[3].item() == pytest.approx(math.exp(-4.0))


def test_advantage_softmax_fits_its_baseline_and_keeps_it_in_buffers():
    rows = ROWS.clone()
    length, turns = rows[:, 2], rows[:, 3]
    # Returns that the baseline's design [1, log1p(length), turns] explains exactly: every advantage is ~0.
    rows[:, 1] = 0.5 + 0.25 * torch.log1p(length) - 0.1 * turns
    weighting = AdvantageSoftmax(temperature=0.5, ridge=1e-9)
    torch.testing.assert_close(weighting(rows), torch.ones(6), atol=1e-3, rtol=0)
    assert {n for n, _ in weighting.named_buffers()} == {"xtx", "xty"}  # checkpointed and rolled back
    assert weighting.xtx[0, 0].item() == 6.0  # one batch of 6 rows folded in
    weighting.scores(rows)  # predict-time scores do not fold the rows in again
    assert weighting.xtx[0, 0].item() == 6.0


def test_l2rw_clips_negative_alignment_and_normalises():
    def hypergradient(directional):
        return Hypergradient(-directional, torch.tensor(0.0), torch.tensor(1.0), directional)

    w = L2RW()(ROWS[:4], hypergradient(torch.tensor([2.0, -1.0, 1.0, 0.0])))
    torch.testing.assert_close(w, torch.tensor([8 / 3, 0.0, 4 / 3, 0.0]))
    assert torch.equal(L2RW()(ROWS[:2], hypergradient(torch.tensor([-1.0, -2.0]))), torch.zeros(2))
    assert L2RW.needs_hypergradient and not Uniform.needs_hypergradient


def test_only_the_learned_weighting_has_an_outer_level():
    assert Learned().learns
    for name, cls in WEIGHTINGS.items():
        if name != "learned":
            assert not cls().learns, name
            with pytest.raises(NotImplementedError):
                cls().outer_loss(ROWS, torch.zeros(6))


def test_short_names_and_objects_build_the_same_weighting():
    assert isinstance(build_weighting("return_filter"), ReturnFilter)
    custom = ReturnFilter(0.25)
    assert build_weighting(custom) is custom
    with pytest.raises(ValueError, match="unknown weighting 'filtered_bc'"):
        build_weighting("filtered_bc")
    assert all(issubclass(cls, Weighting) for cls in WEIGHTINGS.values())


def _score_gradient(score_update: str, reweight: str, scores: Tensor, g: Tensor, synthetic: Tensor,
                    monkeypatch) -> Tensor:
    """∂(outer surrogate)/∂scores of a Learned weighting whose head returns ``scores`` (T = 2, features: reward)."""
    head = WeightHead(features=["reward"], temperature=2.0, reweight=reweight)
    head.bind(4)
    weighting = Learned(head=head, score_update=score_update)
    leaf = scores.clone().requires_grad_(True)
    monkeypatch.setattr(head, "scores", lambda scalars, pooled=None: leaf)
    inputs = torch.stack([torch.zeros_like(scores), synthetic], dim=1)  # [reward, source]
    weighting.outer_loss(inputs, g).backward()
    return leaf.grad


@pytest.mark.parametrize("reweight", ["all", "synthetic"])
def test_score_updates_move_scores_by_the_centred_hypergradient_with_or_without_the_weight(reweight, monkeypatch):
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0])
    synthetic = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0.3, -0.2, 0.7, 0.1, -0.5])
    free = synthetic.bool() if reweight == "synthetic" else torch.ones(5, dtype=torch.bool)
    w = torch.ones(5)
    w[free] = torch.softmax(scores[free] / 2.0, 0) * int(free.sum())
    g_bar = (w[free] * g[free]).sum() / w[free].sum()
    # By hand: softmax weights, T = 2; the rows the head does not normalise (real rows under "synthetic") get none.
    expected_chain = torch.where(free, w * (g - g_bar) / 2.0, torch.zeros(5))
    expected_exponentiated = torch.where(free, (g - g_bar) / 2.0, torch.zeros(5))
    assert torch.allclose(_score_gradient("chain", reweight, scores, g, synthetic, monkeypatch), expected_chain,
                          atol=1e-6)
    assert torch.allclose(_score_gradient("exponentiated", reweight, scores, g, synthetic, monkeypatch),
                          expected_exponentiated, atol=1e-6)


def test_a_row_near_weight_zero_still_moves_under_the_exponentiated_update(monkeypatch):
    scores = torch.tensor([0.0, 0.0, 0.0, -40.0])  # row 3 weighs ~e^-20
    synthetic = torch.ones(4)
    g = torch.tensor([0.0, 0.0, 0.0, -1.0])  # ... and is the only row that would lower the validation loss
    chain = _score_gradient("chain", "all", scores, g, synthetic, monkeypatch)
    exponentiated = _score_gradient("exponentiated", "all", scores, g, synthetic, monkeypatch)
    assert abs(float(chain[3])) < 1e-8  # stuck: its weight scales its own gradient
    assert float(exponentiated[3]) == pytest.approx(-0.5, abs=1e-6)  # (g − ḡ_w)/T with ḡ_w ≈ 0: descent raises it


def test_score_update_is_validated():
    with pytest.raises(ValueError, match="score_update"):
        Learned(score_update="natural")
