"""Shared fixtures: tiny tokenizers and tiny Llama configs, built in memory (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

from boost_lightning.bench.batches import random_batch  # noqa: F401  (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "You are in a maze. Walls: north, east. Goal is at (3, 4). You are at (0, 0).",
    "move north",
    "move south",
    "move east",
    "move west",
    "Guess a number between 1 and 100. higher lower correct",
    "Is it an animal? yes no. Is it bigger than a car? It is a cat.",
    "You reached the goal. That move hits a wall.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A ChatML byte-level BPE tokenizer trained in memory (has a chat template)."""
    from boost_lightning.data.tokenizer import train_chat_tokenizer

    return train_chat_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same vocabulary but without a chat template: exercises the plain role-tagged fallback."""
    from boost_lightning.data.tokenizer import train_chat_tokenizer

    tok = train_chat_tokenizer(CORPUS, vocab_size=300)
    tok.chat_template = None
    return tok


@pytest.fixture()
def tiny_llama_config(tiny_tokenizer) -> dict:
    """Config dict of a 2-layer Llama small enough for CPU tests (a few hundred thousand params)."""
    return {
        "model_type": "llama",
        "vocab_size": len(tiny_tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tiny_tokenizer.pad_token_id,
        "eos_token_id": tiny_tokenizer.eos_token_id,
        "bos_token_id": tiny_tokenizer.bos_token_id,
        "tie_word_embeddings": False,
    }


@pytest.fixture()
def tiny_policy(tiny_llama_config):
    """A tiny LoRA Llama with non-zero LoRA B matrices (so LoRA changes the function from the start)."""
    import torch

    from boost_lightning.models import PolicyModel

    policy = PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in policy.trainable_named_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def _trajectory_row(index: int = 0, turns: int = 2, **fields) -> dict:
    messages = [{"role": "system", "content": "You are in a maze."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"You are at ({index}, {turn}). Walls: north."})
        messages.append({"role": "assistant", "content": ["move east", "move south", "move west"][turn % 3]})
    row = {"messages": messages, "reward": float(index), "task_id": f"maze-{index}", "meta": {"index": index}}
    row.update(fields)
    return row


@pytest.fixture()
def make_row():
    """Factory of valid rows: ``make_row(index, turns=2, **fields_to_override)`` (system + user/assistant turns)."""
    return _trajectory_row


@pytest.fixture()
def write_jsonl(tmp_path):
    """``write_jsonl(name, rows)``: write rows (dicts, or strings written verbatim) as ``tmp_path/name``; its path."""
    import json

    def write(name: str, rows) -> str:
        path = tmp_path / name
        path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
        return str(path)

    return write


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """A fresh ``$BOOST_LIGHTNING_CACHE`` for one test module (embedded data, converted models), restored after."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("BOOST_LIGHTNING_CACHE")
    os.environ["BOOST_LIGHTNING_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("BOOST_LIGHTNING_CACHE")
    else:
        os.environ["BOOST_LIGHTNING_CACHE"] = old


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """A cache root shared by the whole session, apart from the user's cache; ``embedded_data`` generates into it."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture(scope="session")
def embedded_data(embedded_root):
    """``embedded_data(task)``: the paths of ``embedded_splits(task)`` with the default settings (what the specs
    ``embedded:<task>/<split>`` and ``embedded:<task>`` stand for), generated on the first request of the session and
    shared by every later one."""
    from boost_lightning.envs.embedded import embedded_splits

    def splits(task: str) -> dict:
        return embedded_splits(task, cache_dir=embedded_root / "embedded")

    return splits


@pytest.fixture()
def embedded_specs(embedded_root, monkeypatch):
    """``$BOOST_LIGHTNING_CACHE`` set to ``embedded_root`` for one test, so ``embedded:`` specs read the session's
    data. Other cache kinds then land there too: pass an explicit ``cache_dir`` where a test needs a fresh one."""
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(embedded_root))
    return embedded_root


# ---- BoostModule on the tiny LoRA Llama: one set of helpers for every module-level test ---------------------------
def batch_items(vocab_size: int, steps: int = 4, batch_size: int = 4, seed: int = 0) -> list[dict]:
    """``steps`` training items ``{"inner": batch, "outer": batch}`` of random tokens (``random_batch``)."""
    return [{"inner": random_batch(vocab_size, batch_size, seed=seed + i),
             "outer": random_batch(vocab_size, batch_size, seed=1000 + seed + i)} for i in range(steps)]


@pytest.fixture()
def make_module(tiny_llama_config):
    """``make_module(weighting="learned", **kwargs)``: a ``BoostModule`` on a fresh tiny LoRA Llama (seed 0).

    Both levels default to plain SGD (policy lr 0.1, head lr 1.0), so every update is a readable function of its
    gradient; pass ``policy_optimizer`` / ``head_optimizer`` for Adam.
    """
    import torch

    from boost_lightning.models import PolicyModel, WeightHead
    from boost_lightning.module import BoostModule
    from boost_lightning.weightings import Learned

    def make(weighting="learned", **kwargs):
        if weighting == "learned":  # a fixed head seed: a default one follows whatever an earlier test seeded with
            weighting = Learned(WeightHead(seed=0))
        kwargs.setdefault("policy_optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
        kwargs.setdefault("head_optimizer", lambda p: torch.optim.SGD(p, lr=1.0))
        return BoostModule(PolicyModel(config=tiny_llama_config, r=4, lora_alpha=8, seed=0), weighting, **kwargs)

    return make


@pytest.fixture()
def fit_module():
    """``fit_module(module, items_or_loader_or_datamodule, callbacks=(), max_epochs=1, ckpt_path=None,
    **trainer_kwargs)``: a CPU ``Trainer`` without logger, checkpoints or progress bar (nor validation, given a data
    module), logging every step; returns the trainer."""
    from lightning.pytorch import LightningDataModule, Trainer
    from torch.utils.data import DataLoader

    def fit(module, data, callbacks=(), max_epochs=1, ckpt_path=None, **trainer_kwargs):
        if isinstance(data, list):
            data = DataLoader(data, batch_size=None)
        trainer_kwargs.setdefault("logger", False)
        trainer_kwargs.setdefault("enable_checkpointing", False)
        if isinstance(data, LightningDataModule):  # training only: no validation pass
            trainer_kwargs.setdefault("num_sanity_val_steps", 0)
            trainer_kwargs.setdefault("limit_val_batches", 0)
        trainer = Trainer(max_epochs=max_epochs, enable_progress_bar=False, enable_model_summary=False,
                          accelerator="cpu", log_every_n_steps=1, callbacks=list(callbacks), **trainer_kwargs)
        if isinstance(data, LightningDataModule):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
        return trainer

    return fit


@pytest.fixture()
def assert_same_runs():
    """Check that every module of ``runs`` ends with the parameters of the first (to ``atol``), naming the tensor."""
    def check(runs: list, atol: float = 1e-6) -> None:
        for other in runs[1:]:
            for (n, a), (_, b) in zip(runs[0].named_parameters(), other.named_parameters()):
                torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, n=n: f"{n}: {m}")

    return check


@pytest.fixture()
def tiny_cli_model(tiny_llama_config) -> dict:
    """The ``model`` section of a CLI config for a tiny CPU run: the tiny LoRA Llama and a small learned head."""
    return {
        "policy": {"class_path": "boost_lightning.models.PolicyModel",
                   "init_args": {"config": tiny_llama_config, "r": 4, "lora_alpha": 8}},
        "weighting": {"class_path": "boost_lightning.weightings.Learned", "init_args": {"head": {
            "class_path": "boost_lightning.models.WeightHead",
            "init_args": {"hidden_projection": 8, "mlp_width": 16}}}},
    }


@pytest.fixture()
def tiny_cli_config(tmp_path, tiny_tokenizer, tiny_cli_model, monkeypatch):
    """``make(data, trainer=None, model=None)``: the config (a dict) of a tiny CPU CLI run in ``tmp_path``, which
    becomes the current directory and holds the saved tiny tokenizer; ``data`` gives the split specs and any other
    data option, ``trainer`` and ``model`` are merged over the defaults."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.chdir(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")

    def make(data: dict, trainer: dict | None = None, model: dict | None = None) -> dict:
        return {"seed_everything": 0,
                "trainer": {"accelerator": "cpu", "num_sanity_val_steps": 0, "limit_val_batches": 0, **(trainer or {})},
                "model": {**tiny_cli_model, **(model or {})},
                "data": {"tokenizer": str(tmp_path / "tokenizer"), "batch_size": 4, "validation_batch_size": 2,
                         "max_length": 128, "cache_dir": str(tmp_path / "cache"), **data}}

    return make


@pytest.fixture()
def make_items(tiny_llama_config):
    """``make_items(steps=4, batch_size=4, seed=0)``: training items of random tokens in the tiny Llama's vocabulary."""

    def make(steps: int = 4, batch_size: int = 4, seed: int = 0) -> list[dict]:
        return batch_items(tiny_llama_config["vocab_size"], steps, batch_size, seed)

    return make
