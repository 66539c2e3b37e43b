"""Rollout evaluation inside a real fit, on the embedded maze task."""

import pytest
import torch
from lightning.pytorch import Trainer

from boost_lightning.callbacks import RolloutEvaluation
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule


@pytest.fixture()
def maze_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_rollout_callback_logs_success_and_transcripts(maze_cache, tiny_llama_config):
    data = BoostDataModule(real="embedded:maze/real", synthetic="embedded:maze/synthetic",
                           validation="embedded:maze/validation", tokenizer="embedded:maze", batch_size=4,
                           validation_batch_size=4, cache_dir=str(maze_cache / "datasets"))
    tok = data.tokenizer
    config = {**tiny_llama_config, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    module = BoostModule(PolicyModel(config=config, r=4), WeightHead(),
                         policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    rollout = RolloutEvaluation(task="maze", num_episodes=3, max_new_tokens=6, batch_size=3)
    trainer = Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=[rollout], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    result = rollout.last_result
    assert result is not None and len(result.transcripts) == 3
    assert 0.0 <= result.success_rate <= 1.0
    assert result.transcripts[0][0]["role"] == "system"
    assert {"rollout/success_rate", "rollout/return", "rollout/turns"} <= set(trainer.callback_metrics)
