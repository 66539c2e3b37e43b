"""Random collated batches in the data contract's shape, for benchmarks and tests of the training step."""


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
