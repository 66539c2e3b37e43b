"""The method × task benchmark's runner: planning, run identity, the CLI command line of a run, and a micro suite
end to end (CLI fit, validate with rollouts, test, predict, reports, plots, resume, README section)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest

from boost_lightning.bench.__main__ import main, shard_arguments
from boost_lightning.bench.suite import (
    MAIN_POOL,
    PRESETS,
    RunContext,
    RunSpec,
    cli_arguments,
    generators,
    is_finished,
    plan,
    pool_file,
    resolve_methods,
    result_path,
)
from boost_lightning.weightings import WEIGHTINGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plan_is_seed_major_and_adds_utility_runs_with_their_reference():
    preset = PRESETS["full"]
    specs = plan(preset, ["maze", "guess_number"], ["uniform", "learned"], seeds=2)
    assert [s.run_id for s in specs[:4]] == ["maze-uniform-s0", "maze-learned-s0", "guess_number-uniform-s0",
                                             "guess_number-learned-s0"]
    assert len(specs) == len({s.run_id for s in specs}) == 8 and all(s.pool == MAIN_POOL for s in specs)
    with_utility = plan(replace(preset, utility_seeds=2), ["maze"], ["uniform", "learned"], seeds=1, utility=True)
    utility = [s for s in with_utility if s.pool != MAIN_POOL]
    maze = generators("maze", preset.budgets["maze"])
    assert {s.pool for s in utility} == set(maze) and len(utility) == 2 * len(maze)
    assert all(s.method == "uniform" for s in utility)
    assert {s.run_id for s in with_utility if s.method == "real_only"} == {"maze-real_only-s0", "maze-real_only-s1"}
    assert RunSpec("maze", "uniform", 3, "hacked-sim").run_id == "maze-uniform-s3-only-hacked-sim"


def test_leave_one_out_runs_drop_one_generator_from_the_pool(tmp_path):
    preset = replace(PRESETS["full"], utility_seeds=2)
    specs = plan(preset, ["maze"], ["learned"], seeds=1, leave_one_out=True)
    maze = generators("maze", preset.budgets["maze"])
    left_out = [s for s in specs if s.pool != MAIN_POOL]
    assert {s.pool for s in left_out} == {f"without-{g}" for g in maze} and len(left_out) == 2 * len(maze)
    assert {s.run_id for s in specs if s.pool == MAIN_POOL and s.method == "uniform"} == {"maze-uniform-s0",
                                                                                           "maze-uniform-s1"}
    assert RunSpec("maze", "uniform", 1, "without-hacked-sim").run_id == "maze-uniform-s1-without-hacked-sim"
    source = tmp_path / "data" / "synthetic.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps({"messages": [], "meta": {"generator": g, "i": i}}) + "\n"
                              for i, g in enumerate(["a", "b", "a", "c"])))

    def generators_of(pool):
        return [(r["meta"]["generator"], r["meta"]["i"])
                for r in map(json.loads, pool_file(source, pool, tmp_path / "pools").read_text().splitlines())]

    assert generators_of("without-a") == [("b", 1), ("c", 3)] and generators_of("a") == [("a", 0), ("a", 2)]
    with pytest.raises(ValueError, match="no rows of generator 'z'"):
        pool_file(source, "without-z", tmp_path / "pools")


def test_resolve_methods():
    assert resolve_methods("all") == [m for m in WEIGHTINGS if m != "fixed"]
    assert {"oracle", "density_ratio", "group", "learned"} <= set(resolve_methods("all"))
    assert resolve_methods("uniform, learned") == ["uniform", "learned"]
    with pytest.raises(ValueError, match="nope"):
        resolve_methods("uniform,nope")
    assert resolve_methods("learned,retrain") == ["learned", "retrain"] and "retrain" not in resolve_methods("all")
    assert resolve_methods("utility_oracle") == ["utility_oracle"] and "utility_oracle" not in resolve_methods("all")


@pytest.fixture
def maze_run(tmp_path):
    """A quick-preset suite context under ``tmp_path`` and maze's embedded splits."""
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path / ".cache", accelerator="cpu")
    files = {name: f"embedded:maze/{name}" for name in ("real", "synthetic", "validation", "test")}
    return PRESETS["quick"], ctx, {**files, "tokenizer": "embedded:maze"}


@pytest.mark.parametrize(("method", "file"), [("retrain", "maze-learned-s1.jsonl"),
                                            ("retrain_alignment", "maze-learned-s1-alignment.jsonl")])
def test_retrain_reads_the_learned_run_of_its_seed_as_a_selection(tmp_path, maze_run, method, file):
    from boost_lightning.cli import cli_main

    preset, ctx, files = maze_run
    with pytest.raises(FileNotFoundError, match=rf"maze-{method}-s1 retrains on the weights of maze-learned-s1"):
        cli_arguments(RunSpec("maze", method, 1), preset, ctx, files)
    weights = tmp_path / "weights" / file
    weights.parent.mkdir()
    weights.write_text("".join(json.dumps({"source": s, "row_id": i, "content_hash": f"h{i}", "weight": w}) + "\n"
                               for i, (s, w) in enumerate([("real", 3.0), ("synthetic", 0.2), ("synthetic", 1.0)])))
    args = cli_arguments(RunSpec("maze", method, 1), preset, ctx, files)
    cli = cli_main([*args, "--trainer.logger=false"], run=False)
    weighting = cli.model.weighting
    assert type(weighting).__name__ == "FixedWeights" and weighting.path == str(weights)
    assert weighting.top_fraction == 0.5 and weighting.equal_weights
    assert sorted(weighting.table.values()) == [0.0, 1.0, 1.0]  # the top half of three rows: round(1.5) = 2 kept
    assert resolve_methods(method) == [method]


def test_retrain_combined_ranks_synthetic_rows_by_the_sum_of_both_rankings(tmp_path, maze_run):
    preset, ctx, files = maze_run
    weights = tmp_path / "weights"
    weights.mkdir()
    # Synthetic rows 0-3: alignment order 0 < 1 < 2 < 3, head order 3 < 2 < 0 < 1; a real row with low scores on both.
    alignment = [("real", 0, -9.0), ("synthetic", 0, 0.1), ("synthetic", 1, 0.2), ("synthetic", 2, 0.3),
                 ("synthetic", 3, 0.4)]
    head = {("real", 0): 0.01, ("synthetic", 0): 0.5, ("synthetic", 1): 0.9, ("synthetic", 2): 0.2,
            ("synthetic", 3): 0.1}
    (weights / "maze-learned-s0-alignment.jsonl").write_text("".join(
        json.dumps({"source": s, "row_id": i, "content_hash": f"{s}{i}", "score": a, "weight": 1.0}) + "\n"
        for s, i, a in alignment))
    (weights / "maze-learned-s0.jsonl").write_text("".join(
        json.dumps({"source": s, "row_id": i, "content_hash": f"{s}{i}", "weight": w}) + "\n"
        for (s, i), w in head.items()))
    args = cli_arguments(RunSpec("maze", "retrain_combined", 0), preset, ctx, files)
    combined = weights / "maze-learned-s0-combined.jsonl"
    assert f"--model.weighting.init_args.path={combined}" in args
    rows = [json.loads(line) for line in combined.read_text().splitlines()]
    # Rank sums 1+3, 2+4, 3+2, 4+1 = 4, 6, 5, 5 (ties in input order): weights 2·rank/5; the real row at 2.
    assert [r["score"] for r in rows] == [0.0, 4.0, 6.0, 5.0, 5.0]
    assert [r["weight"] for r in rows] == pytest.approx([2.0, 0.4, 1.6, 0.8, 1.2])
    (weights / "maze-learned-s1-alignment.jsonl").write_text((weights / "maze-learned-s0-alignment.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match="maze-learned-s1.jsonl"):
        cli_arguments(RunSpec("maze", "retrain_combined", 1), preset, ctx, files)


def test_the_utility_oracle_keeps_the_generators_of_positive_measured_utility(tmp_path, maze_run):
    from boost_lightning.cli import cli_main

    preset, ctx, files = maze_run
    with pytest.raises(FileNotFoundError, match=r"no utility runs of maze: run --tasks maze --utility first"):
        cli_arguments(RunSpec("maze", "utility_oracle", 0), preset, ctx, files)
    runs = tmp_path / "runs"
    runs.mkdir()
    # real_only at 0.3 and 0.5; over the two seeds "good" adds +0.1, "bad" −0.2, "flat" 0 (not kept).
    results = [("real_only", "all", 0.3, 0.5), ("uniform", "good", 0.5, 0.5), ("uniform", "bad", 0.1, 0.3),
               ("uniform", "flat", 0.3, 0.5), ("uniform", "all", 0.9, 0.9)]
    for method, pool, *values in results:
        for seed, value in enumerate(values):
            row = {"task": "maze", "method": method, "seed": seed, "pool": pool, "success_rate": value}
            (runs / f"maze-{method}-{pool}-s{seed}.json").write_text(json.dumps({"row": row}))
    args = cli_arguments(RunSpec("maze", "utility_oracle", 0), preset, ctx, files)
    assert '--model.weighting.init_args.generators=["good"]' in args
    weighting = cli_main([*args, "--trainer.logger=false"], run=False).model.weighting
    assert type(weighting).__name__ == "Oracle" and weighting.generators == {"good"}


def test_a_run_is_the_bench_config_plus_overrides_through_the_cli(tmp_path):
    from boost_lightning.cli import cli_main

    preset = PRESETS["quick"]
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path / ".cache", accelerator="cpu",
                     overrides=("--model.hypergradient.normalize=false",))
    files = {name: f"embedded:maze/{name}" for name in ("real", "synthetic", "validation", "test")}
    files["tokenizer"] = "embedded:maze"
    args = cli_arguments(RunSpec("maze", "return_filter", 2), preset, ctx, files)
    assert args[:2] == ["--config", str(args[1])] and args[1].endswith("configs/bench.yaml")
    assert "--model.weighting=return_filter" in args and "--seed_everything=2" in args
    assert args[-1] == "--model.hypergradient.normalize=false"
    cli = cli_main([*args, "--trainer.logger=false"], run=False)
    assert type(cli.model.weighting).__name__ == "ReturnFilter" and cli.model.hparams.max_inner_steps == 60
    assert cli.config["seed_everything"] == 2 and cli.datamodule.specs["test"] == "embedded:maze/test"
    # learned keeps the config's head (a short name would replace it by a default one)
    learned = cli_arguments(RunSpec("maze", "learned", 0), preset, ctx, files)
    assert not [a for a in learned if a.startswith("--model.weighting")]


def test_results_of_another_budget_or_overrides_are_stale(tmp_path):
    preset = PRESETS["quick"]
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path / ".cache")
    spec = RunSpec("maze", "uniform", 0)
    assert not is_finished(ctx, spec, preset)
    from boost_lightning.bench.suite import identity

    path = result_path(ctx, spec)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"identity": identity(preset, ctx, spec)}))
    assert is_finished(ctx, spec, preset)
    longer = replace(preset, budgets={**preset.budgets, "maze": replace(preset.budgets["maze"], steps=61)})
    assert not is_finished(ctx, spec, longer)
    assert is_finished(ctx, RunSpec("maze", "uniform", 0), replace(preset, seeds=9))  # seeds are not a run's budget
    assert not is_finished(replace(ctx, overrides=("--model.micro_batch_size=2",)), spec, preset)
    assert not is_finished(ctx, spec, replace(preset, episodes=7))


def test_micro_suite_end_to_end_resume_and_readme(tmp_path, capsys):
    args = ["--quick", "--tasks", "maze", "--methods", "uniform,oracle,learned,l2rw", "--seeds", "1", "--steps",
            "3", "--episodes", "2", "--no-progress", "--accelerator", "cpu", "--out", str(tmp_path), "--name",
            "micro"]
    assert main(args) == 0
    suite = tmp_path / "micro"
    runs = sorted((suite / "runs").glob("*.json"))
    assert len(runs) == 4

    with open(suite / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames
    assert columns[:10] == ["task", "method", "seed", "pool", "success_rate", "episodes", "val_loss", "test_nll",
                            "train_seconds", "ess_fraction"]
    assert sorted(r["method"] for r in rows) == sorted(("uniform", "oracle", "learned", "l2rw"))
    for r in rows:
        assert 0.0 <= float(r["success_rate"]) <= 1.0 and r["episodes"] == "2" and r["pool"] == "all"
        assert float(r["test_nll"]) > 0 and float(r["val_loss"]) > 0
    records = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in runs}
    assert all(r["row"]["inner_steps"] == 3 for r in records.values())
    # Common random numbers: the same seed plays the same evaluation instances for every method.
    assert len({len(r["successes"]) for r in records.values()}) == 1
    # The pool's weights come from predict over real + synthetic rows: uniform is flat, the oracle zeroes the rows
    # whose ground truth says they do not help, l2rw has no weights outside a training batch.
    uniform = records["maze-uniform-s0"]["row"]
    assert all(v == pytest.approx(1.0) for k, v in uniform.items() if k.startswith("weight/"))
    oracle = records["maze-oracle-s0"]["row"]
    assert oracle["weight/conflict-swapped-moves"] == pytest.approx(0.0, abs=1e-6) and oracle["weight/real"] > 1
    assert not [k for k in records["maze-l2rw-s0"]["row"] if k.startswith("weight/")]
    learned = records["maze-learned-s0"]
    budget = PRESETS["quick"].budgets["maze"]
    assert len(learned["weights"]["synthetic"]["weight"]) == budget.num_synthetic
    assert len(learned["weights"]["real_weights"]) == budget.num_real

    md = (suite / "results.md").read_text()
    assert "python -m boost_lightning.bench --quick --tasks maze" in md
    assert md.index("Headroom") < md.index("Methods")
    for name in ("success.png", "ess.png"):
        assert (suite / name).read_bytes()[:8] == PNG_MAGIC, name
    assert (suite / "tb" / "maze-learned-s0").is_dir()
    assert "4 runs done, 0 skipped" in capsys.readouterr().out

    # Resume: nothing runs again, result files are untouched, reports are rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs}
    (suite / "results.md").unlink()
    assert main(args) == 0
    assert "0 runs done, 4 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (suite / "runs").glob("*.json")} == mtimes
    assert (suite / "results.md").exists()

    # --report-only --readme: the README's benchmark section and docs/bench are regenerated from the results.
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- bench:results:begin -->\nold\n<!-- bench:results:end -->\n\nafter\n")
    assert main([*args, "--report-only", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "Headroom" in text and text.endswith("after\n")
    assert (tmp_path / "docs" / "bench" / "results.csv").exists()
    assert {p.name: p.stat().st_mtime_ns for p in (suite / "runs").glob("*.json")} == mtimes


def test_worker_processes_get_the_suite_arguments_without_the_parent_only_ones():
    argv = ["--tasks", "maze", "--workers", "2", "--readme", "README.md", "--seeds", "5", "--workers=3",
            "--readme=R.md", "--name", "full"]
    assert shard_arguments(argv) == ["--tasks", "maze", "--seeds", "5", "--name", "full"]
