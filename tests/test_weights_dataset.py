"""Weights as a dataset: ``predict`` writes the input rows back with their weights (JSONL, Parquet, saved dataset), and
``FixedWeights`` trains on them (by row_id or content hash, optionally the top fraction only)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_from_disk
from lightning.pytorch import Callback, Trainer

from boost_lightning.callbacks import TrajectoryWeightWriter
from boost_lightning.cli import cli_main
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.data.sources import content_hash
from boost_lightning.weightings import FixedWeights, Learned
from boost_lightning.weightings.from_file import MissingWeightError

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SUFFIX = {"jsonl": "weights.jsonl", "parquet": "weights.parquet", "dataset": "weights"}


@pytest.fixture()
def inputs(make_row, write_jsonl):
    """Real rows with a user field, synthetic rows without ``source`` and with another user field, validation rows."""
    real = [make_row(i, turns=1 + i % 3, source="real", annotator=f"ann-{i}") for i in range(4)]
    synthetic = [make_row(100 + i, turns=1 + i % 2, reward=i / 5, difficulty=i) for i in range(6)]
    validation = [make_row(200 + i) for i in range(3)]
    return {"rows": {"real": real, "synthetic": synthetic},
            "real": write_jsonl("real.jsonl", real), "synthetic": write_jsonl("synthetic.jsonl", synthetic),
            "validation": write_jsonl("validation.jsonl", validation)}


@pytest.fixture()
def make_datamodule(inputs, tiny_tokenizer, tmp_path):
    def make(**kwargs) -> BoostDataModule:
        specs = {name: inputs[name] for name in ("real", "synthetic", "validation")}
        return BoostDataModule(**{**specs, "tokenizer": tiny_tokenizer, "batch_size": 4, "validation_batch_size": 3,
                                  "max_length": 128, "cache_dir": str(tmp_path / "cache"), **kwargs})

    return make


@pytest.fixture()
def scoring_module(make_module):
    """A module whose learned head is moved off its zero-initialised (uniform) start, so weights differ per row."""
    from boost_lightning.models import WeightHead

    module = make_module(Learned(WeightHead(seed=0)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in module.weighting.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def predict(module, datamodule, path: Path, **writer_kwargs) -> TrajectoryWeightWriter:
    writer = TrajectoryWeightWriter(str(path), **writer_kwargs)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer


def read_back(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return load_from_disk(str(path)).to_list()


def training_rows(datamodule: BoostDataModule) -> list[dict]:
    """Every inner batch of one training epoch (each real and synthetic row once, natural mix)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iter(loader)
    return [batch["inner"] for batch, _, _ in loader]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dataset"])
def test_predict_train_writes_every_input_row_back_with_its_weight_and_fixed_weights_reads_them(
        fmt, make_datamodule, scoring_module, inputs, tmp_path):
    path = tmp_path / SUFFIX[fmt]
    writer = predict(scoring_module, make_datamodule(predict="train"), path)
    assert writer.written_to == path and writer.resolve_format(path) == fmt
    rows = read_back(path)

    # Real and synthetic rows in one file, in input order, every original field kept (extra user fields included).
    assert [(r["split"], r["row_id"]) for r in rows] == [("real", i) for i in range(4)] + [
        ("synthetic", i) for i in range(6)]
    for row in rows:
        original = inputs["rows"][row["split"]][row["row_id"]]
        for name, value in original.items():
            assert row[name] == value, (name, row["split"], row["row_id"])
        assert row["source"] == row["split"]  # implied by the split where the input row has none
        assert row["content_hash"] == content_hash(original["messages"])
        assert set(row["features"]) == {"loss", "surprise", "reward", "source", "length", "turns", "excess_loss",
                                        "reference_surprise"}
    assert all("annotator" in r for r in rows[:4]) and all("difficulty" in r for r in rows[4:])

    # One scale over real and synthetic rows: mean 1 over the file, and the rows do differ.
    weights = torch.tensor([r["weight"] for r in rows], dtype=torch.float64)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.std().item() > 0.05

    # The file is a trajectory dataset again (a training split reads it), and FixedWeights gives every training row
    # its weight back, by row_id and by content hash.
    expected = {(r["source"] == "synthetic", r["row_id"]): r["weight"] for r in rows}
    for key in ("row_id", "hash"):
        weighting = FixedWeights(str(path), key=key)
        seen = set()
        for batch in training_rows(make_datamodule()):
            keys = list(zip((batch["is_synthetic"] > 0.5).tolist(), batch["row_id"].tolist()))
            got = weighting(weighting.inputs(None, batch))
            torch.testing.assert_close(got, torch.tensor([expected[k] for k in keys]), rtol=1e-6, atol=0)
            seen.update(keys)
        assert seen == set(expected), key


def test_written_file_loads_as_a_training_split(make_datamodule, scoring_module, tmp_path):
    path = tmp_path / "weights.parquet"
    predict(scoring_module, make_datamodule(), path)  # the default: the synthetic split
    datamodule = make_datamodule(synthetic=str(path))
    datamodule.setup("fit")
    assert len(datamodule.splits["synthetic"].dataset) == 6


def test_fit_with_fixed_weights_trains_each_row_at_its_file_weight(make_datamodule, scoring_module, make_module,
                                                                   tmp_path):
    path = tmp_path / "weights.parquet"
    predict(scoring_module, make_datamodule(predict="train"), path)
    rows = read_back(path)
    expected = {(r["source"] == "synthetic", r["row_id"]): r["weight"] for r in rows}

    class Record(Callback):
        def __init__(self):
            self.seen: list[tuple[tuple[bool, int], float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            inner = batch["inner"]
            keys = zip((inner["is_synthetic"] > 0.5).tolist(), inner["row_id"].tolist())
            self.seen += list(zip(keys, outputs["weights"].tolist()))

    record = Record()
    module = make_module(FixedWeights(str(path)))
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_epochs=1, callbacks=[record], num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, datamodule=make_datamodule())
    assert module.inner_steps == 3 and module.outer_steps == 0  # nothing learned at the outer level
    assert {k for k, _ in record.seen} == set(expected)
    for key, weight in record.seen:
        assert weight == pytest.approx(expected[key], rel=1e-6)


def fit_recording_weights(module, datamodule) -> list[tuple[tuple[bool, int], float]]:
    """Fit ``module`` for one epoch and return ((is synthetic, row_id), weight) of every trained row."""
    seen: list[tuple[tuple[bool, int], float]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            inner = batch["inner"]
            keys = zip((inner["is_synthetic"] > 0.5).tolist(), inner["row_id"].tolist())
            seen.extend(zip(keys, outputs["weights"].tolist()))

    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_epochs=1, callbacks=[Record()], num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return seen


def test_a_file_missing_training_rows_stops_before_the_first_step(make_datamodule, scoring_module, make_module,
                                                                  tmp_path):
    path = tmp_path / "weights.jsonl"
    predict(scoring_module, make_datamodule(predict="train"), path)
    lines = path.read_text().splitlines()
    dropped = json.loads(lines[-1])
    path.write_text("\n".join(lines[:-1]) + "\n")
    module = make_module(FixedWeights(str(path)))
    before = {n: p.detach().clone() for n, p in module.policy.trainable_named_parameters().items()}
    with pytest.raises(MissingWeightError, match=rf"no weight for 1 of the 10 training rows \(synthetic hash "
                                                 rf"{dropped['content_hash']}\)"):
        fit_recording_weights(module, make_datamodule())
    assert module.inner_steps == 0
    for name, p in module.policy.trainable_named_parameters().items():
        assert torch.equal(p, before[name]), name


def test_top_fraction_trains_on_full_batches_of_the_rows_it_keeps(make_datamodule, scoring_module, make_module,
                                                                   tmp_path):
    path = tmp_path / "weights.parquet"
    predict(scoring_module, make_datamodule(predict="train"), path)
    rows = read_back(path)
    weighting = FixedWeights(str(path), top_fraction=0.5)
    kept = {k: w for k, w in weighting.table.items() if w > 0}
    assert 0 < len(kept) < len(rows)
    keys = {(r["source"] == "synthetic", r["content_hash"]): (r["source"] == "synthetic", r["row_id"]) for r in rows}
    expected = {keys[k]: w for k, w in kept.items()}
    seen = fit_recording_weights(make_module(weighting), make_datamodule())
    assert {k for k, _ in seen} == set(expected)  # no dropped row takes a batch slot
    assert all(w == pytest.approx(expected[k], rel=1e-6) for k, w in seen)


def write_weights(path: Path, rows: list[tuple[str, int, str, float]]) -> str:
    path.write_text("".join(json.dumps({"source": s, "row_id": i, "content_hash": h, "weight": w}) + "\n"
                            for s, i, h, w in rows))
    return str(path)


def batch_of(sources: list[str], row_ids: list[int], hashes: list[str]) -> dict:
    return {"is_synthetic": torch.tensor([float(s == "synthetic") for s in sources]),
            "row_id": torch.tensor(row_ids), "content_hash": hashes}


def test_top_fraction_keeps_the_heaviest_rows_of_the_file_at_their_weight(tmp_path):
    path = write_weights(tmp_path / "w.jsonl", [("real", 0, "a", 2.0), ("synthetic", 0, "b", 0.5),
                                                ("synthetic", 1, "c", 1.0), ("synthetic", 2, "d", 0.5)])
    batch = batch_of(["real", "synthetic", "synthetic", "synthetic"], [0, 0, 1, 2], ["a", "b", "c", "d"])
    full = FixedWeights(path)
    assert full(full.inputs(None, batch)).tolist() == [2.0, 0.5, 1.0, 0.5]
    half = FixedWeights(path, top_fraction=0.5)
    assert half(half.inputs(None, batch)).tolist() == [2.0, 0.0, 1.0, 0.0]
    # Ties at the cut are kept: the top 3 of 4 include both 0.5 rows.
    three = FixedWeights(path, key="row_id", top_fraction=0.75)
    assert three(three.inputs(None, batch)).tolist() == [2.0, 0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="top_fraction"):
        FixedWeights(path, top_fraction=0.0)


def test_equal_weights_turn_the_file_into_a_selection(tmp_path):
    path = write_weights(tmp_path / "w.jsonl", [("real", 0, "a", 2.0), ("synthetic", 0, "b", 0.5),
                                                ("synthetic", 1, "c", 1.0), ("synthetic", 2, "d", 0.0)])
    batch = batch_of(["real", "synthetic", "synthetic", "synthetic"], [0, 0, 1, 2], ["a", "b", "c", "d"])
    every = FixedWeights(path, equal_weights=True)  # a zero in the file stays out
    assert every(every.inputs(None, batch)).tolist() == [1.0, 1.0, 1.0, 0.0]
    half = FixedWeights(path, top_fraction=0.5, equal_weights=True)
    assert half(half.inputs(None, batch)).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert half.select({"is_synthetic": [0.0, 1.0, 1.0, 1.0], "content_hash": ["a", "b", "c", "d"],
                        "row_id": [0, 0, 1, 2]}) == [True, False, True, False]


def test_a_training_row_without_a_weight_stops_with_the_file_and_the_rows(tmp_path):
    path = write_weights(tmp_path / "w.jsonl", [("real", 0, "a", 1.0), ("synthetic", 0, "b", 1.0)])
    # Same ids, other source: a real row 0 is not the synthetic row 0.
    batch = batch_of(["real", "synthetic", "real"], [0, 7, 1], ["a", "zz", "b"])
    with pytest.raises(MissingWeightError, match=r"w\.jsonl: no weight for 2 of the 3 rows.*synthetic hash zz, "
                                                 r"real hash b"):
        FixedWeights(path).inputs(None, batch)
    with pytest.raises(MissingWeightError, match=r"w\.jsonl: .*synthetic row_id 7, real row_id 1"):
        FixedWeights(path, key="row_id").inputs(None, batch)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        FixedWeights(str(tmp_path / "nope.parquet"))
    (tmp_path / "old.jsonl").write_text(json.dumps({"source": "real", "row_id": 0, "weight": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"old\.jsonl:1: no 'content_hash' field"):
        FixedWeights(str(tmp_path / "old.jsonl"))
    negative = write_weights(tmp_path / "neg.jsonl", [("real", 0, "a", -1.0)])
    with pytest.raises(ValueError, match=r"neg\.jsonl \(row 0\): field 'weight'"):
        FixedWeights(negative)


def test_row_id_key_refuses_a_file_where_two_rows_share_an_id_and_hash_key_averages_duplicates(tmp_path):
    path = write_weights(tmp_path / "w.jsonl", [("real", 0, "a", 1.0), ("real", 0, "b", 3.0),
                                                ("real", 1, "a", 2.0)])
    with pytest.raises(ValueError, match="share row_id 0.*key='hash'"):
        FixedWeights(path, key="row_id")
    weighting = FixedWeights(path)  # the two rows with content "a" share the mean of their weights
    assert weighting(weighting.inputs(None, batch_of(["real", "real"], [5, 6], ["a", "b"]))).tolist() == [1.5, 3.0]


def test_real_rows_in_the_synthetic_file_join_to_their_own_input_rows(make_row, write_jsonl, make_datamodule,
                                                                      scoring_module, tmp_path):
    # Synthetic row 1 is a real row: under `predict=train` it shares (source, row_id) with real row 1.
    synthetic = [make_row(300 + i, note=f"s{i}", **({"source": "real"} if i == 1 else {})) for i in range(3)]
    datamodule = make_datamodule(synthetic=write_jsonl("mixed.jsonl", synthetic), predict="train")
    path = tmp_path / "weights.jsonl"
    predict(scoring_module, datamodule, path)
    rows = read_back(path)
    mixed = [r for r in rows if r["split"] == "synthetic"]
    assert [(r["row_id"], r["source"], r["note"]) for r in mixed] == [(0, "synthetic", "s0"), (1, "real", "s1"),
                                                                       (2, "synthetic", "s2")]
    assert all(r["content_hash"] == content_hash(r["messages"]) for r in rows)
    with pytest.raises(ValueError, match="share row_id 1"):
        FixedWeights(str(path), key="row_id")
    weighting = FixedWeights(str(path))
    real_row_1 = next(r for r in rows if r["split"] == "real" and r["row_id"] == 1)
    batch = batch_of(["real", "real"], [1, 1], [real_row_1["content_hash"], mixed[1]["content_hash"]])
    assert weighting(weighting.inputs(None, batch)).tolist() == pytest.approx([real_row_1["weight"],
                                                                               mixed[1]["weight"]])


def test_format_follows_the_suffix_unless_given_and_a_foreign_directory_is_not_replaced(tmp_path, make_datamodule,
                                                                                        scoring_module):
    writer = TrajectoryWeightWriter()
    assert [writer.resolve_format(p) for p in ("a.jsonl", "b.parquet", "c", "d.v2")] == ["jsonl", "parquet",
                                                                                         "dataset", "dataset"]
    assert TrajectoryWeightWriter(format="parquet").resolve_format("weights.out") == "parquet"
    with pytest.raises(ValueError, match="format"):
        TrajectoryWeightWriter(format="csv")
    predict(scoring_module, make_datamodule(), tmp_path / "weights.out", format="parquet")
    assert len(pq.read_table(tmp_path / "weights.out")) == 6
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved dataset"):
        predict(scoring_module, make_datamodule(), mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    predict(scoring_module, make_datamodule(), tmp_path / "ds")
    predict(scoring_module, make_datamodule(predict="train"), tmp_path / "ds")  # a saved dataset is replaced
    assert len(load_from_disk(str(tmp_path / "ds"))) == 10


# ---- the documented two-command path on the command line ------------------------------------------------------------
def test_score_with_boost_then_train_on_the_weights_from_the_command_line(inputs, tiny_cli_config, tmp_path):
    config = tiny_cli_config(
        data={split: inputs[split] for split in ("real", "synthetic", "validation")},
        trainer={"max_steps": 6, "log_every_n_steps": 1,
                 "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                "init_args": {"save_last": True}}]},
        model={"head_optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}}})
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    cli_main(["fit", "--config", "config.yaml", *QUIET])

    # 1. score every real and synthetic row with the trained head (README: "Score with BOOST, then train anything").
    cli_main(["predict", "--config", "config.yaml", "--ckpt_path", "last", "--data.predict", "train",
              "--predict_writer.output_path", "weights.parquet", *QUIET])
    rows = read_back(tmp_path / "weights.parquet")
    assert len(rows) == 10 and {r["split"] for r in rows} == {"real", "synthetic"}
    assert len({r["weight"] for r in rows}) == 10  # the trained head tells the rows apart

    # 2. train a fresh policy on the weighted data (or on the top half only).
    cli = cli_main(["fit", "--config", "config.yaml", "--model.weighting", "boost_lightning.weightings.FixedWeights",
                    "--model.weighting.init_args.path", "weights.parquet", *QUIET])
    assert isinstance(cli.model.weighting, FixedWeights) and cli.model.weighting.key == "hash"
    assert cli.model.inner_steps == 6 and cli.model.outer_steps == 0  # one optimizer: max_steps are policy steps
    cli = cli_main(["--config", "config.yaml", "--model.weighting", "boost_lightning.weightings.FixedWeights",
                    "--model.weighting.path", "weights.parquet", "--model.weighting.top_fraction", "0.5"], run=False)
    assert cli.model.weighting.top_fraction == 0.5
    assert sum(w > 0 for w in cli.model.weighting.table.values()) == 5


def test_the_readme_commands_parse_with_the_quickstart_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_weights(tmp_path / "weights.jsonl", [("real", 0, "a", 1.0)])
    quickstart = str(ROOT / "configs/quickstart.yaml")
    cli = cli_main(["--config", quickstart, "--data.predict", "train", "--predict_writer.output_path",
                    "weights.parquet"], run=False)
    assert cli.datamodule.predict_splits == ["real", "synthetic"]
    cli = cli_main(["--config", quickstart, "--model.weighting", "boost_lightning.weightings.FixedWeights",
                    "--model.weighting.init_args.path", "weights.jsonl"], run=False)
    assert isinstance(cli.model.weighting, FixedWeights) and not cli.model.weighting.learns

    # The recommended recipe: score under reweight: synthetic, then retrain uniformly on the top half.
    cli = cli_main(["--config", quickstart, "--name", "score",
                    "--model.weighting.init_args.head.init_args.reweight", "synthetic"], run=False)
    assert cli.model.weighting.head.reweight == "synthetic" and cli.trainer.logger.name == "score"
    cli = cli_main(["--config", quickstart, "--name", "retrain",
                    "--model.weighting", "boost_lightning.weightings.FixedWeights",
                    "--model.weighting.init_args.path", "weights.jsonl", "--model.weighting.init_args.top_fraction",
                    "0.5", "--model.weighting.init_args.equal_weights", "true"], run=False)
    weighting = cli.model.weighting
    assert weighting.top_fraction == 0.5 and weighting.equal_weights and cli.trainer.logger.name == "retrain"


def test_alignment_writer_ranks_every_pool_row_by_its_alignment_at_the_trained_policy(make_datamodule, make_module,
                                                                                       inputs, tmp_path):
    from boost_lightning.bilevel.policy import row_alignment, validation_direction
    from boost_lightning.bilevel.preconditioner import adam_preconditioner
    from boost_lightning.callbacks import AlignmentWriter

    path = tmp_path / "alignment.jsonl"
    writer = AlignmentWriter(str(path), keep_real=False)
    module = make_module("uniform", policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    datamodule = make_datamodule(predict="train")
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, max_steps=2, callbacks=[writer], num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    rows = read_back(path)
    # Every real and synthetic input row once, with its own fields, in input order.
    assert [(r["source"], r["row_id"]) for r in rows] == [("real", i) for i in range(4)] + [
        ("synthetic", i) for i in range(6)]
    assert [r["annotator"] for r in rows[:4]] == [f"ann-{i}" for i in range(4)]
    # By hand at the trained policy: Adam-preconditioned validation gradient, a forward difference per row.
    policy = module.policy.eval()
    params = policy.trainable_named_parameters()
    direction = validation_direction(policy, params, list(datamodule.val_dataloader()),
                                     adam_preconditioner(trainer.optimizers[0], list(params.values())))
    expected = row_alignment(policy, params, direction, list(datamodule.predict_dataloader()))
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    # Weights are the ranks of the alignment: ordered as it, mean 1, so FixedWeights' top fraction keeps the best.
    weights = torch.tensor([r["weight"] for r in rows])
    assert sorted(weights.tolist()) == pytest.approx([2 * k / 11 for k in range(1, 11)])
    assert torch.argsort(weights).tolist() == torch.argsort(expected).tolist()
    kept = FixedWeights(str(path), key="row_id", top_fraction=0.5, equal_weights=True)
    assert kept is not None and writer.written_to == path


def test_alignment_ranks_keep_real_rows_above_every_synthetic_row():
    from boost_lightning.callbacks import alignment_ranks

    scores, synthetic = [5.0, -1.0, 3.0, 0.0, 9.0], [False, False, True, True, True]
    assert alignment_ranks(scores, synthetic, keep_real=False) == pytest.approx([2 * r / 6 for r in (4, 1, 3, 2, 5)])
    # The synthetic rows ranked among themselves (n = 3); the real ones, even the worst aligned, at 2.
    assert alignment_ranks(scores, synthetic) == pytest.approx([2.0, 2.0, 1.0, 0.5, 1.5])


def test_score_by_alignment_then_retrain_on_the_top_half_from_the_command_line(inputs, tiny_cli_config, tmp_path):
    config = tiny_cli_config(
        data={split: inputs[split] for split in ("real", "synthetic", "validation")},
        trainer={"max_steps": 4, "log_every_n_steps": 1})
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    # 1. the BOOST run, scoring every real and synthetic row by its alignment once training ends (README recipe).
    cli_main(["fit", "--config", "config.yaml", "--data.predict", "train",
              "--trainer.callbacks+=boost_lightning.callbacks.AlignmentWriter",
              "--trainer.callbacks.output_path", "alignment.jsonl", *QUIET])
    rows = read_back(tmp_path / "alignment.jsonl")
    assert len(rows) == 10 and {r["split"] for r in rows} == {"real", "synthetic"}
    assert all("alignment" in r["features"] for r in rows)
    assert [r["weight"] for r in rows if r["source"] == "real"] == [2.0] * 4  # real rows are never dropped
    # 2. a fresh policy on the top half, every kept row at weight 1: the 4 real rows and the best synthetic one.
    cli = cli_main(["fit", "--config", "config.yaml", "--model.weighting", "boost_lightning.weightings.FixedWeights",
                    "--model.weighting.init_args.path", "alignment.jsonl",
                    "--model.weighting.init_args.top_fraction", "0.5",
                    "--model.weighting.init_args.equal_weights", "true", *QUIET])
    assert sorted(cli.model.weighting.table.values()) == [0.0] * 5 + [1.0] * 5
    assert cli.model.inner_steps == 4 and cli.model.outer_steps == 0
