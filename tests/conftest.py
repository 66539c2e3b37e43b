"""Shared fixtures: tiny tokenizers and tiny Llama configs, built in memory (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

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


def random_batch(vocab_size: int, batch_size: int = 4, seq_len: int = 24, seed: int = 0, synthetic_every: int = 2):
    """A collated batch in the data contract's shape with random tokens (agent tokens in the second half)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g)
    attention = torch.ones(batch_size, seq_len, dtype=torch.long)
    lengths = torch.randint(seq_len // 2 + 2, seq_len + 1, (batch_size,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        attention[i, n:] = 0
        ids[i, n:] = 0
    labels = torch.full_like(ids, -100)
    obs = torch.zeros_like(ids, dtype=torch.bool)
    half = seq_len // 2
    labels[:, half:] = ids[:, half:]
    labels[attention == 0] = -100
    obs[:, 2:half] = True
    synthetic = torch.tensor([float(i % synthetic_every != 0) for i in range(batch_size)])
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "turn_ids": torch.zeros_like(ids),
        "obs_mask": obs,
        "num_agent_tokens": (labels != -100).sum(1),
        "num_turns": torch.full((batch_size,), 2),
        "length": attention.sum(1),
        "reward": torch.randn(batch_size, generator=g),
        "is_synthetic": synthetic,
        "row_id": torch.arange(batch_size),
        "task_id": [f"t{i}" for i in range(batch_size)],
        "meta": [{"generator": "expert" if s == 0 else "noisy"} for s in synthetic.tolist()],
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
