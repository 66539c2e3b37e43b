"""The benchmark's oracle, the density-ratio and group baselines, and row selection before batching."""

import math

import pytest
import torch
from lightning.pytorch import Callback

from boost_lightning.bilevel.hypergradient import Hypergradient, unit_rms
from boost_lightning.models.policy import TrajectoryOutput
from boost_lightning.weightings import WEIGHTINGS, DensityRatio, Group, Oracle, ReturnFilter


def _hypergradient(directional):
    d = torch.tensor(directional, dtype=torch.float32)
    return Hypergradient(grad_weights=-d, val_loss=torch.tensor(1.0), v_norm=torch.tensor(1.0), directional=d)


def _out(n, pooled=None):
    pooled = torch.zeros(n, 1) if pooled is None else pooled
    return TrajectoryOutput(loss=torch.zeros(n), surprise=torch.zeros(n), pooled=pooled, correct=torch.zeros(n))


def test_new_baselines_are_registered_by_short_name():
    assert WEIGHTINGS["oracle"] is Oracle and WEIGHTINGS["density_ratio"] is DensityRatio
    assert WEIGHTINGS["group"] is Group


def test_oracle_keeps_real_rows_and_the_helpful_synthetic_rows():
    batch = {"is_synthetic": torch.tensor([0.0, 1, 1, 1]),
             "meta": [{"generator": "expert"}, {"helpful": True}, {"helpful": False}, {}]}
    oracle = Oracle()
    inputs = oracle.inputs(_out(4), batch)
    assert torch.equal(oracle(inputs), torch.tensor([1.0, 1, 0, 0]))
    rows = {"is_synthetic": [0, 1, 1, 1], "reward": [0.0] * 4, "meta": batch["meta"]}
    assert oracle.select(rows) == [True, True, False, False]
    assert Oracle(key="good").select({"is_synthetic": [1], "reward": [0.0], "meta": [{"good": 1}]}) == [True]


def test_oracle_with_generators_keeps_their_rows_whatever_their_label():
    meta = [{"generator": "expert"}, {"generator": "sim", "helpful": False}, {"generator": "noisy", "helpful": True},
            {"generator": "sim", "helpful": True}, {}]
    batch = {"is_synthetic": torch.tensor([0.0, 1, 1, 1, 1]), "meta": meta}
    oracle = Oracle(generators=["sim"])
    assert torch.equal(oracle(oracle.inputs(_out(5), batch)), torch.tensor([1.0, 1, 0, 1, 0]))
    rows = {"is_synthetic": [0, 1, 1, 1, 1], "reward": [0.0] * 5, "meta": meta}
    assert oracle.select(rows) == [True, True, False, True, False]
    # No generator kept: real rows only (not the label).
    assert Oracle(generators=[]).select(rows) == [True, False, False, False, False]


def test_return_filter_cuts_the_whole_pool_once_then_keeps_every_drawn_row_at_or_above_the_cut():
    rows = {"is_synthetic": [0, 1, 1, 1, 1], "reward": [5.0, 0.95, 0.2, 0.8, -1.0], "meta": [{}] * 5}
    weighting = ReturnFilter(0.5)
    assert weighting.select(rows) == [True, True, False, True, False]
    assert weighting.threshold.item() == pytest.approx(0.8)
    # A batch of kept rows only: all weigh 1 (per batch, the top half would have dropped one of them).
    batch = torch.tensor([[1.0, 0.95, 1, 1], [1.0, 0.8, 1, 1], [1.0, 0.8, 1, 1], [0.0, 5.0, 1, 1]])
    assert torch.equal(weighting(batch), torch.ones(4))
    assert "threshold" in weighting.state_dict()


def test_density_ratio_is_the_lda_log_odds_normalised_over_synthetic_rows_and_clipped():
    # One pooled feature: real rows at 2 and 4 (mean 3), synthetic at -1, 1, 0, 0 (mean 0).
    x = torch.tensor([[2.0], [4.0], [-1.0], [1.0], [0.0], [0.0]])
    synthetic = torch.tensor([0.0, 0, 1, 1, 1, 1])
    weighting = DensityRatio(max_weight=100.0, ridge=0.0)
    weighting.bind(1)
    inputs = weighting.inputs(_out(6, x), {"is_synthetic": synthetic})
    weights = weighting(inputs)
    # Pooled within-class variance: ((1 + 1) + (1 + 1 + 0 + 0)) / (6 - 2) = 1; β = (3 - 0) / 1 = 3,
    # bias = -(3 + 0) / 2 · 3 + log(2 / 4).
    beta, bias = 3.0, -4.5 + math.log(0.5)
    log_ratio = [beta * v + bias for v in (-1.0, 1.0, 0.0, 0.0)]
    ratio = torch.tensor([math.exp(z) for z in log_ratio])
    torch.testing.assert_close(weighting.log_ratio(inputs)[2:], torch.tensor(log_ratio), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights[2:], ratio / ratio.mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(weights[:2], torch.ones(2))
    clipped = DensityRatio(max_weight=2.0, ridge=0.0)
    clipped.bind(1)
    assert clipped(inputs)[2:].max().item() == 2.0
    assert {n for n, _ in weighting.named_buffers()} == {"count", "total", "outer"}


def test_density_ratio_is_uniform_until_it_has_seen_both_sources():
    weighting = DensityRatio()
    weighting.bind(2)
    inputs = torch.tensor([[1.0, 0.5, 0.1], [1.0, -0.2, 0.3]])
    assert torch.equal(weighting(inputs), torch.ones(2))


def test_group_moves_each_groups_log_weight_by_its_mean_scaled_alignment():
    batch = {"is_synthetic": torch.tensor([0.0, 1, 1, 1]),
             "meta": [{}, {"generator": "a"}, {"generator": "a"}, {"generator": "b"}]}
    group = Group(lr=0.5, max_log_weight=10.0)
    inputs = group.inputs(_out(4), batch)
    directional = [1.0, 2.0, 0.0, -3.0]
    weights = group(inputs, _hypergradient(directional))
    a = unit_rms(torch.tensor(directional, dtype=torch.float64))
    expected = {"real": 0.5 * a[0], "a": 0.5 * (a[1] + a[2]) / 2, "b": 0.5 * a[3]}
    assert group.group_weights == pytest.approx({k: math.exp(v) for k, v in expected.items()})
    raw = torch.tensor([math.exp(expected[k]) for k in ("real", "a", "a", "b")])
    torch.testing.assert_close(weights, (raw / raw.mean()).float())
    with pytest.raises(ValueError, match="hypergradient"):
        group(inputs)


def test_group_slots_follow_the_gathered_batch_not_the_ranks_own_order():
    # Two ranks see their rows in another order; both fold the same gathered table and agree on every weight.
    rows = {"is_synthetic": torch.tensor([1.0, 1, 0]), "meta": [{"generator": "x"}, {"generator": "y"}, {}]}
    first, second = Group(), Group()
    second.inputs(_out(3), {"is_synthetic": rows["is_synthetic"].flip(0), "meta": rows["meta"][::-1]})
    table = first.inputs(_out(3), rows)
    g = _hypergradient([1.0, -1.0, 0.5])
    assert torch.equal(first(table, g), second(table, g))
    restored = Group()
    restored.load_state_dict(first.state_dict())
    assert restored.group_weights == first.group_weights


def test_group_log_weights_are_bounded():
    group = Group(lr=10.0, max_log_weight=1.0)
    inputs = group.inputs(_out(2), {"is_synthetic": torch.tensor([1.0, 1]), "meta": [{"generator": "a"}, {}]})
    group(inputs, _hypergradient([1.0, -1.0]))
    assert group.log_weights.abs().max().item() == 1.0


def test_a_selecting_weighting_trains_on_full_batches_of_the_rows_it_keeps(make_module, fit_module, make_row,
                                                                           write_jsonl, tiny_tokenizer, tmp_path):
    from boost_lightning.data.datamodule import BoostDataModule

    real = write_jsonl("real.jsonl", [make_row(i, source="real") for i in range(2)])
    synthetic = write_jsonl("synthetic.jsonl", [make_row(100 + i, meta={"helpful": i % 4 == 0}) for i in range(24)])
    validation = write_jsonl("validation.jsonl", [make_row(200 + i, source="real") for i in range(4)])
    seen = []

    class Rows(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            inner = batch["inner"]
            seen.append([bool(s == 0 or m.get("helpful")) for s, m in zip(inner["is_synthetic"].tolist(),
                                                                          inner["meta"])])

    dm = BoostDataModule(real=real, synthetic=synthetic, validation=validation, tokenizer=tiny_tokenizer,
                         batch_size=4, validation_batch_size=4, max_length=128, cache_dir=str(tmp_path / "cache"))
    module = make_module("oracle", max_inner_steps=3)
    fit_module(module, dm, callbacks=[Rows()], max_epochs=5)
    assert len(seen) == 3 and all(len(s) == 4 and all(s) for s in seen)
    assert {k: len(v) for k, v in dm._kept.items()} == {"real": 2, "synthetic": 6}


def test_a_weighting_that_keeps_nothing_is_an_error_before_training(make_row, write_jsonl, tiny_tokenizer, tmp_path):
    from boost_lightning.data.datamodule import BoostDataModule

    dm = BoostDataModule(synthetic=write_jsonl("s.jsonl", [make_row(i) for i in range(4)]),
                         validation=write_jsonl("v.jsonl", [make_row(9, source="real")]), tokenizer=tiny_tokenizer,
                         max_length=128, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    with pytest.raises(ValueError, match="keeps no training row"):
        dm.keep_rows(Oracle().select)


@pytest.mark.parametrize("name", ["density_ratio", "group", "oracle"])
def test_each_new_baseline_trains_the_policy_through_the_module(name, make_module, fit_module, make_items):
    module = make_module(name, max_inner_steps=2)
    before = {n: p.detach().clone() for n, p in module.policy.trainable_named_parameters().items()}
    fit_module(module, make_items(steps=2))
    assert module.inner_steps == 2 and not module.weighting.learns
    after = module.policy.trainable_named_parameters()
    assert any(not torch.equal(before[n], after[n]) for n in before), "policy parameters changed"
