"""Preemption and exact resume: a run stopped by SIGTERM/SIGINT and resumed with ``--ckpt_path last`` equals the
uninterrupted run (LoRA, head, both optimizers and schedulers, counters, RNG, data position); safe loading."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.data.sampling import MixedSampler
from boost_lightning.models import PolicyModel, WeightHead
from boost_lightning.module import BoostModule
from boost_lightning.preemption import PreemptionCheckpoint, find_last_checkpoint, rng_state, set_rng_state
from boost_lightning.weightings import Learned

ROOT = Path(__file__).resolve().parents[1]


def write_splits(root: Path) -> dict[str, str]:
    """Small real / synthetic / validation JSONL files: 4 inner batches of 4 rows per epoch."""
    real = [_row(i, turns=1 + i % 3, source="real") for i in range(4)]
    synthetic = [_row(100 + i, turns=1 + i % 2, reward=float(i % 3)) for i in range(12)]
    validation = [_row(200 + i, turns=2) for i in range(8)]
    paths = {}
    for name, rows in (("real", real), ("synthetic", synthetic), ("validation", validation)):
        paths[name] = str(root / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def _row(index: int, turns: int, **fields) -> dict:
    messages = [{"role": "system", "content": "You are in a maze."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"You are at ({index}, {turn}). Walls: north."})
        messages.append({"role": "assistant", "content": ["move east", "move south", "move west"][turn % 3]})
    return {"messages": messages, "reward": float(index % 5), "task_id": f"maze-{index}", **fields}


def llama_config(tokenizer) -> dict:
    return {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def splits(workdir):
    return write_splits(workdir)


def build(config, splits, tokenizer, cache_dir):
    policy = PolicyModel(config=config, r=4, lora_alpha=8, seed=0)
    module = BoostModule(
        policy, Learned(WeightHead(hidden_projection=8, mlp_width=16, seed=0)),
        policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        head_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        policy_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        head_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7),
    )
    data = BoostDataModule(**splits, tokenizer=tokenizer, batch_size=4, validation_batch_size=4, max_length=128, seed=0,
                           cache_dir=str(cache_dir))
    return module, data


class StopAt(Callback):
    """Sends the preemption request (as the signal handler would) at the start of a global batch number."""

    def __init__(self, preemption: PreemptionCheckpoint, at: int) -> None:
        self.preemption, self.at = preemption, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.inner_steps == self.at:
            self.preemption.request_stop(signal.SIGINT)


class DrawRandom(Callback):
    """Consumes the global RNGs every step and records the draws: RNG state must survive the resume."""

    def __init__(self):
        self.draws = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws.append((torch.rand(()).item(), float(np.random.rand()), random.random()))


class RecordRows(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(batch["inner"]["row_id"].tolist() + batch["outer"]["row_id"].tolist())


def fit(module, data, root, callbacks=(), ckpt_path=None, max_epochs=2):
    trainer = Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=str(root), callbacks=list(callbacks),
                      num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=3, log_every_n_steps=1,
                      deterministic=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def state(module, trainer):
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()
               if "lora_" in k or k.startswith("weighting.")}
    return tensors, [o.state_dict() for o in trainer.optimizers], [c.scheduler.state_dict()
                                                                     for c in trainer.lr_scheduler_configs]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# Stops after inner step 2 (mid-epoch), 4 (the last batch of epoch 0) and 6 (mid-epoch 1). RNG streams continue exactly
# when nothing draws between the save point and the next step: not so across an epoch change (new loader iterators).
@pytest.fixture(scope="module")
def uninterrupted(tiny_tokenizer, splits, workdir):
    seed_everything(0)
    module, data = build(llama_config(tiny_tokenizer), splits, tiny_tokenizer, workdir / "cache")
    draws, rows = DrawRandom(), RecordRows()
    trainer = fit(module, data, workdir / "full", [draws, rows])
    assert module.inner_steps == 8 and module.outer_steps == 8
    return state(module, trainer), draws, rows


@pytest.mark.parametrize("stop_at, same_rng", [(1, True), (3, False), (5, True)],
                         ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_preempted_then_resumed_run_equals_uninterrupted_run(tiny_tokenizer, splits, uninterrupted, workdir,
                                                             tmp_path, stop_at, same_rng):
    tiny_llama_config = llama_config(tiny_tokenizer)
    full, full_draws, full_rows = uninterrupted

    seed_everything(0)
    module, data = build(tiny_llama_config, splits, tiny_tokenizer, workdir / "cache")
    preemption = PreemptionCheckpoint()
    part_draws, part_rows = DrawRandom(), RecordRows()
    with pytest.raises(SystemExit) as stopped:
        fit(module, data, tmp_path / "run", [preemption, StopAt(preemption, stop_at), part_draws, part_rows])
    assert stopped.value.code in (None, 0)
    assert module.inner_steps == stop_at + 1  # the step in flight finished, then the checkpoint was written
    ckpt = preemption.saved_path
    assert ckpt == str(tmp_path / "run" / "checkpoints" / "last.ckpt")

    seed_everything(123)  # a resumed process starts from other RNG states: the checkpoint must bring its own
    module, data = build(tiny_llama_config, splits, tiny_tokenizer, workdir / "cache")
    resumed_draws, resumed_rows = DrawRandom(), RecordRows()
    probe = Trainer(default_root_dir=str(tmp_path / "run"), logger=False)
    assert find_last_checkpoint(probe) == ckpt
    resumed_trainer = fit(module, data, tmp_path / "run", [PreemptionCheckpoint(), resumed_draws, resumed_rows],
                          ckpt_path=ckpt)

    assert (module.inner_steps, module.outer_steps) == (8, 8)
    assert part_rows.rows + resumed_rows.rows == full_rows.rows  # exactly the batches not yet trained on, in order
    if same_rng:
        assert part_draws.draws + resumed_draws.draws == full_draws.draws
    tensors, optimizers, schedulers = state(module, resumed_trainer)
    assert_same(full[0], tensors)
    for expected, got in zip(full[1], optimizers):
        assert expected["param_groups"] == got["param_groups"]
        for index, values in expected["state"].items():
            assert_same(values, got["state"][index])
    assert full[2] == schedulers


class SendSignal(Callback):
    def __init__(self, signum, at):
        self.signum, self.at = signum, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)  # delivered mid-step: the step must still complete


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_signal_mid_step_finishes_the_step_saves_and_exits_cleanly(tiny_tokenizer, splits, workdir, tmp_path,
                                                                         signum):
    before = signal.getsignal(signal.SIGINT)
    module, data = build(llama_config(tiny_tokenizer), splits, tiny_tokenizer, workdir / "cache")
    preemption = PreemptionCheckpoint()
    with pytest.raises(SystemExit) as stopped:
        fit(module, data, tmp_path, [preemption, SendSignal(signum, at=1)])
    assert stopped.value.code in (None, 0)
    assert module.inner_steps == module.outer_steps == 2
    saved = torch.load(preemption.saved_path, weights_only=True)
    assert saved["boost"]["inner_steps"] == 2
    assert saved["BoostDataModule"].items() >= {"epoch": 0, "start_batch": 2}.items()
    assert signal.getsignal(signal.SIGINT) is before  # handlers are given back


def test_cli_attaches_the_preemption_checkpoint_and_a_config_can_turn_it_off(tmp_path):
    from boost_lightning.cli import cli_main

    for enabled in ("true", "false"):
        cli = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(tmp_path), "--preemption.enabled", enabled], run=False)
        (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        assert callback.enabled is (enabled == "true")


def test_sampler_resumes_at_a_batch_without_reading_the_ones_before():
    sampler = MixedSampler(10, 14, batch_size=4, seed=3)
    sampler.set_epoch(2)
    epoch = sampler.batches()
    sampler.load_state_dict({"epoch": 2, "start_batch": 4})
    sampler.set_epoch(2)
    assert list(sampler) == [i for batch in epoch[4:] for i in batch]
    assert list(sampler) == [i for batch in epoch for i in batch]  # once only: the next pass is a whole epoch
    assert len(sampler) == len(epoch) * 4
    with pytest.raises(ValueError, match="start_batch"):
        sampler.load_state_dict({"epoch": 0, "start_batch": 99})


def test_rng_state_round_trips_and_survives_weights_only_loading(tmp_path):
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save(saved, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_last_checkpoint_is_the_newest_across_logger_versions(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    old = tmp_path / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    new = tmp_path / "logs" / "run" / "version_1" / "checkpoints" / "last-v1.ckpt"
    other = tmp_path / "logs" / "run" / "version_1" / "checkpoints" / "epoch=0-step=4.ckpt"
    for i, path in enumerate((old, other, new)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (1000 + i, 1000 + i))
    trainer = Trainer(logger=TensorBoardLogger(str(tmp_path / "logs"), name="run"), default_root_dir=str(tmp_path))
    assert find_last_checkpoint(trainer) == str(new)
    assert find_last_checkpoint(Trainer(logger=False, default_root_dir=str(tmp_path / "empty"))) is None


# -- safe loading -----------------------------------------------------------------------------------------------------
def test_fit_checkpoints_load_with_weights_only(tiny_llama_config, tiny_tokenizer, splits, workdir, tmp_path):
    module, data = build(tiny_llama_config, splits, tiny_tokenizer, workdir / "cache")
    trainer = Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
                      num_sanity_val_steps=0, limit_val_batches=1,
                      callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)])
    trainer.fit(module, datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["boost"]["inner_steps"] == 2 and "rng" in saved["boost"]
    assert saved["BoostDataModule"].items() >= {"epoch": 1, "start_batch": 0}.items()
    assert not any(k.startswith("policy.") and "lora_" not in k for k in saved["state_dict"])


def test_trust_remote_code_is_off_unless_set(tiny_tokenizer):
    import inspect

    from boost_lightning.data.tokenizer import load_tokenizer

    assert inspect.signature(PolicyModel).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_tokenizer).parameters["trust_remote_code"].default is False


def test_data_paths_from_configs_are_paths_not_code(tiny_tokenizer, tmp_path, monkeypatch):
    from boost_lightning.data.trajectory import TrajectoryFormatError

    monkeypatch.chdir(tmp_path)
    payload = "__import__('pathlib').Path('pwned').touch()"
    data = BoostDataModule(real=payload, validation=payload, tokenizer=tiny_tokenizer, cache_dir=str(tmp_path))
    with pytest.raises(TrajectoryFormatError, match="file not found"):
        data.setup("fit")
    assert not (tmp_path / "pwned").exists()




# -- the real thing: SIGTERM to a `python main.py fit` process ---------------------------------------------------------
# Test-only callback, importable by the subprocesses from their PYTHONPATH: reports progress to a file and, in the run
# that gets killed, slows each step down so that the signal lands mid-run.
PROGRESS_CALLBACK = """
import os, time
from lightning.pytorch import Callback

class Progress(Callback):
    def __init__(self, path: str, delay: float = 0.0):
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "w") as f:
            f.write(str(pl_module.inner_steps))
        time.sleep(self.delay)
"""


def cli_config(root: Path, splits: dict, tokenizer_dir: Path, policy_config: dict, progress: Path, delay: float):
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "deterministic": True,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 1, "log_every_n_steps": 1, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "run"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "progress_callback.Progress", "init_args": {"path": str(progress), "delay": delay}},
            ],
        },
        "model": {
            "policy": {"class_path": "boost_lightning.models.PolicyModel",
                       "init_args": {"config": policy_config, "r": 4, "lora_alpha": 8}},
            "policy_optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            "head_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            "policy_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                 "init_args": {"step_size": 3, "gamma": 0.5}},
            "weighting": {"class_path": "boost_lightning.weightings.Learned", "init_args": {"head": {
                "class_path": "boost_lightning.models.WeightHead",
                "init_args": {"hidden_projection": 8, "mlp_width": 16}}}},
        },
        "data": {**splits, "tokenizer": str(tokenizer_dir), "batch_size": 4, "validation_batch_size": 4,
                 "max_length": 128, "cache_dir": str(root / "cache")},
        "diagnostics": {"every_n_steps": 1000},
    }


@pytest.mark.slow  # ≈ 30-50 s (three process start-ups); the in-process variant above runs by default
def test_sigterm_to_a_fit_process_then_ckpt_path_last_equals_the_uninterrupted_run(tiny_tokenizer, splits, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "progress_callback.py").write_text(PROGRESS_CALLBACK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    policy_config = llama_config(tiny_tokenizer)

    def start(name: str, delay: float, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        progress = root / "progress.txt"
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(cli_config(root, splits, tmp_path / "tokenizer", policy_config, progress,
                                                    delay)))
        process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config), *extra],
                                   cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return process, root, progress

    # 3 epochs × 4 batches = 12 inner steps; the two runs start together (process start-up dominates).
    full, full_root, _ = start("full", 0.0)
    killed, root, progress = start("preempted", 0.5)
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text().strip() and int(progress.read_text()) >= 5):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGTERM)
    output = killed.communicate(timeout=120)[0]
    assert killed.returncode == 0, output[-3000:]
    assert "Received SIGTERM: saved" in output, output[-3000:]
    saved = torch.load(next((root / "logs").rglob("last.ckpt")), weights_only=True)
    stopped_at = saved["boost"]["inner_steps"]
    assert 5 <= stopped_at < 12, stopped_at

    resumed, _, _ = start("preempted", 0.0, "--ckpt_path", "last")
    output = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, output[-3000:]
    restored_from = root / "logs" / "run" / "version_0"
    assert f"Restoring states from the checkpoint path at {restored_from}" in output, output[-3000:]
    full_output = full.communicate(timeout=180)[0]
    assert full.returncode == 0, full_output[-3000:]

    expected = torch.load(full_root / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    got = torch.load(root / "logs" / "run" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert expected["boost"]["inner_steps"] == got["boost"]["inner_steps"] == 12
    assert expected["boost"]["outer_steps"] == got["boost"]["outer_steps"] == 12
    assert any("lora_" in k for k in got["state_dict"]) and any(k.startswith("weighting.") for k in got["state_dict"])
    assert_same(expected["state_dict"], got["state_dict"])
    for a, b in zip(expected["optimizer_states"], got["optimizer_states"]):
        for index, values in a["state"].items():
            assert_same(values, b["state"][index])
    assert expected["lr_schedulers"] == got["lr_schedulers"]
