"""Callbacks inside a real fit: weight diagnostics keyed on inner steps, rollout evaluation on the maze task."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from boost_lightning.bench.batches import random_batch
from boost_lightning.callbacks import RolloutEvaluation, WeightDiagnostics
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.models import PolicyModel
from boost_lightning.module import BoostModule


@pytest.fixture()
def maze_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


class InnerStepsAtBatchEnd(Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(pl_module.inner_steps)


def _tensorboard_steps(log_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, HISTOGRAMS: 0}).Reload()
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"] if tag.startswith("weights/")}
    steps.update({tag: [e.step for e in events.Histograms(tag)] for tag in tags["histograms"]})
    return steps


def test_weight_diagnostics_are_keyed_on_inner_steps_not_on_both_levels_optimizer_steps(tmp_path,
                                                                                         tiny_llama_config):
    # Head warm-up: the first two batches take a policy step only, the later ones a policy and a head step, so
    # Lightning's global step (both levels) runs ahead of the policy's own step count.
    module = BoostModule(PolicyModel(config=tiny_llama_config, r=4, seed=0), weighting="learned",
                         head_warmup_steps=2)
    vocab = module.policy.vocab_size
    data = DataLoader([{"inner": random_batch(vocab, 4, seed=i), "outer": random_batch(vocab, 4, seed=100 + i)}
                       for i in range(5)], batch_size=None)
    diagnostics, probe = WeightDiagnostics(every_n_steps=1, group_by="generator"), InnerStepsAtBatchEnd()
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    trainer = Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", callbacks=[diagnostics, probe])
    trainer.fit(module, train_dataloaders=data)

    assert probe.steps == [1, 2, 3, 4, 5]
    assert trainer.global_step > module.inner_steps == 5  # the head did step: the two counters differ
    assert [record["step"] for record in diagnostics.history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert {"expert", "noisy"} <= set(diagnostics.history[-1])
    logged = _tensorboard_steps(logger.log_dir)
    for tag in ("weights/generator/expert", "weights/generator/noisy", "weights/hist_real", "weights/hist_synthetic"):
        assert logged[tag] == probe.steps, tag


def test_rollout_callback_logs_success_and_transcripts_at_the_inner_step(maze_cache, tiny_llama_config):
    data = BoostDataModule(real="embedded:maze/real", synthetic="embedded:maze/synthetic",
                           validation="embedded:maze/validation", tokenizer="embedded:maze", batch_size=4,
                           validation_batch_size=4, cache_dir=str(maze_cache / "datasets"))
    tok = data.tokenizer
    config = {**tiny_llama_config, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    module = BoostModule(PolicyModel(config=config, r=4), policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    rollout = RolloutEvaluation(task="maze", num_episodes=3, max_new_tokens=6, batch_size=3)
    logger = TensorBoardLogger(save_dir=str(maze_cache), name="run", version="", default_hp_metric=False)
    # Every batch steps the policy, the head and the reference adapter: 6 optimizer steps are 2 batches, one
    # validation after the second.
    trainer = Trainer(max_steps=6, val_check_interval=2, limit_val_batches=1, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=[rollout], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    result = rollout.last_result
    assert result is not None and len(result.transcripts) == 3
    assert result.seeds == [10_000, 10_001, 10_002]  # the held-out evaluation range
    assert result.transcripts[0][0]["role"] == "system"
    assert trainer.callback_metrics["rollout/success_rate"].item() == pytest.approx(result.success_rate)
    assert trainer.callback_metrics["rollout/turns"].item() == pytest.approx(result.mean_turns)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logger.log_dir)).Reload()
    transcripts = [tag for tag in events.Tags()["tensors"] if tag.startswith("rollout/transcript_")]
    assert len(transcripts) == 2
    assert module.inner_steps == 2 and trainer.global_step == 6
    assert {tag: [e.step for e in events.Tensors(tag)] for tag in transcripts} == {tag: [2] for tag in transcripts}
