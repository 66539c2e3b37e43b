"""BoostDataModule: the batch contract, the real/synthetic mix, determinism and DDP sharding."""

from __future__ import annotations

import types

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DistributedSampler

from boost_lightning.data.collate import TrajectoryCollator
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.data.sampling import MixedSampler

NUM_REAL, NUM_SYNTHETIC, NUM_VALIDATION = 6, 20, 5


@pytest.fixture()
def files(write_jsonl, make_row):
    return {
        "real": write_jsonl("real.jsonl", [make_row(i, turns=1 + i % 3) for i in range(NUM_REAL)]),
        "synthetic": write_jsonl("synthetic.jsonl", [make_row(100 + i, turns=1 + i % 2) for i in range(NUM_SYNTHETIC)]),
        "validation": write_jsonl("validation.jsonl", [make_row(200 + i) for i in range(NUM_VALIDATION)]),
    }


@pytest.fixture()
def make_datamodule(files, tiny_tokenizer, tmp_path):
    def make(**kwargs) -> BoostDataModule:
        arguments = {**files, "tokenizer": tiny_tokenizer, "batch_size": 4, "validation_batch_size": 3}
        datamodule = BoostDataModule(**{**arguments, "cache_dir": str(tmp_path / "cache"), **kwargs})
        datamodule.prepare_data()
        datamodule.setup("fit")
        return datamodule

    return make


def training_batches(datamodule: BoostDataModule, epoch: int = 0) -> list[dict]:
    loader = datamodule.train_dataloader()
    for dataloader in loader.flattened:
        dataloader.sampler.set_epoch(epoch)
    iter(loader)  # CombinedLoader must be iterated once before its length is known
    return [batch for batch, _, _ in loader]


def row_ids(batches: list[dict], part: str = "inner") -> list[tuple[int, ...]]:
    return [tuple(zip(b[part]["is_synthetic"].tolist(), b[part]["row_id"].tolist())) for b in batches]


def test_training_batch_contract(make_datamodule, tiny_tokenizer):
    datamodule = make_datamodule()
    batches = training_batches(datamodule)
    assert len(batches) == 7  # natural mix: ceil(26 / 4) inner batches, as many outer ones
    batch = batches[0]
    assert set(batch) == {"inner", "outer"}
    for part, size in (("inner", 4), ("outer", 3)):
        b = batch[part]
        width = b["input_ids"].shape[1]
        for name in ("input_ids", "attention_mask", "labels", "turn_ids"):
            assert b[name].dtype == torch.long and b[name].shape == (size, width), name
        assert b["obs_mask"].dtype == torch.bool and b["obs_mask"].shape == (size, width)
        for name in ("num_agent_tokens", "num_turns", "length", "row_id"):
            assert b[name].dtype == torch.long and b[name].shape == (size,), name
        for name in ("reward", "is_synthetic"):
            assert b[name].dtype == torch.float and b[name].shape == (size,), name
        assert isinstance(b["task_id"], list) and all(isinstance(t, str) for t in b["task_id"])
        assert isinstance(b["meta"], list) and all(isinstance(m, dict) for m in b["meta"])
        assert b["length"].max() == width == b["attention_mask"].sum(1).max()
        assert (b["num_agent_tokens"] == (b["labels"] != -100).sum(1)).all()
    assert (batch["outer"]["is_synthetic"] == 0).all()
    assert datamodule.tokenizer is tiny_tokenizer
    assert datamodule.num_dropped == {"real": 0, "synthetic": 0, "validation": 0}


def test_collator_pads_right_to_the_longest_row():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "turn_ids": [-1, 1, 1],
         "obs_mask": [True, False, False], "num_agent_tokens": 2, "num_turns": 1, "length": 3, "row_id": 4,
         "reward": 0.5, "is_synthetic": 1, "task_id": "a", "meta": '{"k": [1]}'},
        {"input_ids": [8], "attention_mask": [1], "labels": [8], "turn_ids": [2], "obs_mask": [True],
         "num_agent_tokens": 1, "num_turns": 1, "length": 1, "row_id": 0, "reward": -1.0, "is_synthetic": 0,
         "task_id": "b", "meta": "{}"},
    ]  # fmt: skip
    batch = TrajectoryCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["turn_ids"].tolist() == [[-1, 1, 1], [2, -1, -1]]
    assert batch["obs_mask"].tolist() == [[True, False, False], [True, False, False]]
    assert batch["reward"].tolist() == [0.5, -1.0] and batch["is_synthetic"].tolist() == [1.0, 0.0]
    assert batch["meta"] == [{"k": [1]}, {}] and batch["task_id"] == ["a", "b"]
    assert TrajectoryCollator(0, pad_to_multiple_of=8)(rows)["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("real_fraction", [0.25, 0.5, 1.0, 0.0])
def test_real_fraction_fixes_the_real_rows_per_batch(make_datamodule, real_fraction):
    batches = training_batches(make_datamodule(real_fraction=real_fraction, batch_size=8))
    real_per_batch = round(real_fraction * 8)
    for batch in batches:
        assert (batch["inner"]["is_synthetic"] == 0).sum() == real_per_batch
    # An epoch shows every row of every pool it draws from at least once.
    seen = {pair for batch in row_ids(batches) for pair in batch}
    assert len(seen) == (NUM_REAL if real_per_batch else 0) + (NUM_SYNTHETIC if real_per_batch < 8 else 0)


def test_natural_mix_is_one_pass_over_all_rows(make_datamodule):
    batches = training_batches(make_datamodule(batch_size=2))
    pairs = [pair for batch in row_ids(batches) for pair in batch]
    assert len(pairs) == NUM_REAL + NUM_SYNTHETIC and len(set(pairs)) == len(pairs)


def test_same_seed_same_batches_epoch_by_epoch(make_datamodule):
    first, again = make_datamodule(seed=3, real_fraction=0.5), make_datamodule(seed=3, real_fraction=0.5)
    assert row_ids(training_batches(first, epoch=0)) == row_ids(training_batches(again, epoch=0))
    assert row_ids(training_batches(first, epoch=1)) == row_ids(training_batches(again, epoch=1))
    assert row_ids(training_batches(first, 1), "outer") == row_ids(training_batches(again, 1), "outer")
    assert row_ids(training_batches(first, epoch=0)) != row_ids(training_batches(first, epoch=1))
    other_seed = make_datamodule(seed=4, real_fraction=0.5)
    assert row_ids(training_batches(first)) != row_ids(training_batches(other_seed))


@pytest.mark.parametrize("real_fraction", [None, 0.5])
def test_ranks_get_disjoint_shards_of_the_single_process_order(real_fraction):
    single = MixedSampler(8, 24, batch_size=4, real_fraction=real_fraction, seed=1)
    single.set_epoch(2)
    shards = []
    for rank in range(2):
        sampler = MixedSampler(8, 24, batch_size=4, real_fraction=real_fraction, seed=1, rank=rank, world_size=2)
        sampler.set_epoch(2)
        assert isinstance(sampler, DistributedSampler)  # so Lightning never replaces or re-wraps it
        assert len(sampler) == sampler.num_batches * 4 == len(list(sampler))
        shards.append(sampler.batches())
    assert len(shards[0]) == len(shards[1]) == single.num_batches // 2
    assert sorted(shards[0] + shards[1]) == sorted(single.batches())
    if real_fraction is None:  # one pass over 32 rows: disjoint rows
        assert not set(sum(shards[0], [])) & set(sum(shards[1], []))
    else:  # synthetic rows are passed over once: disjoint; the 8 real rows repeat, 2 per batch
        synthetic = [{i for batch in shard for i in batch if i >= 8} for shard in shards]
        assert not synthetic[0] & synthetic[1] and len(synthetic[0] | synthetic[1]) == 24


def test_datamodule_shards_by_the_attached_trainer(make_datamodule):
    shards = []
    for rank in range(2):
        datamodule = make_datamodule(batch_size=2, real_fraction=0.5)
        datamodule.trainer = types.SimpleNamespace(global_rank=rank, world_size=2)
        shards.append(training_batches(datamodule))
        validation = [row for batch in datamodule.val_dataloader() for row in batch["row_id"].tolist()]
        # Unpadded: a padded duplicate would count twice in the validation mean and in predict output.
        assert validation == [[0, 2, 4], [1, 3]][rank]
    assert len(shards[0]) == len(shards[1]) == 10
    synthetic = [{pair for batch in row_ids(shard) for pair in batch if pair[0] == 1} for shard in shards]
    assert not synthetic[0] & synthetic[1] and len(synthetic[0] | synthetic[1]) == NUM_SYNTHETIC
    outer = [{pair for batch in row_ids(shard, "outer") for pair in batch} for shard in shards]
    assert outer[0] and outer[1]


def test_only_real_and_dataset_objects(files, tiny_tokenizer, make_row, tmp_path):
    validation = Dataset.from_list([make_row(i) for i in range(3)])
    datamodule = BoostDataModule(
        real=files["real"], validation=validation, tokenizer=tiny_tokenizer, batch_size=2, cache_dir=str(tmp_path)
    )
    datamodule.setup("fit")
    batches = training_batches(datamodule)
    assert len(batches) == NUM_REAL // 2 and all((b["inner"]["is_synthetic"] == 0).all() for b in batches)
    assert [b["row_id"].tolist() for b in datamodule.val_dataloader()] == [[0, 1, 2]]
    assert [b["row_id"].tolist() for b in datamodule.predict_dataloader()] == [[0, 1, 2, 3, 4, 5]]
    half = BoostDataModule(
        real=files["real"], validation=validation, tokenizer=tiny_tokenizer, real_fraction=0.5, cache_dir=str(tmp_path)
    )
    with pytest.raises(ValueError, match="no synthetic rows"):
        half.train_dataloader()


def test_predict_split_and_drop_counts(make_datamodule, write_jsonl, make_row):
    long_system = make_row(7)
    long_system["messages"][0]["content"] = "You are in a maze. " * 30
    scored = write_jsonl("score.jsonl", [make_row(0), long_system, make_row(1, source="real")])
    datamodule = make_datamodule(predict=scored, drop_truncated=True, max_length=80)
    datamodule.setup("predict")
    (batch,) = list(datamodule.predict_dataloader())
    assert batch["row_id"].tolist() == [0, 2] and batch["is_synthetic"].tolist() == [1.0, 0.0]
    assert datamodule.num_dropped["predict"] == 1


def test_constructor_checks(files, tiny_tokenizer):
    with pytest.raises(ValueError, match="validation"):
        BoostDataModule(real=files["real"], tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="real or a synthetic"):
        BoostDataModule(validation=files["validation"], tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"real_fraction must be in \[0, 1\]"):
        BoostDataModule(**files, tokenizer=tiny_tokenizer, real_fraction=1.5)


def test_lightning_fit_sets_epochs_and_sees_dict_batches(make_datamodule, tmp_path):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[tuple[int, tuple]] = []

        def training_step(self, batch, batch_idx):
            assert set(batch) == {"inner", "outer"} and batch["outer"]["is_synthetic"].sum() == 0
            self.seen.append((self.current_epoch, tuple(batch["inner"]["row_id"].tolist())))
            return self.weight * batch["inner"]["reward"].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    datamodule = make_datamodule(real_fraction=0.5)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(probe, datamodule=datamodule)
    epochs = [[rows for epoch, rows in probe.seen if epoch == e] for e in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 10  # 2 real + 2 synthetic per batch: 20 synthetic rows in 10 batches
    assert epochs[0] != epochs[1]  # Lightning's set_epoch reached the sampler
