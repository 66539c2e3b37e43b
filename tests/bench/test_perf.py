"""The step-time / throughput / memory benchmark: its rows, ratios and JSON, on a tiny model (CPU)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from boost_lightning.bench import perf

TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "1", "--vocab-size", "128", "--batch-size", "2",
        "--seq-len", "32", "--steps", "2", "--warmup", "1"]
ROW_KEYS = {"method", "step_s", "tokens_per_s", "peak_mib", "time_x_sft", "tokens_x_sft", "memory_x_sft"}


def printed_rows(out: str) -> dict[str, list[float]]:
    """The printed table as {method: [step s, time x SFT, tokens/s, tokens x SFT, peak MiB, mem x SFT]}."""
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[start + 1:]}


@pytest.fixture()
def in_process(monkeypatch):
    """Measure each method in this process, from the very argv a child process would get (imports are slow).

    A method's second child (the CPU memory measurement) reuses its first measurement.
    """
    children, measured = [], {}

    def child(method, forwarded, env):
        children.append([*forwarded, "--one", method])
        if method not in measured:
            measured[method] = perf.run_one(method, perf.parse_args(children[-1]))
        return dict(measured[method])

    monkeypatch.setattr(perf, "_subprocess", child)
    return children


def test_prints_and_writes_one_row_per_method_with_ratios_against_sft(in_process, tmp_path, capsys):
    out_json = tmp_path / "perf.json"
    rows = perf.main([*TINY, "--accelerator", "cpu", "--methods", "boost_exact_k1+ckpt",
                      "--json", str(out_json)])
    # SFT is measured first even when not asked for: it is the reference of every ratio.
    methods = ["sft", "boost_exact_k1+ckpt"]
    assert [r["method"] for r in rows] == methods
    # On CPU every method runs twice: once timed, once with the allocator set up for memory.
    assert [c[-1] for c in in_process] == [m for m in methods for _ in range(2)]
    assert all("--methods" not in c and c.count("--accelerator") == 1 for c in in_process)

    table = printed_rows(capsys.readouterr().out)
    assert list(table) == methods
    assert table["sft"][1] == table["sft"][3] == 1.0
    for row in rows:
        assert set(row) == ROW_KEYS
        ref = rows[0]
        assert row["time_x_sft"] == pytest.approx(row["step_s"] / ref["step_s"])
        assert table[row["method"]][1] == pytest.approx(row["time_x_sft"], abs=0.006)
    assert rows[0]["time_x_sft"] == rows[0]["tokens_x_sft"] == 1.0
    assert rows[0]["memory_x_sft"] == 1.0 or (rows[0]["peak_mib"] <= 0 and math.isnan(rows[0]["memory_x_sft"]))

    written = json.loads(out_json.read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN / Infinity
    assert [r["method"] for r in written["rows"]] == methods and all(set(r) == ROW_KEYS for r in written["rows"])
    assert [r["time_x_sft"] for r in written["rows"]] == [r["time_x_sft"] for r in rows]
    assert "--methods" in written["command"]


def test_rows_are_sft_first_then_the_methods_asked_for_each_with_its_checkpointed_twin_on_request():
    assert perf.selected_methods(perf.parse_args(["--methods", "boost_k1,sft,boost_k1"])) == ["sft", "boost_k1"]
    args = perf.parse_args(["--methods", "boost_k4", "--compare-checkpointing"])
    assert perf.selected_methods(args) == ["sft", "sft+ckpt", "boost_k4", "boost_k4+ckpt"]


def test_every_method_builds_the_module_it_names():
    args = perf.parse_args(TINY)
    for method, expected in (("sft", ("uniform", None)), ("boost_k4", ("learned", 4)), ("boost_k7", ("learned", 7)),
                             ("boost_exact_k1", ("learned", 1))):
        from boost_lightning.models import PolicyModel

        policy = PolicyModel(config=perf.tiny_config(args), r=2)
        module = perf._build_module(policy, perf.settings_of(method))
        assert module.weighting.learns == (expected[0] == "learned"), method
        if expected[1] is not None:
            assert module.hparams.outer_every_n_steps == expected[1]
    assert module.hypergradient.method == "exact"
    build = lambda method: perf._build_module(PolicyModel(config=perf.tiny_config(args), r=2),  # noqa: E731
                                              perf.settings_of(method))
    assert build("boost_k1").weighting.needs_reference  # the default head reads the reference adapter
    plain = build("boost_k1_policy_features")
    assert not plain.weighting.needs_reference and "excess_loss" not in plain.weighting.input_names
    assert build("boost_k1_cosine").hypergradient.alignment == "cosine"
    frozen = build("boost_k1_reference_frozen")
    assert frozen.weighting.needs_reference and frozen.hparams.reference_steps == 0


@pytest.mark.parametrize("methods", ["sft,boost_k7x", "nope", "boost_k0", "sft,boost_k1+ckpt+ckpt"])
def test_a_method_the_script_does_not_know_is_a_usage_error_naming_it(methods, capsys):
    with pytest.raises(SystemExit) as exit_info:
        perf.parse_args([*TINY, "--methods", methods])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method" in err and methods.split(",")[-1] in err


@pytest.mark.slow
def test_command_line_end_to_end_in_child_processes(tmp_path):
    import subprocess

    out_json = tmp_path / "perf.json"
    done = subprocess.run([sys.executable, "-m", "boost_lightning.bench.perf", *TINY, "--accelerator", "cpu",
                           "--methods", "boost_k1", "--json", str(out_json)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(printed_rows(done.stdout)) == ["sft", "boost_k1"]
    rows = json.loads(out_json.read_text())["rows"]
    assert [set(r) for r in rows] == [ROW_KEYS, ROW_KEYS] and rows[0]["time_x_sft"] == 1.0
