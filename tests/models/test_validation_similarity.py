"""The head's ``val_similarity`` feature: cosine of a row's pooled state to the running validation centroid."""

from __future__ import annotations

import math

import pytest
import torch

from boost_lightning.bench.batches import random_batch
from boost_lightning.bilevel import HypergradientOptions
from boost_lightning.bilevel.policy import policy_hypergradient
from boost_lightning.models import WeightHead
from boost_lightning.models.features import ALL_FEATURES
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings import Learned


def test_centroid_and_cosine_by_hand():
    head = WeightHead(features=["loss", "val_similarity"], hidden_size=2, validation_momentum=0.5)
    pooled = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(head.validation_similarity(pooled), torch.zeros(3))  # before the first outer step
    head.observe_validation(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))  # the first batch sets the centroid: (2, 0)
    torch.testing.assert_close(head.val_centroid, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(head.validation_similarity(pooled), torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]))
    head.observe_validation(torch.tensor([[0.0, 4.0]]))  # then a moving average: 0.5·(2, 0) + 0.5·(0, 4)
    torch.testing.assert_close(head.val_centroid, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(head.validation_similarity(pooled)[1], torch.tensor(2 / math.sqrt(5)))
    assert "val_similarity" in ALL_FEATURES and "val_similarity" not in WeightHead().features  # opt-in
    assert {"val_centroid", "val_seen"} <= set(head.state_dict())  # checkpointed with the head
    with pytest.raises(ValueError, match="validation_momentum"):
        WeightHead(validation_momentum=0.0)


def test_learned_inputs_carry_the_similarity_column():
    weighting = Learned(WeightHead(features=["loss", "val_similarity"], hidden_size=2))
    weighting.observe_validation(torch.tensor([[0.0, 1.0]]))
    out = TrajectoryOutput(loss=torch.tensor([0.5, 0.7]), surprise=torch.zeros(2),
                           pooled=torch.tensor([[0.0, 2.0], [-1.0, 0.0]]), correct=torch.zeros(2))
    inputs = weighting.inputs(out, {"is_synthetic": torch.tensor([0.0, 1.0])})
    # [loss, val_similarity, source flag]
    torch.testing.assert_close(inputs, torch.tensor([[0.5, 1.0, 0.0], [0.7, 0.0, 1.0]]))


def test_hypergradient_returns_the_validation_rows_pooled_states(tiny_policy, tiny_llama_config):
    inner, outer = (random_batch(tiny_llama_config["vocab_size"], 3, seed=s) for s in (0, 1))
    optimizer = torch.optim.SGD(tiny_policy.trainable_named_parameters().values(), lr=0.1)
    hypergrad = policy_hypergradient(tiny_policy, inner, outer, HypergradientOptions(preconditioner="none"), optimizer,
                                     torch.ones(3))
    with torch.no_grad():
        expected = tiny_policy.trajectory_forward(outer).pooled
    torch.testing.assert_close(hypergrad.val_pooled, expected)


def test_outer_steps_feed_the_centroid_and_the_head_trains_on_the_feature(make_module, fit_module, make_items):
    head = WeightHead(features=["hidden", "loss", "val_similarity"], seed=0)
    module = make_module(Learned(head))
    seen = []

    original = module.weighting.inputs  # a spy: the feature column of every step's inputs

    def spy(out, batch):
        result = original(out, batch)
        seen.append(result[:, head.scalar_names.index("val_similarity")].clone())
        return result

    module.weighting.inputs = spy
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    fit_module(module, make_items(steps=3, batch_size=4))
    assert bool(head.val_seen) and head.val_centroid.abs().sum() > 0
    assert torch.equal(seen[0], torch.zeros(4))  # step 1's weights come before any outer step
    assert all(((s > -1 - 1e-5) & (s < 1 + 1e-5)).all() for s in seen) and seen[-1].abs().sum() > 0
    assert any(not torch.equal(p, before[n]) for n, p in head.named_parameters())
