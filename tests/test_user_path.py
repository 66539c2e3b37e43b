"""What a new user meets on the command line: where logs go, overrides, seeds, saved configs, and console noise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from boost_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture()
def tiny_run(tmp_path, make_row, write_jsonl, tiny_tokenizer, tiny_cli_model, monkeypatch):
    """A config file for a tiny CPU run (tiny JSONL splits, tokenizer and Llama in ``tmp_path``); its path.

    The working directory is ``tmp_path/cwd`` so that anything written relative to it stays in the test's folder, and
    ``PL_GLOBAL_SEED`` is restored afterwards (``seed_everything`` sets it for the whole process).
    """
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real = [make_row(i, turns=1 + i % 3, source="real") for i in range(4)]
    synthetic = [make_row(100 + i, turns=1 + i % 2, reward=float(i % 5) / 4) for i in range(8)]
    validation = [make_row(200 + i, turns=1 + i % 3) for i in range(4)]
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "log_every_n_steps": 1},
        "model": tiny_cli_model,
        "data": {"real": write_jsonl("real.jsonl", real), "synthetic": write_jsonl("synthetic.jsonl", synthetic),
                 "validation": write_jsonl("validation.jsonl", validation), "tokenizer": str(tokenizer_dir),
                 "batch_size": 4, "validation_batch_size": 2, "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


# ---- 1. logs and checkpoints follow --trainer.default_root_dir -------------------------------------------------------
def test_default_logger_writes_under_default_root_dir(tiny_run, tmp_path):
    root = tmp_path / "run"
    cli = cli_main(["--config", str(tiny_run), "--trainer.default_root_dir", str(root), *QUIET], run=False)
    assert Path(cli.trainer.logger.save_dir) == root / "logs"
    assert Path(cli.trainer.log_dir).is_relative_to(root)
    # Without a default_root_dir the logs stay in ./logs (what `tensorboard --logdir logs` of the README reads).
    cli = cli_main(["--config", str(tiny_run), *QUIET], run=False)
    assert Path(cli.trainer.logger.save_dir) == Path("logs")
    # Another logger class keeps following it (jsonargparse carries the default's init_args over).
    cli = cli_main(["--config", str(tiny_run), "--trainer.default_root_dir", str(root), "--trainer.logger",
                    "lightning.pytorch.loggers.CSVLogger", *QUIET], run=False)
    assert Path(cli.trainer.logger.save_dir) == root / "logs"
    # An explicit save_dir wins.
    cli = cli_main(["--config", str(tiny_run), "--trainer.default_root_dir", str(root),
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "elsewhere"), *QUIET], run=False)
    assert Path(cli.trainer.logger.save_dir) == tmp_path / "elsewhere"


def test_quickstart_logs_follow_default_root_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.default_root_dir", "run"],
                   run=False)
    assert Path(cli.trainer.logger.save_dir) == Path("run/logs") and cli.trainer.logger.name == "quickstart"
    cli = cli_main(["--config", str(ROOT / "configs/quickstart.yaml")], run=False)
    assert Path(cli.trainer.logger.save_dir) == Path("logs")  # `tensorboard --logdir logs` from the checkout


# ---- 2. model-config fields can be overridden on the command line ----------------------------------------------------
def test_policy_config_field_overrides_keep_their_types(tiny_run):
    cli = cli_main(["--config", str(tiny_run), "--model.policy.init_args.config.vocab_size", "1024",
                    "--model.policy.init_args.config.rms_norm_eps", "1e-5",
                    "--model.policy.init_args.config.tie_word_embeddings", "true", *QUIET], run=False)
    config = cli.model.policy.model.config
    assert config.vocab_size == 1024 and cli.model.policy.vocab_size == 1024
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings is True


# ---- 3. data.max_length must fit the policy's positions --------------------------------------------------------------
def test_max_length_longer_than_the_policy_positions_is_an_error(tiny_run):
    cli = cli_main(["--config", str(tiny_run), "--data.max_length", "600", "--trainer.logger", "false", *QUIET],
                   run=False)
    with pytest.raises(ValueError, match=r"max_length.*600.*512.*max_position_embeddings"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


# ---- 4. one seed_everything drives every seed not set explicitly ----------------------------------------------------
def _initial_state(config: Path, seed: int, *extra: str) -> dict[str, torch.Tensor]:
    """LoRA A matrices, head parameters and inner batch order of a run as built by the CLI."""
    cli = cli_main(["--config", str(config), "--seed_everything", str(seed), "--trainer.logger", "false", *extra],
                   run=False)
    lora = {n: p.detach().clone() for n, p in cli.model.policy.trainable_named_parameters().items() if "lora_A" in n}
    head = {n: p.detach().clone() for n, p in cli.model.weighting.named_parameters()}
    order = torch.tensor(list(cli.datamodule.inner_sampler()))
    return {"lora": torch.cat([v.flatten() for v in lora.values()]),
            "head": torch.cat([v.flatten() for v in head.values()]), "order": order}


def test_seed_everything_drives_model_head_and_batch_order(tiny_run):
    zero, one, again = (_initial_state(tiny_run, seed) for seed in (0, 1, 0))
    for key in ("lora", "head", "order"):
        assert torch.equal(zero[key], again[key]), key
        assert not torch.equal(zero[key], one[key]), key
    # An explicit seed wins over seed_everything.
    pinned = ["--model.policy.init_args.seed", "5", "--model.weighting.init_args.head.init_args.seed", "5",
              "--data.seed", "5"]
    a, b = _initial_state(tiny_run, 0, *pinned), _initial_state(tiny_run, 1, *pinned)
    for key in ("lora", "head", "order"):
        assert torch.equal(a[key], b[key]), key


# ---- 5. the saved config.yaml of a run loads again -------------------------------------------------------------------
def test_saved_config_of_a_fit_reloads(tiny_run, tmp_path):
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(tiny_run), "--trainer.default_root_dir", str(root), *QUIET])
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    assert saved.is_file()
    again = cli_main(["--config", str(saved), *QUIET], run=False)
    assert again.model.policy.model.config.to_dict() == cli.model.policy.model.config.to_dict()
    assert yaml.safe_load(saved.read_text())["model"] == again.config.as_dict()["model"]


# ---- 6. no advertising tip and no known-noise warnings on the console ------------------------------------------------
def test_cli_prints_no_tip_and_no_known_noise(tiny_run, tmp_path, capfd, caplog, recwarn):
    # Other tests (the benchmark) quieten Lightning's loggers for the rest of the process: put them back at INFO here.
    for name in ("lightning.pytorch", "lightning.fabric"):
        caplog.set_level(logging.INFO, logger=name)
    cli = cli_main(["fit", "--config", str(tiny_run), "--trainer.default_root_dir", str(tmp_path / "run"),
                    "--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.val_check_interval", "1", *QUIET])
    ckpt = next(Path(cli.trainer.log_dir).rglob("*.ckpt"), None)
    assert ckpt, sorted(map(str, (tmp_path / "run").rglob("*")))
    # Resuming without a logger: the checkpoint directory differs from the one the checkpoint was written in.
    cli_main(["fit", "--config", str(tiny_run), "--trainer.logger", "false", "--trainer.max_epochs", "2",
              "--ckpt_path", str(ckpt), *QUIET])
    out, err = capfd.readouterr()
    text = out + err + caplog.text + "\n".join(str(w.message) for w in recwarn)
    assert "Seed set to" in text  # the console is captured, and Lightning's own information is still there
    assert "Tip:" not in text and "litlogger" not in text and "litmodels" not in text
    for noise in ("dirpath has changed", "is_gradient_checkpointing", "LeafSpec"):
        assert noise not in text, noise


def test_resumed_datamodule_keeps_the_seed_of_the_checkpoint(tiny_run, monkeypatch):
    from boost_lightning.data.datamodule import BoostDataModule

    data = yaml.safe_load(tiny_run.read_text())["data"]
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    saved = BoostDataModule(**data)
    assert saved.seed == 3
    # A resumed process seeded otherwise (e.g. `seed_everything: true` draws a new seed) continues the saved order.
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    resumed = BoostDataModule(**data)
    resumed.load_state_dict({"epoch": 0, "start_batch": 1, "seed": saved.seed})
    assert resumed.seed == 3 and list(resumed.inner_sampler()) == list(saved.inner_sampler())
