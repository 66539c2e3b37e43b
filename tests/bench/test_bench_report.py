"""Benchmark statistics, tables, README section and plots, on hand-made run records."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from boost_lightning.bench.plots import PLOT_FILES, write_plots
from boost_lightning.bench.report import (
    BASE_COLUMNS,
    README_BEGIN,
    README_END,
    best_non_oracle_baseline,
    console_table,
    frame_from_records,
    headroom_recovered,
    headroom_table,
    iqm,
    leave_one_out_table,
    load_frame,
    markdown,
    markdown_table,
    method_table,
    paired_bootstrap,
    probability_of_improvement,
    spearman,
    utility_table,
    variant_markdown,
    variant_table,
    weight_analysis,
    write_readme_section,
    write_reports,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GENERATORS = ("gA", "gB", "gC", "gD")
#: Learned mean weight per generator, and the utility each generator's pool run is built to have.
LEARNED_WEIGHT = {"gA": 1.5, "gB": 0.5, "gC": 1.2, "gD": 0.9}
UTILITY = {"gA": 0.30, "gB": -0.10, "gC": 0.05, "gD": 0.10}
#: What each generator is built to be worth inside the pool: uniform minus uniform without it.
LEAVE_ONE_OUT = {"gA": 0.10, "gB": -0.05, "gC": 0.0, "gD": 0.20}
MAZE = {"oracle": (0.90, 0.80, 0.85), "uniform": (0.40, 0.50, 0.45), "real_only": (0.20, 0.30, 0.25),
        "learned": (0.60, 0.70, 0.65), "l2rw": (0.50, 0.55, 0.60), "return_filter": (0.00, 0.90, 0.45)}
GUESS = {"oracle": (0.60, 0.60), "uniform": (0.50, 0.50), "real_only": (0.55, 0.55)}


def record(task: str, method: str, seed: int, success: float, pool: str = "all", nll: float = 1.0,
           **extra) -> dict:
    row = {"task": task, "method": method, "seed": seed, "pool": pool, "success_rate": success, "episodes": 20,
           "val_loss": 0.5, "test_nll": nll, "train_seconds": 2.0, "ess_fraction": math.nan}
    out = {"run_id": f"{task}-{method}-{pool}-s{seed}", "row": row}
    if method == "learned":
        row["ess_fraction"] = 0.8
        row.update({f"weight/{g}": w + 0.1 * (seed - 1) for g, w in LEARNED_WEIGHT.items()})  # mean over seeds: w
        out["history"] = {"step": [0, 10, 20], "ess_fraction": [1.0, 0.9, 0.8],
                          "generators": [{"step": s, **{g: w ** (s / 20) for g, w in LEARNED_WEIGHT.items()}}
                                         for s in (0, 10, 20)]}
    out.update(extra)
    return out


def suite_records() -> list[dict]:
    """Two tasks: ``maze`` with headroom, utility runs and learned weights; ``guess`` without headroom."""
    records = [record("maze", m, seed, v, nll=1.0 - 0.1 * v + 0.01 * seed)
               for m, values in MAZE.items() for seed, v in enumerate(values)]
    records += [record("guess", m, seed, v) for m, values in GUESS.items() for seed, v in enumerate(values)]
    records += [record("maze", "uniform", seed, real + UTILITY[g], pool=g)
                for g in GENERATORS for seed, real in enumerate(MAZE["real_only"])]
    records += [record("maze", "uniform", seed, full - LEAVE_ONE_OUT[g], pool=f"without-{g}")
                for g in GENERATORS for seed, full in enumerate(MAZE["uniform"])]
    # Row weights of two learned seeds: ρ(weight, quality) = 1 and 0.5, mean 0.75.
    rows = {0: [1.0, 2.0, 3.0], 1: [1.0, 3.0, 2.0]}
    for r in records:
        if r["row"]["method"] == "learned" and r["row"]["seed"] in rows:
            r["weights"] = {"real_weights": [1.0, 1.0],
                            "synthetic": {"weight": rows[r["row"]["seed"]], "quality": [0.1, 0.2, 0.3],
                                          "generator": ["gA", "gB", "gC"]}}
    return records


def write_suite(tmp_path, records) -> None:
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for r in records:
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r))


def by_seed(values) -> pd.Series:
    return pd.Series(values, index=range(len(values)), dtype=float)


# ------------------------------------------------------------------------------------------------ statistics


def test_paired_bootstrap_of_a_constant_difference_has_zero_width():
    a = pd.Series({0: 0.5, 1: 0.7, 2: 0.2, 3: 0.9})
    mean, low, high = paired_bootstrap(a, a - 0.1)
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_bootstrap_on_hand_cases():
    # Differences (0, 0, 1): a resample's mean is 0, 1/3, 2/3 or 1 with probability 8, 12, 6 and 1 in 27.
    # 10th percentile: P(0) = 0.30 > 0.10 → 0; 90th: P(≤ 1/3) = 0.74 < 0.90 ≤ P(≤ 2/3) = 0.96 → 2/3;
    # 97.5th: P(≤ 2/3) = 0.963 < 0.975 → 1.
    a, b = by_seed([0.5, 0.5, 1.0]), by_seed([0.5, 0.5, 0.0])
    assert paired_bootstrap(a, b, level=0.8) == pytest.approx((1 / 3, 0.0, 2 / 3))
    assert paired_bootstrap(a, b) == pytest.approx((1 / 3, 0.0, 1.0))
    # Two pairs, differences (0, 1): resample means 0, 1/2, 1 with probability 1/4, 1/2, 1/4.
    assert paired_bootstrap(by_seed([0.0, 1.0]), by_seed([0.0, 0.0])) == pytest.approx((0.5, 0.0, 1.0))


def test_paired_bootstrap_pairs_by_seed_and_is_deterministic():
    a = pd.Series({0: 0.5, 1: 0.6, 2: 0.9, 5: 0.0})
    b = pd.Series({2: 0.4, 1: 0.5, 0: 0.1, 7: 1.0})
    shared = paired_bootstrap(a.loc[[0, 1, 2]], b.loc[[0, 1, 2]])
    assert paired_bootstrap(a, b) == shared  # seeds 5 and 7 have no partner
    assert shared[0] == pytest.approx(np.mean([0.4, 0.1, 0.5]))
    assert paired_bootstrap(dict(a), dict(b)) == shared  # mappings seed → value work as well
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    b_nan = b.copy()
    b_nan[1] = math.nan
    assert paired_bootstrap(a, b_nan)[0] == pytest.approx(np.mean([0.4, 0.5]))  # a NaN drops its pair
    one = paired_bootstrap(a, pd.Series({2: 0.4}))
    assert one[0] == pytest.approx(0.5) and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(v) for v in paired_bootstrap(a, pd.Series({9: 0.4})))


def test_probability_of_improvement_counts_ties_half():
    a = pd.Series({0: 0.5, 1: 0.3, 2: 0.4, 3: 0.9})
    b = pd.Series({0: 0.4, 1: 0.3, 2: 0.6, 4: 0.0})
    assert probability_of_improvement(a, b) == pytest.approx((1 + 0.5 + 0) / 3)
    assert probability_of_improvement(b, a) == pytest.approx((0 + 0.5 + 1) / 3)
    assert math.isnan(probability_of_improvement(a, pd.Series({9: 0.1})))


def test_iqm_trims_a_quarter_each_side():
    assert iqm([8, 1, 2, 3, 4, 5, 6, 7, math.nan]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert iqm([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 10.0, 10.0]) == pytest.approx(0.25)
    assert math.isnan(iqm([]))


def test_headroom_recovered():
    assert headroom_recovered(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert headroom_recovered(0.3, 0.4, 0.8) == pytest.approx(-0.25)
    assert math.isnan(headroom_recovered(0.6, 0.4, math.nan))  # no oracle
    assert math.isnan(headroom_recovered(0.6, 0.4, 0.4))  # no headroom


def test_best_non_oracle_baseline():
    means = {"oracle": 0.9, "uniform": 0.5, "real_only": 0.3, "learned": 0.8, "l2rw": 0.6, "group": math.nan}
    assert best_non_oracle_baseline(means, "learned") == "l2rw"
    assert best_non_oracle_baseline(means, "oracle") == "l2rw"
    assert best_non_oracle_baseline(means, "l2rw") == "uniform"
    assert best_non_oracle_baseline({"return_filter": 0.5, "uniform": 0.5, "learned": 0.9}, "learned") == "uniform"
    assert best_non_oracle_baseline({"oracle": 0.9, "learned": 0.8}, "learned") is None


def test_spearman_on_hand_values():
    # Ranks of weights 4, 1, 3, 2 against utilities 4, 1, 2, 3: Σd² = 2, ρ = 1 − 6 · 2 / (4 · 15) = 0.8.
    assert spearman([1.5, 0.5, 1.2, 0.9], [0.3, -0.1, 0.05, 0.1]) == pytest.approx(0.8)
    # Ties take their average rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4), ρ = 4.5 / √(4.5 · 5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, math.nan, 3], [3, 2, 0, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


# ----------------------------------------------------------------------------------------------------- tables


def test_headroom_table_checks_the_targets():
    table = headroom_table(frame_from_records(suite_records())).set_index("task")
    assert list(table.index) == ["guess", "maze"]
    maze = table.loc["maze"]
    assert (maze["oracle"], maze["uniform"], maze["real_only"], maze["headroom"]) == pytest.approx(
        (0.85, 0.45, 0.25, 0.40))
    assert bool(maze["oracle_ok"]) and bool(maze["headroom_ok"]) and bool(maze["real_only_below"])
    guess = table.loc["guess"]
    assert not guess["oracle_ok"] and not guess["headroom_ok"] and not guess["real_only_below"]


def test_method_table_pairs_against_uniform_and_the_best_baseline():
    table = method_table(frame_from_records(suite_records()), n_boot=2000)
    maze = table[table["task"] == "maze"].set_index("method")
    assert list(maze.index) == ["oracle", "uniform", "real_only", "l2rw", "return_filter", "learned"]
    learned = maze.loc["learned"]
    assert learned["n"] == 3 and learned["success"] == pytest.approx(0.65)
    # learned − uniform is 0.2 on every seed: a zero-width interval, every seed an improvement.
    assert (learned["vs_uniform"], learned["vs_uniform_low"], learned["vs_uniform_high"]) == pytest.approx(
        (0.2, 0.2, 0.2))
    assert learned["half_width"] == pytest.approx(0.0) and not learned["too_wide"]
    assert learned["p_improvement"] == 1.0
    assert learned["headroom_recovered"] == pytest.approx((0.65 - 0.45) / (0.85 - 0.45))
    assert learned["baseline"] == "l2rw" and learned["vs_baseline"] == pytest.approx(0.1)
    assert maze.loc["l2rw", "baseline"] == "uniform"  # never itself, the oracle or learned
    assert maze.loc["oracle", "baseline"] == "l2rw"
    # test NLL = 1 − 0.1 · success + 0.01 · seed: the paired difference to uniform is −0.1 · 0.2 on every seed.
    assert learned["nll_vs_uniform"] == pytest.approx(-0.02)
    assert learned["nll_vs_uniform_low"] == pytest.approx(-0.02)
    # return_filter − uniform: −0.4, +0.4, 0 over the seeds, far wider than 8 points.
    noisy = maze.loc["return_filter"]
    assert noisy["vs_uniform"] == pytest.approx(0.0) and noisy["half_width"] > 0.08 and noisy["too_wide"]
    assert noisy["p_improvement"] == pytest.approx(0.5)
    assert math.isnan(maze.loc["uniform", "vs_uniform"]) and pd.isna(maze.loc["uniform", "too_wide"])
    guess = table[table["task"] == "guess"].set_index("method")
    assert guess.loc["real_only", "headroom_recovered"] == pytest.approx(0.5)  # (0.55 − 0.5) / (0.6 − 0.5)
    no_oracle = method_table(frame_from_records([r for r in suite_records() if r["row"]["method"] != "oracle"]),
                             n_boot=100)
    assert no_oracle["headroom_recovered"].isna().all()


def test_the_utility_oracle_is_a_second_bound_never_a_baseline():
    records = suite_records() + [record("maze", "utility_oracle", seed, 1.0) for seed in range(3)]
    frame = frame_from_records(records)
    headroom = headroom_table(frame).set_index("task")
    assert headroom.loc["maze", "utility_oracle"] == pytest.approx(1.0)
    assert math.isnan(headroom.loc["guess", "utility_oracle"])
    maze = method_table(frame, n_boot=100).set_index("method").loc[lambda t: t["task"] == "maze"]
    assert list(maze.index[:3]) == ["oracle", "utility_oracle", "uniform"]
    # (0.65 − 0.45) of the label oracle's 0.40 and of the utility oracle's 0.55.
    assert maze.loc["learned", "headroom_recovered"] == pytest.approx(0.5)
    assert maze.loc["learned", "headroom_recovered_utility"] == pytest.approx(0.2 / 0.55)
    assert maze.loc["learned", "baseline"] == "l2rw" and maze.loc["uniform", "baseline"] == "l2rw"
    assert method_table(frame_from_records(suite_records()), n_boot=100)["headroom_recovered_utility"].isna().all()
    assert "| `utility_oracle` |" in markdown(frame) and "utility_oracle %" in markdown(frame)


def test_utility_sign_and_weight_analysis():
    frame = frame_from_records(suite_records())
    utility = utility_table(frame, n_boot=2000)
    assert list(utility["task"]) == ["maze"] * 4 and list(utility["generator"]) == list(GENERATORS)
    table = utility.set_index("generator")
    for g, value in UTILITY.items():
        # The pool-g runs are built as real_only + utility on every seed: a zero-width interval at the utility.
        assert (table.loc[g, "utility"], table.loc[g, "low"], table.loc[g, "high"]) == pytest.approx((value,) * 3)
        assert bool(table.loc[g, "harmful"]) == (value < 0)
        assert table.loc[g, "n"] == 3
        assert table.loc[g, "learned_weight"] == pytest.approx(LEARNED_WEIGHT[g])
    analysis = weight_analysis(frame, suite_records(), utility).set_index("task")
    assert list(analysis.index) == ["maze"]
    maze = analysis.loc["maze"]
    assert maze["generators"] == 4
    assert maze["rho_utility"] == pytest.approx(0.8)  # see test_spearman_on_hand_values
    assert maze["rho_quality"] == pytest.approx((1.0 + 0.5) / 2) and maze["weight_seeds"] == 2
    assert maze["harmful_helpful_ratio"] == pytest.approx(0.5 / np.mean([1.5, 1.2, 0.9]))
    assert math.isnan(weight_analysis(frame).loc[0, "rho_quality"])  # no records, no row weights


def test_leave_one_out_value_is_the_pool_minus_the_pool_without_the_generator():
    frame = frame_from_records(suite_records())
    table = leave_one_out_table(frame, n_boot=2000)
    assert list(table["task"]) == ["maze"] * 4 and list(table["generator"]) == list(GENERATORS)
    table = table.set_index("generator")
    for g, value in LEAVE_ONE_OUT.items():
        assert (table.loc[g, "utility"], table.loc[g, "low"], table.loc[g, "high"]) == pytest.approx((value,) * 3)
        assert bool(table.loc[g, "harmful"]) == (value < 0) and table.loc[g, "n"] == 3
    # Weights 1.5, 0.5, 1.2, 0.9 against values 0.1, −0.05, 0, 0.2: ranks (4, 1, 3, 2) vs (3, 1, 2, 4), ρ = 0.4.
    assert weight_analysis(frame).loc[0, "rho_leave_one_out"] == pytest.approx(0.4)
    no_runs = frame[~frame["pool"].str.startswith("without-")]
    assert leave_one_out_table(no_runs).empty and math.isnan(weight_analysis(no_runs).loc[0, "rho_leave_one_out"])


# ---------------------------------------------------------------------------------------------- files and text


def test_csv_columns_and_order(tmp_path):
    write_suite(tmp_path, suite_records())
    write_reports(tmp_path)
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [*BASE_COLUMNS, "weight/gA", "weight/gB", "weight/gC", "weight/gD"]
    assert len(rows) == len(suite_records())
    uniform = next(r for r in rows if (r["task"], r["method"], r["pool"], r["seed"]) == ("maze", "uniform", "all", "0"))
    assert uniform["weight/gA"] == "" and uniform["ess_fraction"] == "" and float(uniform["success_rate"]) == 0.4
    learned = next(r for r in rows if r["method"] == "learned" and r["seed"] == "1")
    assert float(learned["weight/gB"]) == pytest.approx(0.5)
    frame = load_frame(tmp_path)
    assert list(frame.columns[:len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    assert frame["seed"].dtype.kind == "i"


def test_markdown_sections_in_order(tmp_path):
    write_suite(tmp_path, suite_records())
    command = "python -m boost_lightning.bench --tasks maze,guess"
    md = write_reports(tmp_path, command=command)
    assert (tmp_path / "results.md").read_text() == md
    head = md.split("\n## ", 1)[0]
    assert f"`{command}`" in head
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == ["## Headroom", "## Methods", "## Generator utility", "## Leave-one-out value",
                        "## Weight analysis"]
    for section in md.split("\n## ")[1:]:
        lines = [line for line in section.splitlines()[1:] if line.strip()]
        assert not lines[0].startswith("|") and lines[1].startswith("|")  # a one-line description, then the table
    assert "| maze" in md and "`l2rw`" in md
    assert "(> 8)" in md  # return_filter's interval is too wide
    empty = tmp_path / "empty"
    assert "No finished runs yet." in write_reports(empty)


def test_markdown_table_without_tabulate(monkeypatch):
    display = pd.DataFrame({"task": ["maze"], "success %": ["70.0"]})
    with_tabulate = markdown_table(display)
    assert "70.0" in with_tabulate  # numbers stay as formatted
    monkeypatch.setitem(sys.modules, "tabulate", None)  # import tabulate now raises ImportError
    assert markdown_table(display).splitlines() == ["| task | success % |", "|---|---|", "| maze | 70.0 |"]


def test_console_table():
    text = console_table(frame_from_records(suite_records()))
    lines = text.splitlines()
    assert "guess" in lines[1] and "maze" in lines[1]
    learned = next(line for line in lines if line.startswith("learned"))
    assert "65.0 (3)" in learned and "–" in learned  # no learned run on guess


def test_readme_section_replaces_only_the_marked_text(tmp_path):
    write_suite(tmp_path, suite_records())
    md = write_reports(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "success.png").write_bytes(PNG_MAGIC)
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nIntro.\n\n", "\n\n## Layout\n\nFiles.\n"
    readme.write_text(f"{before}{README_BEGIN}\nold results\n{README_END}{after}")
    block = write_readme_section(readme, md, "docs")
    text = readme.read_text()
    assert text.startswith(before + README_BEGIN) and text.endswith(README_END + after)
    assert "old results" not in text and block in text
    assert [line for line in block.splitlines() if line.startswith("#")] == [
        "### Headroom", "### Methods", "### Generator utility"]
    assert "Weight analysis" not in block
    assert "](docs/success.png)" in block and "weight_vs_utility.png" not in block  # only figures that exist
    # Computing from the frame gives the same tables; a second run replaces the first one's text.
    from_frame = write_readme_section(readme, load_frame(tmp_path), "docs")
    assert from_frame == block and readme.read_text() == text
    readme.write_text("# Project without markers\n")
    with pytest.raises(ValueError, match="bench:results"):
        write_readme_section(readme, md, "docs")
    readme.write_text(f"{README_END}\n{README_BEGIN}\n")
    with pytest.raises(ValueError):
        write_readme_section(readme, md, "docs")


def test_plots_are_written_as_png(tmp_path):
    import matplotlib.image

    paths = write_plots(tmp_path, suite_records())
    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC, path.name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Without learned runs or utility runs, only the success figure can be drawn.
    baselines = [r for r in suite_records() if r["row"]["method"] != "learned" and r["row"]["pool"] == "all"]
    assert [p.name for p in write_plots(tmp_path / "baselines", baselines)] == ["success.png"]
    assert write_plots(tmp_path / "none", []) == []


def test_package_imports_without_the_bench_dependencies():
    code = ("import sys, boost_lightning; "
            "print(sorted(m for m in ('pandas', 'scipy', 'tabulate', 'rliable') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_variant_is_compared_with_the_same_method_and_uniform_of_the_suite_it_varies_by_seed():
    base = frame_from_records([record("maze", m, s, v, nll=1.0 + s) for m, values in MAZE.items()
                               for s, v in enumerate(values)])
    variant_rows = [record("maze", "learned", s, v, nll=0.9 + s) for s, v in enumerate((0.70, 0.90))]
    for r, seconds, ess in zip(variant_rows, (3.0, 5.0), (0.4, 0.6)):
        r["row"].update(train_seconds=seconds, pool_ess_fraction=ess)
    table = variant_table(base, {"opt": frame_from_records(variant_rows)}, n_boot=200)
    (row,) = table.to_dict("records")
    # Seeds 0 and 1 only: learned was 0.60 / 0.70, uniform 0.40 / 0.50.
    assert (row["variant"], row["task"], row["method"], row["n"]) == ("opt", "maze", "learned", 2)
    assert row["vs_base"] == pytest.approx(0.15) and row["vs_uniform"] == pytest.approx(0.35)
    assert row["vs_base_low"] == pytest.approx(0.10) and row["vs_base_high"] == pytest.approx(0.20)
    assert row["nll_vs_base"] == pytest.approx(-0.1)
    assert row["time_ratio"] == pytest.approx(2.0) and row["pool_ess"] == pytest.approx(0.5)
    text = variant_markdown(table)
    assert "| opt" in text and "+15.0 [+10.0, +20.0]" in text and "2.00" in text
