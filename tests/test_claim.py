"""BOOST's central claim on a small fixed problem: rows whose agent turns are corrupted get learned weights well below
the clean rows', from the validation signal alone (fixed seed, tiny model, no labels reach the head)."""

import torch
from lightning.pytorch import Callback

from boost_lightning.models import WeightHead
from boost_lightning.weightings import Learned

OBS = list(range(10, 18))  # 8 observation tokens
ACT = list(range(20, 28))  # 8 action tokens: the correct reply to OBS[i] is ACT[i]
PAIRS = 6  # (observation, action) exchanges per trajectory
STEPS = 12


def _batch(kinds: list[str], seed: int) -> dict:
    """Rows of ``PAIRS`` exchanges; ``clean``/``real`` rows answer OBS[i] with ACT[i], ``corrupted`` rows with a
    shuffled action (the same surface format, the wrong act)."""
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.tensor(ACT)[torch.randperm(len(ACT), generator=g)]
    rows = []
    for kind in kinds:
        obs = torch.randint(0, len(OBS), (PAIRS,), generator=g)
        act = torch.tensor(ACT)[obs] if kind != "corrupted" else shuffled[torch.randint(0, len(ACT), (PAIRS,),
                                                                                          generator=g)]
        rows.append(torch.stack([torch.tensor(OBS)[obs], act], dim=1).flatten())
    ids = torch.stack(rows)
    labels = torch.full_like(ids, -100)
    labels[:, 1::2] = ids[:, 1::2]
    obs_mask = torch.zeros_like(ids, dtype=torch.bool)
    obs_mask[:, 0::2] = True
    n = len(kinds)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "turn_ids": torch.arange(ids.shape[1]).expand_as(ids) // 2, "obs_mask": obs_mask,
            "num_agent_tokens": torch.full((n,), PAIRS), "num_turns": torch.full((n,), PAIRS),
            "length": torch.full((n,), ids.shape[1]), "reward": torch.ones(n),  # every row claims success
            "is_synthetic": torch.tensor([float(k != "real") for k in kinds]), "row_id": torch.arange(n),
            "task_id": kinds, "meta": [{"kind": k} for k in kinds]}


class Weights(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs is not None:
            self.rows.append((outputs["weights"], batch["inner"]["task_id"]))


def test_learned_weights_put_corrupted_rows_below_half_the_clean_rows(make_module, fit_module):
    kinds = ["real"] * 2 + ["clean"] * 7 + ["corrupted"] * 7
    items = [{"inner": _batch(kinds, seed=i), "outer": _batch(["real"] * 8, seed=10_000 + i)} for i in range(STEPS)]
    head = WeightHead(features=["loss", "surprise", "reward", "source"], reweight="synthetic", seed=0)
    module = make_module(Learned(head), policy_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
                         head_optimizer=lambda p: torch.optim.Adam(p, lr=3e-2))
    record = Weights()
    torch.manual_seed(0)
    fit_module(module, items, callbacks=[record])

    last = record.rows[-3:]
    clean = torch.cat([w[[k == "clean" for k in kinds]] for w, kinds in last]).mean()
    corrupted = torch.cat([w[[k == "corrupted" for k in kinds]] for w, kinds in last]).mean()
    assert module.outer_steps == STEPS
    assert corrupted < 0.5 * clean, (float(corrupted), float(clean))
