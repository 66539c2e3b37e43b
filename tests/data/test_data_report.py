"""The data report (per split, source and generator), the truncation warning, and ``--data.report_only true``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boost_lightning.cli import cli_main
from boost_lightning.data.report import DataReport, percentile
from boost_lightning.data.sources import TruncationWarning, load_split, load_splits, split_row_stats
from boost_lightning.data.trajectory import TrajectoryEncoder

MAX_LENGTH = 140  # rows of up to 3 turns fit (about 39 tokens a turn)


def _rows(make_row) -> dict[str, list[dict]]:
    """Real rows without a generator; synthetic rows of generators ``a`` and ``b`` and one without; ``b`` has a row
    long enough to be truncated and one whose only agent turn sits behind a system prompt longer than the limit."""
    long_system = make_row(13, turns=1, meta={"generator": "b"})
    long_system["messages"][0]["content"] = "You are in a maze. " * 40
    return {
        "real": [make_row(i, turns=1 + i) for i in range(2)],
        "synthetic": [make_row(10, turns=1, meta={"generator": "a"}), make_row(11, turns=2, meta={"generator": "a"}),
                      make_row(12, turns=9, meta={"generator": "b"}), long_system, make_row(14, turns=3)],
        "validation": [make_row(20, turns=2)],
    }


def _expected(tokenizer, rows: list[dict]) -> list[tuple[int, int, int]]:
    """``(tokens, agent tokens, agent tokens lost)`` of each row, straight from the encoder."""
    full = TrajectoryEncoder(tokenizer).encode_batch([r["messages"] for r in rows])
    cut = TrajectoryEncoder(tokenizer, MAX_LENGTH).encode_batch([r["messages"] for r in rows])
    return [(len(f), int(f.agent_mask.sum()), int(f.agent_mask.sum()) - (int(c.agent_mask.sum()) if c else 0))
            for f, c in zip(full, cut)]


def test_percentile_is_nearest_rank():
    values = [5, 1, 4, 2, 3]
    assert [percentile(values, q) for q in (20, 50, 90, 99, 100)] == [1, 3, 5, 5, 5]
    assert percentile(list(range(1, 101)), 90) == 90 and percentile([7], 50) == 7


def test_report_numbers_on_a_hand_made_jsonl(tiny_tokenizer, make_row, write_jsonl, tmp_path):
    rows = _rows(make_row)
    paths = {split: write_jsonl(f"{split}.jsonl", split_rows) for split, split_rows in rows.items()}
    stats = {split: split_row_stats(path, split, tiny_tokenizer, max_length=MAX_LENGTH)
             for split, path in paths.items()}
    report = DataReport.from_row_stats(stats, MAX_LENGTH)
    assert not list(tmp_path.glob("**/*.arrow")), "the in-memory statistics write nothing"

    synthetic = _expected(tiny_tokenizer, rows["synthetic"])
    lengths = sorted(n for n, _, _ in synthetic)
    assert lengths[-2] > MAX_LENGTH >= lengths[-3], "two synthetic rows are longer than max_length"
    whole = report.group("synthetic", "synthetic")
    assert (whole.rows, whole.turns, whole.max_turns) == (5, 1 + 2 + 9 + 1 + 3, 9)
    assert (whole.length_p50, whole.length_p90, whole.length_p99, whole.length_max) == (
        lengths[2], lengths[4], lengths[4], lengths[4])
    assert (whole.truncated, whole.emptied) == (2, 1)
    assert whole.agent_tokens == sum(a for _, a, _ in synthetic)
    assert whole.agent_tokens_lost == sum(lost for _, _, lost in synthetic) > synthetic[3][1], "emptied row included"

    a, b, none = (report.group("synthetic", "synthetic", g) for g in ("a", "b", "(none)"))
    assert (a.rows, a.turns, a.truncated, a.agent_tokens_lost) == (2, 3, 0, 0)
    assert (a.length_p50, a.length_max) == (synthetic[0][0], synthetic[1][0])
    assert (b.rows, b.turns, b.truncated, b.emptied) == (2, 10, 2, 1)
    assert b.agent_tokens_lost == synthetic[2][2] + synthetic[3][2] and synthetic[3][2] == synthetic[3][1]
    assert (none.rows, none.length_max, none.truncated) == (1, synthetic[4][0], 0)

    real = report.group("real", "real")
    assert (real.rows, real.turns, real.truncated) == (2, 3, 0)
    assert real.length_max == max(n for n, _, _ in _expected(tiny_tokenizer, rows["real"]))
    with pytest.raises(KeyError):
        report.group("real", "real", "a")  # no generator in the real rows: no generator lines
    assert [(g.split, g.source, g.generator) for g in report.groups] == [
        ("real", "real", None), ("synthetic", "synthetic", None), ("synthetic", "synthetic", "(none)"),
        ("synthetic", "synthetic", "a"), ("synthetic", "synthetic", "b"), ("validation", "real", None)]

    text = report.to_markdown()
    assert text.startswith(f"Data report (max_length={MAX_LENGTH} tokens)")
    cells = {tuple(c.strip() for c in line.strip("|").split("|"))[:3]: [c.strip() for c in line.strip("|").split("|")]
             for line in text.splitlines() if line.startswith("|")}
    assert cells[("synthetic", "synthetic", "b")][3:] == [
        "2", "5.0 / 9", f"{b.length_p50:,}", f"{b.length_p90:,}", f"{b.length_p99:,}", f"{b.length_max:,}", "2 (100%)",
        "1", f"{b.agent_tokens_lost:,} ({b.agent_tokens_lost / b.agent_tokens:.1%})"]

    # Loading the splits gathers the same statistics into the cache entry (the report of a fit reads them there).
    with pytest.warns(TruncationWarning):
        loaded = load_splits(paths, tiny_tokenizer, max_length=MAX_LENGTH, drop_truncated=True,
                             cache_dir=tmp_path / "cache")
    assert {name: split.row_stats for name, split in loaded.items()} == stats
    assert loaded["synthetic"].num_agent_tokens_lost == whole.agent_tokens_lost


def test_a_mixed_split_gets_an_all_line(tiny_tokenizer, make_row, write_jsonl):
    path = write_jsonl("synthetic.jsonl", [make_row(0, source="real"), make_row(1), make_row(2)])
    report = DataReport.from_row_stats({"synthetic": split_row_stats(path, "synthetic", tiny_tokenizer)}, 512)
    assert [(g.source, g.rows) for g in report.groups] == [("all", 3), ("real", 1), ("synthetic", 2)]


def test_truncation_warns_with_split_count_share_and_agent_tokens_lost(tiny_tokenizer, make_row, write_jsonl,
                                                                       tmp_path):
    rows = [make_row(i, turns=9 if i < 2 else 1) for i in range(5)]
    path = write_jsonl("synthetic.jsonl", rows)
    lost = sum(lost for _, _, lost in _expected(tiny_tokenizer, rows))
    total = sum(agent for _, agent, _ in _expected(tiny_tokenizer, rows))
    assert lost > 0
    for _ in range(2):  # built, then read from the cache: both warn
        with pytest.warns(TruncationWarning) as caught:
            loaded = load_split(path, "synthetic", tiny_tokenizer, max_length=MAX_LENGTH, cache_dir=tmp_path / "c")
        message = str(caught[0].message)
        assert "2 of 5 rows of the synthetic split (40%)" in message and f"max_length={MAX_LENGTH}" in message
        assert f"{lost} of {total} agent tokens ({lost / total:.1%}) are lost" in message
        assert "synthetic.jsonl" in message and "--data.report_only true" in message
        assert (loaded.num_truncated, loaded.num_agent_tokens_lost, loaded.num_agent_tokens) == (2, lost, total)


# ---- the command line ------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_config(tmp_path, make_row, write_jsonl, tiny_tokenizer, tiny_llama_config, monkeypatch):
    """A tiny CPU fit config (JSONL splits, tokenizer and Llama in ``tmp_path``; cwd ``tmp_path/cwd``); its path."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = _rows(make_row)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "val_check_interval": 1, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {"policy": {"class_path": "boost_lightning.models.PolicyModel",
                             "init_args": {"config": tiny_llama_config, "r": 4, "lora_alpha": 8}},
                  "weighting": "uniform"},
        "data": {**{split: write_jsonl(f"{split}.jsonl", split_rows) for split, split_rows in rows.items()},
                 "tokenizer": str(tmp_path / "tokenizer"), "batch_size": 2, "validation_batch_size": 1,
                 "max_length": MAX_LENGTH, "drop_truncated": True, "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def test_report_only_prints_the_report_and_exits_without_training(tiny_config, tmp_path, capsys):
    root = tmp_path / "run"
    before = set(tmp_path.rglob("*"))
    cli = cli_main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(root),
                    "--data.report_only", "true"])
    out = capsys.readouterr().out
    assert f"Data report (max_length={MAX_LENGTH} tokens)" in out
    assert "| synthetic  | synthetic | b " in out and "| validation | real " in out
    assert cli.model is None and cli.trainer is None, "no model built, no training"
    assert set(tmp_path.rglob("*")) == before, "nothing written: no logs, checkpoints, config or cache"
    assert not root.exists() and not (Path.cwd() / "logs").exists()


def test_fit_writes_the_report_to_tensorboard(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.warns(TruncationWarning, match="synthetic split"):
        cli = cli_main(["fit", "--config", str(tiny_config), "--trainer.default_root_dir", str(tmp_path / "run")])
    events = EventAccumulator(str(cli.trainer.log_dir)).Reload()
    assert "data/report/text_summary" in events.Tags()["tensors"]
    (event,) = events.Tensors("data/report/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 0 and text == cli.datamodule.report().to_markdown()
