"""``source_sampling="weights"``: the head's weight mass per source sets the share of real rows in each inner batch
(resampling), and importance factors keep the batch's expected loss that of the natural mix.

Pinned here: batch composition (padding, row order), the share and factors by hand, the real share following a head
that prefers real rows, both levels still training, resume == uninterrupted, and the errors of impossible setups.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from test_resume import StopAt, assert_same, fit, llama_config, state, write_splits

from boost_lightning.bench.batches import random_batch
from boost_lightning.data import BoostDataModule, concat_batches, take_rows
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule
from boost_lightning.preemption import PreemptionCheckpoint
from boost_lightning.weightings import Learned


def test_concatenated_batches_keep_every_row_and_its_losses(tiny_policy):
    policy = tiny_policy.eval()
    narrow = random_batch(policy.vocab_size, 3, seq_len=12, seed=0)
    wide = random_batch(policy.vocab_size, 2, seq_len=20, seed=1)
    both = concat_batches([take_rows(narrow, 0, 2), wide])
    assert both["input_ids"].shape == (4, 20)
    assert both["row_id"].tolist() == [0, 1, 0, 1] and both["task_id"] == ["t0", "t1", "t0", "t1"]
    # The widened rows are padded as the collator pads: no attention, no label, no observation, turn -1 there.
    assert both["attention_mask"][:2, 12:].eq(0).all() and both["labels"][:2, 12:].eq(-100).all()
    assert not both["obs_mask"][:2, 12:].any() and both["turn_ids"][:2, 12:].eq(-1).all()
    with torch.no_grad():
        joined = policy.trajectory_forward(both)
        apart = [policy.trajectory_forward(take_rows(narrow, 0, 2)), policy.trajectory_forward(wide)]
    torch.testing.assert_close(joined.loss, torch.cat([o.loss for o in apart]), rtol=0, atol=1e-5)
    torch.testing.assert_close(joined.surprise, torch.cat([o.surprise for o in apart]), rtol=0, atol=1e-5)
    # A part without rows adds none.
    assert concat_batches([take_rows(narrow, 0, 0), wide])["input_ids"].shape == (2, 20)


def test_real_share_and_importance_factors_by_hand():
    learned = Learned(WeightHead(features=("source",), num_layers=1, seed=0))
    learned.bind(0)
    assert learned.real_share(0.01) == 0.01  # nothing seen yet: the natural share
    learned.source_log_mass.copy_(torch.tensor([math.log(10.0), 0.0]))
    learned.source_seen.fill_(True)
    # p = π·m_r / (π·m_r + (1 − π)·m_s) with m_r = 10, m_s = 1.
    assert learned.real_share(0.01) == pytest.approx(0.1 / (0.1 + 0.99))

    # A batch of 1 real and 3 synthetic rows at head scores s: w ∝ exp(s)·π_s/p_s, mean 1.
    with torch.no_grad():
        learned.head.mlp[-1].weight.fill_(-1.0)  # the normalised source column: real rows score higher
    inputs = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # [source feature, source flag]
    learned.head.observe(inputs[:, :1])
    scores = learned.scores(inputs)
    share, natural = 0.25, 0.01
    learned.importance = torch.tensor([natural / share, (1 - natural) / (1 - share)])
    factor = torch.tensor([natural / share] + [(1 - natural) / (1 - share)] * 3)
    expected = torch.exp(scores) * factor
    expected = 4 * expected / expected.sum()
    torch.testing.assert_close(learned(inputs), expected, rtol=1e-6, atol=1e-6)
    # The head's surrogate sees the same corrected weights.
    g = torch.tensor([0.3, -0.1, 0.2, 0.5])
    torch.testing.assert_close(learned.outer_loss(inputs, g), (g * expected).sum(), rtol=1e-6, atol=1e-6)


def test_running_mass_is_each_sources_log_mean_unnormalised_weight():
    learned = Learned(WeightHead(features=("reward",), num_layers=1, seed=0), source_momentum=0.5)
    learned.bind(0)
    with torch.no_grad():
        learned.head.mlp[-1].weight.fill_(1.0)
    inputs = torch.tensor([[1.0, 0.0], [3.0, 1.0], [5.0, 1.0]])  # [reward, source flag]
    assert not learned.source_seen.any()
    learned(inputs)  # the natural mix (no importance factors): no per-source mass to keep
    assert not learned.source_seen.any() and torch.equal(learned.source_log_mass, torch.zeros(2))
    learned.importance = torch.ones(2)  # a composed batch drawn at the natural share
    learned(inputs)
    scores = learned.scores(inputs).double()
    first = [scores[0], torch.logsumexp(scores[1:], 0) - math.log(2)]
    torch.testing.assert_close(learned.source_log_mass.double(), torch.stack(first).float().double(), atol=1e-5,
                               rtol=0)
    learned(inputs[1:])  # synthetic rows only: the real mass stays, the synthetic one moves halfway
    scores = learned.scores(inputs[1:]).double()
    second = 0.5 * first[1] + 0.5 * (torch.logsumexp(scores, 0) - math.log(2))
    assert float(learned.source_log_mass[0]) == pytest.approx(float(first[0]), abs=1e-5)
    assert float(learned.source_log_mass[1]) == pytest.approx(float(second), abs=1e-5)


class Composition(Callback):
    """Real rows of each trained inner batch (the module's outputs carry the batch's source flags)."""

    def __init__(self):
        self.real_rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs is not None:
            self.real_rows.append(int((outputs["is_synthetic"] < 0.5).sum()))


def sampling_setup(tiny_tokenizer, splits, cache_dir, head_lr: float = 1e-2, **kwargs):
    policy = PolicyModel(config=llama_config(tiny_tokenizer), r=4, lora_alpha=8, seed=0)
    head = WeightHead(hidden_projection=8, mlp_width=16, seed=0, **kwargs.pop("head", {}))
    module = BoostModule(policy, Learned(head), source_sampling="weights",
                         policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                         head_optimizer=lambda p: torch.optim.Adam(p, lr=head_lr), **kwargs)
    data = BoostDataModule(**splits, tokenizer=tiny_tokenizer, batch_size=4, validation_batch_size=4, max_length=128,
                           seed=0, cache_dir=str(cache_dir))
    return module, data


def test_a_head_that_prefers_real_rows_fills_the_batches_with_them(tiny_tokenizer, tmp_path):
    splits = write_splits(tmp_path)  # 4 real, 12 synthetic rows: natural share 0.25, one real row per batch
    module, data = sampling_setup(tiny_tokenizer, splits, tmp_path / "cache", head_lr=0.0,
                                  head={"features": ("source",), "num_layers": 1})
    with torch.no_grad():
        module.weighting.head.mlp[-1].weight.fill_(-3.0)  # real rows score higher than synthetic ones
    composition = Composition()
    before = {n: p.detach().clone() for n, p in module.policy.trainable_named_parameters().items()}
    trainer = fit(module, data, tmp_path / "run", [composition], max_epochs=3)
    assert module._natural_real_share == pytest.approx(0.25)
    # The share the next batch would take, from the running masses: p = σ(logit π + m_real − m_synthetic).
    m = module.weighting.source_log_mass
    expected = 1 / (1 + math.exp(-(math.log(0.25 / 0.75) + float(m[0] - m[1]))))
    assert module.weighting.real_share(0.25) == pytest.approx(expected, rel=1e-6) and expected > 0.9
    assert float(trainer.logged_metrics["sampling/real_share"]) > 0.9  # the last batch's
    # After the first batch has shown both sources, batches are mostly real rows (natural mix: 1 of 4).
    assert sum(composition.real_rows[2:]) / len(composition.real_rows[2:]) > 3
    assert module.inner_steps == len(composition.real_rows) == 9  # an epoch: one pass over 12 synthetic rows
    assert any(not torch.equal(before[n], p) for n, p in module.policy.trainable_named_parameters().items())


def test_both_levels_train_and_the_weights_stay_importance_corrected(tiny_tokenizer, tmp_path):
    splits = write_splits(tmp_path)
    module, data = sampling_setup(tiny_tokenizer, splits, tmp_path / "cache")
    head_before = {n: p.detach().clone() for n, p in module.weighting.named_parameters()}
    trainer = fit(module, data, tmp_path / "run", max_epochs=1)
    assert module.inner_steps == module.outer_steps == 3  # one pass over the 12 synthetic rows
    assert any(not torch.equal(head_before[n], p) for n, p in module.weighting.named_parameters())
    assert 0 < float(trainer.logged_metrics["sampling/real_share"]) < 1
    assert bool(module.weighting.source_seen.all())


def test_resumed_run_equals_the_uninterrupted_one(tiny_tokenizer, tmp_path):
    splits = write_splits(tmp_path)

    def build():
        # A head already leaning towards real rows (its last layer reads loss, then source), so that the real share
        # and the stochastic rounding move from batch to batch.
        module, data = sampling_setup(tiny_tokenizer, splits, tmp_path / "cache",
                                      head={"features": ("loss", "source"), "num_layers": 1})
        with torch.no_grad():
            module.weighting.head.mlp[-1].weight.copy_(torch.tensor([[0.5, -1.0]]))
        return module, data

    seed_everything(0)
    module, data = build()
    full_rows = Composition()
    trainer = fit(module, data, tmp_path / "full", [full_rows])
    full = state(module, trainer)
    assert len(set(full_rows.real_rows)) > 1

    seed_everything(0)
    module, data = build()
    preemption, part_rows = PreemptionCheckpoint(), Composition()
    with pytest.raises(SystemExit):
        fit(module, data, tmp_path / "run", [part_rows, preemption, StopAt(preemption, 2)])  # rows before the exit
    seed_everything(123)
    module, data = build()
    resumed_rows = Composition()
    trainer = fit(module, data, tmp_path / "run", [PreemptionCheckpoint(), resumed_rows],
                  ckpt_path=preemption.saved_path)
    assert part_rows.real_rows + resumed_rows.real_rows == full_rows.real_rows
    assert_same(full[0], state(module, trainer)[0])


def test_impossible_setups_are_refused_before_training(tiny_tokenizer, tiny_llama_config, tmp_path):
    policy = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    with pytest.raises(ValueError, match="resamples"):
        BoostModule(policy, "uniform", source_sampling="weights")
    with pytest.raises(ValueError, match="resamples"):
        BoostModule(policy, Learned(WeightHead(reweight="synthetic")), source_sampling="weights")
    with pytest.raises(ValueError, match="natural"):
        BoostModule(policy, "learned", source_sampling="often")
    splits = write_splits(tmp_path)
    data = BoostDataModule(**splits, tokenizer=tiny_tokenizer, batch_size=4, max_length=128, real_fraction=0.5,
                           cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    with pytest.raises(ValueError, match="real_fraction"):
        data.draw_real_stream()
    again = BoostDataModule(**splits, tokenizer=tiny_tokenizer, batch_size=4, max_length=128,
                            cache_dir=str(tmp_path / "cache"))
    again.prepare_data()
    again.setup("fit")
    # A second fit with the same data module (its first draw set real_fraction to 0.0) is no conflict.
    assert again.draw_real_stream() == again.draw_real_stream() == {"real": 4, "synthetic": 12}
    no_real = BoostDataModule(synthetic=splits["synthetic"], validation=splits["validation"], tokenizer=tiny_tokenizer,
                              batch_size=4, max_length=128, cache_dir=str(tmp_path / "cache"))
    no_real.prepare_data()
    no_real.setup("fit")
    with pytest.raises(ValueError, match="no real rows"):
        no_real.draw_real_stream()
