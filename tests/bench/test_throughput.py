"""The throughput benchmark's measurement on a tiny model (CPU), and its command line."""

import pytest

from boost_lightning.bench.module import without_option
from boost_lightning.bench.throughput import parse_args, run_one

TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "1", "--vocab-size", "128", "--batch-size", "2",
        "--seq-len", "32", "--steps", "2", "--warmup", "1", "--device", "cpu"]


@pytest.mark.parametrize("method", ["sft", "boost_k1+ckpt"])
def test_run_one_measures_a_method_through_the_real_training_step(method):
    row = run_one(method, parse_args(TINY))
    assert row["method"] == method
    assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
    assert row["peak_mib"] >= 0


def test_bf16_mixed_precision_runs_on_cpu():
    row = run_one("boost_k1", parse_args([*TINY, "--precision", "bf16-mixed"]))
    assert row["step_s"] > 0


def test_command_line_rejects_unknown_methods_and_strips_parent_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "sft,boost_k7"])
    assert "boost_k7" in capsys.readouterr().err
    argv = ["--methods", "sft", "--steps", "2", "--methods=boost_k1", "--device", "cpu"]
    assert without_option(argv, "--methods") == ["--steps", "2", "--device", "cpu"]
    assert without_option(argv, "--device") == ["--methods", "sft", "--steps", "2", "--methods=boost_k1"]
