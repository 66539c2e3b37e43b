"""The CLI end to end (fit → validate → predict on the embedded maze data), --help, and every shipped YAML."""

import json
from pathlib import Path

import pytest
import yaml

from boost_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FAST = ["--model.max_inner_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--data.batch_size", "4", "--data.validation_batch_size", "4", "--trainer.enable_progress_bar", "false"]


def scalars(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"])
    return tags


def test_fit_validate_predict_end_to_end(tmp_path, isolated_cache):
    logs = tmp_path / "logs"
    common = ["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.logger.init_args.save_dir", str(logs),
              "--trainer.default_root_dir", str(tmp_path)]
    cli = cli_main(["fit", *common, *FAST, "--diagnostics.every_n_steps", "2"])
    module = cli.model
    assert module.inner_steps == 6 and module.outer_steps == 6
    ckpt = next(logs.rglob("last.ckpt"))
    tags = scalars(logs)
    for key in ("inner/loss", "outer/val_loss", "hypergrad/norm", "weights/ess", "weights/ess_fraction",
                "weights/mean_real", "weights/mean_synthetic", "weights/mass_synthetic", "val/loss",
                "val/token_accuracy", "weights/hist_synthetic"):
        assert key in tags, (key, sorted(tags))
    assert any(t.startswith("weights/generator/") for t in tags), sorted(tags)

    validated = cli_main(["validate", *common, "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "2",
                          "--trainer.enable_progress_bar", "false"])
    assert "val/loss" in validated.trainer.callback_metrics

    out = tmp_path / "weights.jsonl"
    cli_main(["predict", *common, "--ckpt_path", str(ckpt), "--predict_writer.output_path", str(out),
              "--trainer.limit_predict_batches", "3", "--data.validation_batch_size", "4",
              "--trainer.enable_progress_bar", "false"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {"row_id", "task_id", "source", "weight", "score", "features"} <= set(rows[0])
    weights = [r["weight"] for r in rows]
    assert abs(sum(weights) / len(weights) - 1.0) < 1e-5


def test_help_documents_every_knob(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = capsys.readouterr().out
    for knob in ("--model.weighting", "--model.outer_every_n_steps", "--model.hypergradient", "--data.real_fraction",
                 "--data.max_length", "--diagnostics.group_by", "--predict_writer.output_path",
                 "--model.policy_optimizer", "--model.head_optimizer"):
        assert knob in text, knob
    assert "hypergradient" in text and "learned" in text  # docstrings become the help text
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.weighting.help", "boost_lightning.weightings.Learned"])
    assert "--model.weighting.head" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.hypergradient.help", "boost_lightning.bilevel.hypergradient.HypergradientOptions"])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_yaml_opens_with_purpose_and_run_line_and_parses(config):
    lines = config.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20, "first line: what the config is for"
    assert any(line.startswith("# Run: python main.py") for line in lines[:3]), "a run line in the header"
    yaml.safe_load(config.read_text())
    cli = cli_main(["--config", str(config), "--trainer.logger", "false"], run=False)
    assert cli.model is not None and cli.datamodule is not None
