"""The method × task benchmark: report math, planning, and a micro suite end to end (train, rollout, reports,
plots, resume)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest

from boost_lightning.bench.__main__ import main
from boost_lightning.bench.report import (
    fmt_ci,
    mean_ci,
    rankdata,
    spearman,
    t_quantile_975,
    weight_analysis,
)
from boost_lightning.bench.suite import PRESETS, RunContext, RunSpec, is_finished, plan, resolve_methods, result_path
from boost_lightning.weightings import WEIGHTINGS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def md_tables(md: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, separator dropped), emphasis and code marks stripped."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip().strip("*`").strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                if not previous.startswith("|"):
                    tables.append([])
                tables[-1].append(cells)
        previous = line
    return tables


def md_table(md: str, header: list[str]) -> dict[str, list[str]]:
    """The one table whose header is ``header``, as {first cell: the other cells}."""
    found = [t for t in md_tables(md) if t[0] == header]
    assert len(found) == 1, (header, [t[0] for t in md_tables(md)])
    return {row[0]: row[1:] for row in found[0][1:]}


def number_ci(cell: str) -> tuple[float, float]:
    """``"37.5 ± 158.8"`` → (37.5, 158.8); ``"37.5"`` → (37.5, nan)."""
    mean, _, half = cell.partition("±")
    return float(mean), float(half) if half.strip() else math.nan


def test_mean_ci_on_hand_values():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # sd = 1, n = 3: half-width = t_{0.975, 2} / sqrt(3) = 4.303 / 1.732
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    mean, half = mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)
    assert mean_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.0))
    assert fmt_ci(*mean_ci([0.25, 0.5])) == "37.5 ± 158.8"
    assert fmt_ci(0.3125, math.nan) == "31.2"


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30, 60, 120, 500):
        exact = float(stats.t.ppf(0.975, df))
        # Between tabulated df the table takes the smaller df: never narrower than the exact interval.
        assert t_quantile_975(df) >= exact - 1e-3
        assert t_quantile_975(df) == pytest.approx(exact, abs=0.05)


def test_spearman_on_hand_values_with_ties():
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # Ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 → ρ = 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 50), rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_weight_analysis_on_hand_values():
    weights = {
        "real_weights": [2.0, 2.0],
        "synthetic": {"weight": [1.5, 1.0, 0.5, 0.25, 0.25],
                      "quality": [1.0, 0.5, 0.2, 0.0, 0.0],
                      "generator": ["a", "b", "c", "shifted-x", "hallucinated-sim"],
                      "shifted": [False, False, False, True, False],
                      "hallucinated": [False, False, False, False, True]},
        "pool_ess_fraction": 0.8,
    }
    a = weight_analysis(weights)
    assert a["weight_on_distribution"] == pytest.approx(1.0)
    assert a["shifted_ratio"] == pytest.approx(0.25)
    assert a["hallucinated_ratio"] == pytest.approx(0.25)
    assert a["mass_real"] == pytest.approx(4.0 / 7.5)
    assert a["share_real"] == pytest.approx(2 / 7)
    assert a["spearman_quality"] == pytest.approx(spearman([1.5, 1.0, 0.5, 0.25, 0.25], [1.0, 0.5, 0.2, 0.0, 0.0]))
    assert a["spearman_quality"] == pytest.approx(1.0)
    assert a["spearman_on_distribution"] == pytest.approx(1.0)  # the three on-distribution rows alone
    weights["synthetic"]["weight"] = [0.5, 1.0, 1.5, 3.0, 3.0]
    assert weight_analysis(weights)["spearman_on_distribution"] == pytest.approx(-1.0)


def test_plan_covers_the_grid_and_merges_ablation_points():
    preset = PRESETS["full"]
    specs = plan(preset, ["maze", "guess_number"], ["uniform", "learned"], seeds=2)
    ids = [s.run_id for s in specs]
    assert len(ids) == len(set(ids))
    main_runs = [s for s in specs if "main" in s.axes]
    assert len(main_runs) == 2 * 2 * 2
    # The ablation's default-composition points are main runs (seed 0 on the first task), not extra runs.
    default = next(s for s in specs if s.run_id == "maze-learned-s0-sf0.3-n2000-reg0")
    assert {"main", "shifted", "pool", "regularizer"} <= set(default.axes)
    shifted = sorted(s.shifted_fraction for s in specs if "shifted" in s.axes and s.method == "uniform")
    assert shifted == [0.0, 0.3, 0.6]
    strengths = sorted(s.regularizer_strength for s in specs if "regularizer" in s.axes)
    assert strengths == list(preset.ablation_strengths)
    assert all(s.task == "maze" for s in specs if s.axes != ("main",))
    assert not [s for s in plan(preset, ["maze"], ["uniform"], seeds=1, ablation=False) if s.axes != ("main",)]


def test_resolve_methods():
    assert resolve_methods("all") == list(WEIGHTINGS)
    assert resolve_methods("uniform, learned") == ["uniform", "learned"]
    with pytest.raises(ValueError, match="nope"):
        resolve_methods("uniform,nope")


def test_micro_suite_end_to_end_and_resume(tmp_path, capsys):
    import matplotlib.image

    args = ["--quick", "--tasks", "maze", "--methods", "uniform,learned", "--seeds", "2", "--steps", "3",
            "--episodes", "2", "--no-ablation", "--no-progress", "--accelerator", "cpu", "--out", str(tmp_path),
            "--name", "micro"]
    assert main(args) == 0
    suite = tmp_path / "micro"
    runs = sorted((suite / "runs").glob("*.json"))
    assert len(runs) == 4

    with open(suite / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("learned", "0"), ("learned", "1"),
                                                            ("uniform", "0"), ("uniform", "1")]
    for r in rows:
        assert 0.0 <= float(r["success_rate"]) <= 1.0
        assert r["inner_steps"] == "3"
    learned = [r for r in rows if r["method"] == "learned"]
    assert all(r["outer_steps"] == "3" and r["spearman_quality"] != "" for r in learned)
    assert all(r["spearman_quality"] == "" for r in rows if r["method"] == "uniform")

    md = (suite / "results.md").read_text()
    assert "python -m boost_lightning.bench --quick --tasks maze" in md
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("uniform", "learned")}
    # Main table: a row per method, a column for the task; success in percent, mean ± CI over the two seeds.
    success = md_table(md, ["method", "maze", "mean", "train s"])
    assert set(success) == {"uniform", "learned"}
    for method, runs_of in by_method.items():
        mean, half = number_ci(success[method][0])
        assert mean == pytest.approx(100 * np.mean([float(r["success_rate"]) for r in runs_of]), abs=0.051)
        assert half >= 0 and float(success[method][1]) == pytest.approx(mean, abs=0.051)
    # Validation loss table: the same rows, mean ± CI of each method's held-out loss.
    val_loss = md_table(md, ["method", "maze"])
    for method, runs_of in by_method.items():
        assert number_ci(val_loss[method][0])[0] == pytest.approx(
            np.mean([float(r["val_loss"]) for r in runs_of]), abs=5.1e-4)
    # Weight analysis: one row per task; ρ is the mean over the learned seeds.
    weights_table = next(t for t in md_tables(md) if t[0][0] == "task")
    assert [row[0] for row in weights_table[1:]] == ["maze"]
    rho = float(weights_table[1][1])
    assert rho == pytest.approx(np.mean([float(r["spearman_quality"]) for r in by_method["learned"]]), abs=0.0051)
    records = [json.loads(p.read_text()) for p in runs if "-learned-" in p.name]
    for record in records:
        # One alignment per generator seen in the 3 outer steps' batches (48 rows), every one a finite number.
        assert record["alignment"] and all(math.isfinite(v) for v in record["alignment"].values())
        assert set(record["alignment"]) <= set(record["weights"]["synthetic"]["generator"]) | {"real"}
    # The report lists the mean alignment per generator over the learned seeds.
    listed = [dict((name, float(value)) for name, value in (item.rsplit(" ", 1) for item in line[len("- maze: "):]
                                                           .split(", ")))
              for line in md.splitlines() if line.startswith("- maze: ")]
    expected = {k: np.mean([r["alignment"][k] for r in records if k in r["alignment"]])
                for k in {k for r in records for k in r["alignment"]}}
    assert any(set(d) == set(expected) and all(d[k] == pytest.approx(v, abs=0.0051) for k, v in expected.items())
               for d in listed), (listed, expected)
    assert int(re.search(r"(\d+) inner", md).group(1)) == 3

    for name in ("success.png", "weight_vs_quality.png", "weight_per_generator.png", "ess.png"):
        path = suite / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert (suite / "tb").is_dir()
    out = capsys.readouterr().out
    assert "4 runs done, 0 skipped" in out and "learned weights on maze" in out

    # Resume: nothing runs again, result files are untouched, reports are rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs}
    (suite / "results.md").unlink()
    assert main(args) == 0
    assert "0 runs done, 4 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (suite / "runs").glob("*.json")} == mtimes
    assert (suite / "results.md").exists()

    assert main([*args, "--report-only"]) == 0
    assert "runs done" not in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (suite / "runs").glob("*.json")} == mtimes


def test_results_of_another_budget_are_stale(tmp_path):
    import json
    from dataclasses import asdict, replace

    preset = PRESETS["quick"]
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path / ".cache")
    spec = RunSpec("maze", "uniform", 0, 0.3, 600)
    assert not is_finished(ctx, spec, preset)
    path = result_path(ctx, spec)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"preset": asdict(preset), "model": "tiny"}))
    assert is_finished(ctx, spec, preset)
    assert not is_finished(ctx, spec, replace(preset, steps=preset.steps + 1))
    assert not is_finished(RunContext(out_dir=tmp_path, cache_dir=tmp_path, model="small"), spec, preset)
    # The learned head's reweighting choice is part of a learned run's identity (older records mean "all").
    learned = RunSpec("maze", "learned", 0, 0.3, 600)
    result_path(ctx, learned).write_text(json.dumps({"preset": asdict(preset), "model": "tiny"}))
    assert is_finished(ctx, learned, preset)
    assert not is_finished(replace(ctx, head_reweight="synthetic"), learned, preset)
    assert is_finished(replace(ctx, head_reweight="synthetic"), spec, preset)  # baselines have no head


def _fake_result(method: str, seed: int, success: float, tradeoff: dict | None = None) -> dict:
    from dataclasses import asdict

    spec = RunSpec("maze", method, seed, 0.3, 600)
    return {"run_id": spec.run_id, "spec": asdict(spec), "preset": asdict(PRESETS["quick"]), "model": "tiny",
            "accelerator": "cpu", "metrics": {"success_rate": success, "train_seconds": 1.0, "inner_steps": 100},
            "tradeoff": tradeoff or {}, "history": {"step": [], "ess_fraction": [], "generators": []}}


def test_reports_from_records_include_ci_and_tradeoff_metrics(tmp_path):
    from boost_lightning.bench.report import write_reports

    results = [_fake_result("uniform", 0, 0.25), _fake_result("uniform", 1, 0.5),
               _fake_result("learned", 0, 0.5, {"tradeoff/ess": 0.75}),
               _fake_result("learned", 1, 1.0, {"tradeoff/ess": 0.25})]
    md = write_reports(tmp_path, results, command="python -m boost_lightning.bench --quick")
    table = md_table(md, ["method", "maze", "mean", "train s"])
    assert set(table) == {"uniform", "learned"}
    # Success in percent: mean of the seeds, and a 95 % half-width of t(1) · sd / √2 = 12.706 · sd / √2.
    for method, (a, b) in (("uniform", (0.25, 0.5)), ("learned", (0.5, 1.0))):
        mean, half = number_ci(table[method][0])
        assert mean == pytest.approx(50 * (a + b), abs=0.051)
        assert half == pytest.approx(100 * 12.706 * abs(b - a) / math.sqrt(2) / math.sqrt(2), abs=0.051)
        assert float(table[method][1]) == pytest.approx(mean, abs=0.051)  # one task: the row mean is the task's
    lines = md.splitlines()
    assert "**" in next(line for line in lines if line.startswith("| `learned` |"))  # the best cell is bold
    assert "**" not in next(line for line in lines if line.startswith("| `uniform` |"))
    assert re.search(r"(\d+) of (\d+) tasks", md).groups() == ("1", "1")
    # Trade-off table: only the method that logged the metric, its mean over the two seeds.
    tradeoff = next(t for t in md_tables(md) if t[0] == ["method", "task", "tradeoff/ess"])
    assert [(row[0], row[1], float(row[2])) for row in tradeoff[1:]] == [("learned", "maze", 0.5)]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tradeoff/ess"] for r in rows] == ["", "", "0.75", "0.25"]


def test_head_reweight_synthetic_keeps_every_real_row_at_weight_one(tmp_path):
    args = ["--quick", "--tasks", "maze", "--methods", "learned", "--seeds", "1", "--steps", "3", "--episodes", "2",
            "--no-ablation", "--no-progress", "--accelerator", "cpu", "--out", str(tmp_path), "--name", "syn",
            "--head-reweight", "synthetic"]
    assert main(args) == 0
    record = json.loads(next((tmp_path / "syn" / "runs").glob("*.json")).read_text())
    assert record["head_reweight"] == "synthetic"
    assert record["weights"]["real_weights"] and set(record["weights"]["real_weights"]) == {1.0}
    synthetic = np.asarray(record["weights"]["synthetic"]["weight"])
    assert synthetic.mean() == pytest.approx(1.0, abs=1e-4) and synthetic.std() > 0
    preamble = (tmp_path / "syn" / "results.md").read_text().split("\n|", 1)[0]  # the text before the first table
    assert "`synthetic`" in preamble
