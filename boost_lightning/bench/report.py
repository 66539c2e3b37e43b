"""Benchmark reports from a suite's finished runs: ``results.csv`` (one row per run) and ``results.md``.

Every comparison between two methods is paired by seed: a seed fixes a run's policy initialisation and batch order,
and the synthetic pool is the same for every seed, so two methods on the same seed differ by their weighting (and
the noise that remains). Intervals are percentile intervals of a bootstrap that resamples seed pairs.

``results.md`` has five tables, in this order:

* headroom: per task, whether the task leaves room to reweight (oracle, uniform and real-only success);
* methods: per task and method (pool ``all``), success with its paired difference to ``uniform`` and to the best
  non-oracle baseline, probability of improvement, share of the headroom recovered, test NLL;
* utility: per task and generator ``g``, success of ``uniform`` trained on the real rows and ``g``'s rows only,
  minus that of ``real_only``;
* leave-one-out: per task and generator ``g``, success of ``uniform`` on the whole pool minus that of ``uniform``
  on the pool without ``g`` (what ``g`` is worth inside the mix);
* weight analysis: per task, whether ``learned`` weighs generators by their measured utility (and leave-one-out
  value).

pandas, scipy (and tabulate, rliable when installed) are imported here only, not by the rest of the package.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boost_lightning.bench.suite import LEAVE_OUT_PREFIX, MAIN_POOL, pool_generator

#: ``results.csv`` columns before the ``weight/<generator>`` ones.
BASE_COLUMNS = ("task", "method", "seed", "pool", "success_rate", "episodes", "val_loss", "test_nll",
                "train_seconds", "ess_fraction")
WEIGHT_PREFIX = "weight/"

#: Targets of a task worth benchmarking: the oracle solves it and reweighting has room to matter.
ORACLE_TARGET = 0.70
HEADROOM_TARGET = 0.15
#: Largest acceptable half-width of a (method − uniform) interval; wider means too few seeds or episodes.
HALF_WIDTH_TARGET = 0.08

N_BOOT = 10_000
LEVEL = 0.95

#: Methods listed first, in this order; the other methods follow alphabetically, ``learned`` and ``retrain`` last.
REFERENCE_METHODS = ("oracle", "utility_oracle", "uniform", "real_only", "synthetic_only")
#: Never the "best baseline": the oracles see the ground truth (labels, or measured utility); ``learned`` (and
#: ``retrain``, which trains on its weights) is what the baselines are compared to.
NOT_BASELINES = ("oracle", "utility_oracle", "learned", "retrain", "retrain_alignment", "retrain_combined")

#: Headings of ``results.md``, in order (the README section takes the first three).
SECTIONS = {"headroom": "Headroom", "methods": "Methods", "utility": "Generator utility",
            "leave_one_out": "Leave-one-out value", "weights": "Weight analysis"}
README_BEGIN = "<!-- bench:results:begin -->"
README_END = "<!-- bench:results:end -->"


# ---------------------------------------------------------------------------------------------------- loading


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run's record under ``<out_dir>/runs``, sorted by file name.

    Args:
        out_dir: The suite directory.

    Returns:
        The parsed ``runs/<run_id>.json`` records (empty when there are none).
    """
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "runs").glob("*.json"))]


def frame_from_records(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record's ``"row"``, with every base column present (NaN where a row lacks it).

    Args:
        records: Run records as written under ``runs/``.

    Returns:
        The runs as a DataFrame: the base columns first, then ``weight/*`` sorted, then any other column.

    Raises:
        ValueError: A record has no ``"row"``.
    """
    rows = []
    for record in records:
        if "row" not in record:
            raise ValueError(f"run record {record.get('run_id', '?')!r} has no 'row'")
        rows.append(dict(record["row"]))
    frame = pd.DataFrame(rows)
    for column in BASE_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    frame = frame[_column_order(frame.columns)]
    # Only the known numeric columns: a column a newer row format adds keeps its values as they are.
    numeric = [c for c in frame.columns
               if (c in BASE_COLUMNS and c not in ("task", "method", "pool")) or c.startswith(WEIGHT_PREFIX)]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    if len(frame) and frame["seed"].notna().all():
        frame["seed"] = frame["seed"].astype(int)
    return frame


def load_frame(out_dir: str | Path) -> pd.DataFrame:
    """The suite's runs as a DataFrame, one row per ``runs/<run_id>.json`` record's ``"row"``.

    Args:
        out_dir: The suite directory.

    Returns:
        See :func:`frame_from_records`.
    """
    return frame_from_records(load_records(out_dir))


def _column_order(columns: Sequence[str]) -> list[str]:
    weights = sorted(c for c in columns if c.startswith(WEIGHT_PREFIX))
    rest = sorted(c for c in columns if c not in BASE_COLUMNS and not c.startswith(WEIGHT_PREFIX))
    return [*BASE_COLUMNS, *weights, *rest]


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``results.csv``: one row per run, empty cells for missing values.

    Columns: task, method, seed, pool, success_rate, episodes, val_loss, test_nll, train_seconds, ess_fraction,
    then the ``weight/*`` columns sorted (then any column a newer row format adds, sorted, so nothing is lost).

    Args:
        frame: Runs as from :func:`load_frame`.
        path: Output file.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = frame.copy()
    for column in BASE_COLUMNS:
        if column not in out:
            out[column] = np.nan
    out[_column_order(out.columns)].to_csv(path, index=False, float_format="%.6g")
    return path


# ------------------------------------------------------------------------------------------------ statistics


def _align(a: pd.Series | Mapping[Any, float], b: pd.Series | Mapping[Any, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values of the seeds present (and finite) in both, in seed order; a seed that ran twice counts once (mean)."""
    sa, sb = (pd.Series(x, dtype=float) if not isinstance(x, pd.Series) else x.astype(float) for x in (a, b))
    sa, sb = (s[np.isfinite(s.to_numpy())].groupby(level=0).mean() for s in (sa, sb))
    shared = sa.index.intersection(sb.index).sort_values()
    return sa.loc[shared].to_numpy(), sb.loc[shared].to_numpy()


def paired_bootstrap(a: pd.Series | Mapping[Any, float], b: pd.Series | Mapping[Any, float], n_boot: int = N_BOOT,
                     seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean paired difference ``a − b`` over seeds and its percentile bootstrap interval.

    The two sides are aligned on their index (the seed); seeds missing on either side, or NaN there, are ignored.
    Each bootstrap sample draws as many seed pairs as there are, with replacement, and averages their differences.

    Args:
        a: Per-seed values of the first method (index = seed).
        b: Per-seed values of the second method (index = seed).
        n_boot: Bootstrap samples.
        seed: Seed of the resampling; the result is a function of the inputs and this seed.
        level: Coverage of the interval.

    Returns:
        ``(mean_diff, low, high)``; all NaN without a shared seed, NaN bounds with a single one (one pair says
        nothing about the spread).
    """
    x, y = _align(a, b)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    diff = x - y
    mean = float(diff.mean())
    if diff.size == 1:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    samples = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return mean, float(low), float(high)


def probability_of_improvement(a: pd.Series | Mapping[Any, float], b: pd.Series | Mapping[Any, float]) -> float:
    """Share of shared seeds on which ``a`` beats ``b`` (a tie counts one half).

    Args:
        a: Per-seed values of the first method (index = seed).
        b: Per-seed values of the second method (index = seed).

    Returns:
        P(a > b) over seed pairs; NaN without a shared seed.
    """
    x, y = _align(a, b)
    if x.size == 0:
        return math.nan
    return float(np.mean((x > y) + 0.5 * (x == y)))


def iqm(values: Sequence[float] | np.ndarray | pd.Series) -> float:
    """Interquartile mean: the mean of the middle 50 % of the values (25 % trimmed from each end).

    rliable's ``aggregate_iqm`` when rliable is installed, else ``scipy.stats.trim_mean(values, 0.25)``, which is
    what ``aggregate_iqm`` computes.

    Args:
        values: Scores; NaN values are ignored.

    Returns:
        The IQM; NaN when there is no finite value.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    try:
        from rliable.metrics import aggregate_iqm
    except ImportError:
        from scipy.stats import trim_mean

        return float(trim_mean(x, 0.25))
    return float(aggregate_iqm(x))


def spearman(x: Sequence[float] | np.ndarray | pd.Series, y: Sequence[float] | np.ndarray | pd.Series) -> float:
    """Spearman's ρ of the pairs where both values are finite (``scipy.stats.spearmanr``, ties at average rank).

    Args:
        x: First values.
        y: Second values, paired with ``x`` by position.

    Returns:
        ρ; NaN with fewer than two pairs or a constant side.
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError("spearman needs two sequences of the same length")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def best_non_oracle_baseline(means: Mapping[str, float], method: str) -> str | None:
    """The baseline ``method`` is measured against: the highest mean success among the other methods.

    ``oracle`` (it sees the ground truth), ``learned`` and ``method`` itself never qualify; a tie goes to the
    method listed first in the report's order.

    Args:
        means: Mean success per method on one task.
        method: The method being compared.

    Returns:
        The baseline's name, or None when no other method qualifies.
    """
    candidates = {m: v for m, v in means.items()
                  if m not in NOT_BASELINES and m != method and v is not None and not math.isnan(v)}
    if not candidates:
        return None
    ordered = order_methods(candidates)
    return max(ordered, key=lambda m: (candidates[m], -ordered.index(m)))


def headroom_recovered(method_mean: float, uniform_mean: float, oracle_mean: float) -> float:
    """Share of the oracle's headroom over ``uniform`` that a method recovers: (method − uniform) / (oracle − uniform).

    Args:
        method_mean: The method's mean success.
        uniform_mean: ``uniform``'s mean success on the same task.
        oracle_mean: ``oracle``'s mean success (NaN when the suite has no oracle run).

    Returns:
        The fraction (1: as good as the oracle, 0: no better than uniform); NaN without an oracle or without
        headroom (oracle ≤ uniform), where the fraction means nothing.
    """
    headroom = oracle_mean - uniform_mean
    if any(math.isnan(v) for v in (method_mean, uniform_mean, oracle_mean)) or headroom <= 1e-12:
        return math.nan
    return (method_mean - uniform_mean) / headroom


def order_methods(methods: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Report order: the reference methods, the other baselines alphabetically, ``learned`` and ``retrain`` last.

    Args:
        methods: Method names (duplicates allowed).

    Returns:
        The distinct names in report order.
    """
    present = set(methods)
    boost = [m for m in ("learned", "retrain", "retrain_alignment", "retrain_combined") if m in present]
    rest = sorted(present - set(REFERENCE_METHODS) - set(boost))
    return [m for m in REFERENCE_METHODS if m in present] + rest + boost


# ----------------------------------------------------------------------------------------------------- tables


def _main(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["pool"] == MAIN_POOL]


def _per_seed(frame: pd.DataFrame, column: str) -> dict[str, pd.Series]:
    """Per method: ``column`` per seed (index), NaN dropped."""
    out = {}
    for method, group in frame.groupby("method", sort=False):
        values = group.groupby("seed")[column].mean().dropna()
        out[str(method)] = values
    return out


def _mean(series: pd.Series | None) -> float:
    return float(series.mean()) if series is not None and len(series) else math.nan


def _check(ok: bool, *needed: float) -> bool | None:
    """``ok``, or None when a value it depends on is missing."""
    return None if any(math.isnan(v) for v in needed) else bool(ok)


def headroom_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: mean success of ``oracle``, ``uniform`` and ``real_only`` (pool ``all``) and the targets.

    ``utility_oracle`` (NaN when not run) is the second bound: the generators of positive measured utility.

    Targets: oracle ≥ :data:`ORACLE_TARGET`, oracle − uniform ≥ :data:`HEADROOM_TARGET`, and ``real_only`` below both
    (synthetic data helps, and the oracle's choice of it helps more). A target is NA when a method it needs is
    missing.

    Args:
        frame: Runs as from :func:`load_frame`.

    Returns:
        Columns ``task, oracle, uniform, real_only, headroom, utility_oracle, oracle_ok, headroom_ok,
        real_only_below``.
    """
    rows = []
    for task, group in _main(frame).groupby("task", sort=True):
        means = group.groupby("method")["success_rate"].mean()
        oracle, uniform, real, by_utility = (float(means.get(m, math.nan))
                                             for m in ("oracle", "uniform", "real_only", "utility_oracle"))
        headroom = oracle - uniform
        rows.append({"task": task, "oracle": oracle, "uniform": uniform, "real_only": real, "headroom": headroom,
                     "utility_oracle": by_utility,
                     "oracle_ok": _check(oracle >= ORACLE_TARGET, oracle),
                     "headroom_ok": _check(headroom >= HEADROOM_TARGET - 1e-12, headroom),
                     "real_only_below": _check(real < oracle and real < uniform, real, oracle, uniform)})
    columns = ["task", "oracle", "uniform", "real_only", "headroom", "utility_oracle", "oracle_ok", "headroom_ok",
               "real_only_below"]
    table = pd.DataFrame(rows, columns=columns)
    for column in ("oracle_ok", "headroom_ok", "real_only_below"):
        table[column] = table[column].astype("boolean")
    return table


METHOD_COLUMNS = ["task", "method", "n", "success", "iqm", "vs_uniform", "vs_uniform_low", "vs_uniform_high",
                  "half_width", "too_wide", "baseline", "vs_baseline", "vs_baseline_low", "vs_baseline_high",
                  "p_improvement", "headroom_recovered", "headroom_recovered_utility", "test_nll", "nll_vs_uniform",
                  "nll_vs_uniform_low", "nll_vs_uniform_high"]


def method_table(frame: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per task and method of the main comparison (pool ``all``): success and paired comparisons.

    Columns: ``n`` seeds; mean ``success`` and its ``iqm`` over seeds; ``vs_uniform`` (mean paired difference to
    ``uniform``) with its interval, ``half_width`` of that interval and ``too_wide`` when it exceeds
    :data:`HALF_WIDTH_TARGET`; the best non-oracle ``baseline`` (:func:`best_non_oracle_baseline`) and the paired
    difference to it; ``p_improvement`` over uniform; ``headroom_recovered`` (of ``oracle``'s headroom) and
    ``headroom_recovered_utility`` (of ``utility_oracle``'s, NaN when it did not run); mean ``test_nll`` and its
    paired difference to uniform. Comparisons of ``uniform`` with itself are NaN.

    Args:
        frame: Runs as from :func:`load_frame`.
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        One row per (task, method), tasks sorted, methods in :func:`order_methods` order.
    """
    rows = []
    for task, group in _main(frame).groupby("task", sort=True):
        success, nll = _per_seed(group, "success_rate"), _per_seed(group, "test_nll")
        methods = order_methods(success)
        means = {m: _mean(success[m]) for m in methods}
        uniform = success.get("uniform")
        for method in methods:
            s = success[method]
            row: dict[str, Any] = {"task": task, "method": method, "n": len(s), "success": means[method],
                                   "iqm": iqm(s), "test_nll": _mean(nll.get(method))}
            compare = uniform is not None and method != "uniform"
            d, lo, hi = paired_bootstrap(s, uniform, n_boot, seed) if compare else (math.nan,) * 3
            half = (hi - lo) / 2
            row.update(vs_uniform=d, vs_uniform_low=lo, vs_uniform_high=hi, half_width=half,
                       too_wide=None if math.isnan(half) else bool(half > HALF_WIDTH_TARGET),
                       p_improvement=probability_of_improvement(s, uniform) if compare else math.nan)
            baseline = best_non_oracle_baseline(means, method)
            d, lo, hi = (paired_bootstrap(s, success[baseline], n_boot, seed) if baseline else (math.nan,) * 3)
            row.update(baseline=baseline, vs_baseline=d, vs_baseline_low=lo, vs_baseline_high=hi)
            row["headroom_recovered"] = headroom_recovered(means[method], means.get("uniform", math.nan),
                                                           means.get("oracle", math.nan))
            row["headroom_recovered_utility"] = headroom_recovered(
                means[method], means.get("uniform", math.nan), means.get("utility_oracle", math.nan))
            compare_nll = compare and method in nll and "uniform" in nll
            d, lo, hi = (paired_bootstrap(nll[method], nll["uniform"], n_boot, seed) if compare_nll
                         else (math.nan,) * 3)
            row.update(nll_vs_uniform=d, nll_vs_uniform_low=lo, nll_vs_uniform_high=hi)
            rows.append(row)
    table = pd.DataFrame(rows, columns=METHOD_COLUMNS)
    table["too_wide"] = table["too_wide"].astype("boolean")
    return table


def utility_table(frame: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per task and generator ``g``: the utility of ``g``'s rows on top of the real ones.

    utility(g) = mean over shared seeds of success(``uniform``, pool ``g``) − success(``real_only``, pool ``all``),
    with its paired interval; ``harmful`` when it is negative. ``learned_weight`` is ``learned``'s mean weight of
    ``g``'s rows in the main comparison (``weight/<g>``, mean over seeds), for reading the two side by side.

    Args:
        frame: Runs as from :func:`load_frame`.
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        Columns ``task, generator, n, utility, low, high, harmful, learned_weight``; tasks and generators sorted.
    """
    return _generator_table(frame, leave_out=False, n_boot=n_boot, seed=seed)


def leave_one_out_table(frame: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per task and generator ``g``: what ``g``'s rows are worth inside the whole pool.

    value(g) = mean over shared seeds of success(``uniform``, pool ``all``) − success(``uniform``, pool
    ``without-g``), with its paired interval; ``harmful`` when negative (the pool does better without ``g``). Unlike
    the utility (real + ``g`` alone), it counts what the other generators already teach.

    Args:
        frame: Runs as from :func:`load_frame`.
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        The columns of :func:`utility_table`, the value in ``utility``.
    """
    return _generator_table(frame, leave_out=True, n_boot=n_boot, seed=seed)


def _generator_table(frame: pd.DataFrame, leave_out: bool, n_boot: int, seed: int) -> pd.DataFrame:
    pools = frame["pool"].fillna(MAIN_POOL).astype(str)
    runs_of = (frame["method"] == "uniform") & (pools != MAIN_POOL) & (pools.str.startswith(LEAVE_OUT_PREFIX)
                                                                       == leave_out)
    rows = []
    for task, group in frame[runs_of].groupby("task", sort=True):
        main = _main(frame[frame["task"] == task])
        reference = main[main["method"] == ("uniform" if leave_out else "real_only")]
        reference = reference.groupby("seed")["success_rate"].mean()
        weights = learned_generator_weights(frame, task)
        for pool, runs in group.groupby("pool", sort=True):
            generator, _ = pool_generator(pool)
            values = runs.groupby("seed")["success_rate"].mean()
            a, b = (reference, values) if leave_out else (values, reference)
            d, lo, hi = paired_bootstrap(a, b, n_boot, seed)
            rows.append({"task": task, "generator": generator, "n": len(_align(a, b)[0]), "utility": d,
                         "low": lo, "high": hi, "harmful": None if math.isnan(d) else bool(d < 0),
                         "learned_weight": float(weights.get(generator, math.nan))})
    table = pd.DataFrame(rows, columns=["task", "generator", "n", "utility", "low", "high", "harmful",
                                        "learned_weight"])
    table = table.sort_values(["task", "generator"], kind="stable").reset_index(drop=True)
    table["harmful"] = table["harmful"].astype("boolean")
    return table


def variant_table(base: pd.DataFrame, variants: Mapping[str, pd.DataFrame], n_boot: int = N_BOOT,
                  seed: int = 0) -> pd.DataFrame:
    """Suites run with an option changed (``--override``, own ``--name``) against the suite they vary, paired by seed.

    Per variant, task and method of the variant's main runs: mean ``success``; ``vs_base``, the paired difference to
    the same method of ``base`` (the previous default) with its interval; ``vs_uniform``, the paired difference to
    ``base``'s ``uniform``; the paired test-NLL difference to the base method; the mean pool ESS fraction; and
    ``time_ratio``, the variant's mean training time over the base method's on the same seeds (its cost).

    Args:
        base: Runs of the suite the variants change (as from :func:`load_frame`).
        variants: Variant name → its runs.
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        One row per (variant, task, method), in the order of ``variants``, tasks sorted.
    """
    rows = []
    base_main = _main(base)
    for name, frame in variants.items():
        for (task, method), group in _main(frame).groupby(["task", "method"], sort=True):
            reference = base_main[base_main["task"] == task]
            success = group.groupby("seed")["success_rate"].mean()
            same = reference[reference["method"] == method].groupby("seed")
            uniform = reference[reference["method"] == "uniform"].groupby("seed")["success_rate"].mean()
            d, lo, hi = paired_bootstrap(success, same["success_rate"].mean(), n_boot, seed)
            du, ulo, uhi = paired_bootstrap(success, uniform, n_boot, seed)
            dn, nlo, nhi = paired_bootstrap(group.groupby("seed")["test_nll"].mean(), same["test_nll"].mean(),
                                            n_boot, seed)
            times = _align(group.groupby("seed")["train_seconds"].mean(), same["train_seconds"].mean())
            pool_ess = group["pool_ess_fraction"] if "pool_ess_fraction" in group else pd.Series(dtype=float)
            rows.append({"variant": name, "task": task, "method": method, "n": len(success),
                         "success": float(success.mean()), "vs_base": d, "vs_base_low": lo, "vs_base_high": hi,
                         "vs_uniform": du, "vs_uniform_low": ulo, "vs_uniform_high": uhi, "nll_vs_base": dn,
                         "nll_vs_base_low": nlo, "nll_vs_base_high": nhi, "pool_ess": _mean(pool_ess.dropna()),
                         "time_ratio": float(times[0].mean() / times[1].mean()) if times[0].size else math.nan})
    return pd.DataFrame(rows)


def variant_markdown(table: pd.DataFrame) -> str:
    """:func:`variant_table` as a markdown table (differences in points, NLL in nats)."""
    display = pd.DataFrame({
        "variant": table["variant"], "task": table["task"], "method": [f"`{m}`" for m in table["method"]],
        "seeds": table["n"].astype(str), "success %": [_pct(v) for v in table["success"]],
        "Δ base (points)": [_interval(*v) for v in zip(table["vs_base"], table["vs_base_low"], table["vs_base_high"])],
        "Δ uniform (points)": [_interval(*v) for v in zip(table["vs_uniform"], table["vs_uniform_low"],
                                                           table["vs_uniform_high"])],
        "Δ test NLL vs base": [_interval(*v, scale=1.0, digits=3) for v in zip(
            table["nll_vs_base"], table["nll_vs_base_low"], table["nll_vs_base_high"])],
        "pool ESS": [_num(v) for v in table["pool_ess"]], "time × base": [_num(v) for v in table["time_ratio"]],
    })
    return markdown_table(display)


def learned_generator_weights(frame: pd.DataFrame, task: str) -> pd.Series:
    """``learned``'s mean normalised weight per generator on ``task`` (pool ``all``), averaged over seeds.

    Args:
        frame: Runs as from :func:`load_frame`.
        task: The task.

    Returns:
        Mean weight indexed by generator name; generators without a finite weight are left out.
    """
    runs = _main(frame)
    runs = runs[(runs["task"] == task) & (runs["method"] == "learned")]
    columns = [c for c in frame.columns if c.startswith(WEIGHT_PREFIX)]
    means = runs[columns].astype(float).mean().dropna()
    means.index = [c[len(WEIGHT_PREFIX):] for c in means.index]
    return means


def _row_weight_quality_rho(records: Sequence[Mapping[str, Any]], task: str) -> tuple[float, int]:
    """Mean over ``learned`` seeds (pool ``all``) of ρ(row weight, row quality), and how many seeds had weights."""
    rhos = []
    for record in records:
        row = record.get("row", {})
        if (row.get("task"), row.get("method"), row.get("pool")) != (task, "learned", MAIN_POOL):
            continue
        synthetic = (record.get("weights") or {}).get("synthetic")
        if synthetic:
            rhos.append(spearman(synthetic["weight"], synthetic["quality"]))
    finite = [r for r in rhos if not math.isnan(r)]
    return (float(np.mean(finite)) if finite else math.nan), len(rhos)


def weight_analysis(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]] = (),
                    utility: pd.DataFrame | None = None, leave_one_out: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per task with ``learned`` runs: do the learned weights follow what each generator is worth?

    Columns: ``generators`` (with both a learned weight and a measured utility); ``rho_utility``, Spearman's ρ of
    the mean learned weight per generator and the generator's utility; ``rho_quality``, ρ of row weight and
    ground-truth row quality over the synthetic rows of each ``learned`` run's ``weights`` record, averaged over
    seeds (``weight_seeds`` of them); ``harmful_helpful_ratio``, the mean learned weight of harmful generators
    (utility < 0) over that of helpful ones (utility > 0); ``rho_leave_one_out``, ρ of the mean learned weight and
    the generator's leave-one-out value (NaN without those runs).

    Args:
        frame: Runs as from :func:`load_frame`.
        records: The run records (for the per-row ``weights``); without them ``rho_quality`` is NaN.
        utility: :func:`utility_table` of ``frame`` when already computed.
        leave_one_out: :func:`leave_one_out_table` of ``frame`` when already computed.

    Returns:
        One row per task that has ``learned`` runs in the main comparison, tasks sorted.
    """
    utility = utility_table(frame) if utility is None else utility
    leave_one_out = leave_one_out_table(frame) if leave_one_out is None else leave_one_out
    main = _main(frame)
    rows = []
    for task in sorted(main.loc[main["method"] == "learned", "task"].unique()):
        weights = learned_generator_weights(frame, task)
        util = utility[utility["task"] == task].set_index("generator")["utility"].dropna()
        shared = [g for g in weights.index if g in util.index]
        w, u = weights[shared].to_numpy(dtype=float), util[shared].to_numpy(dtype=float)
        harmful, helpful = w[u < 0], w[u > 0]
        ratio = (float(harmful.mean() / helpful.mean()) if harmful.size and helpful.size and helpful.mean() > 0
                 else math.nan)
        rho_quality, seeds = _row_weight_quality_rho(records, task)
        value = leave_one_out[leave_one_out["task"] == task].set_index("generator")["utility"].dropna()
        in_both = [g for g in weights.index if g in value.index]
        rows.append({"task": task, "generators": len(shared), "rho_utility": spearman(w, u),
                     "rho_quality": rho_quality, "weight_seeds": seeds, "harmful_helpful_ratio": ratio,
                     "rho_leave_one_out": spearman(weights[in_both].to_numpy(dtype=float),
                                                   value[in_both].to_numpy(dtype=float))})
    return pd.DataFrame(rows, columns=["task", "generators", "rho_utility", "rho_quality", "weight_seeds",
                                       "harmful_helpful_ratio", "rho_leave_one_out"])


# --------------------------------------------------------------------------------------------------- markdown


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _pct(v: Any, signed: bool = False) -> str:
    return "–" if _missing(v) else f"{100 * v:{'+' if signed else ''}.1f}"


def _num(v: Any, digits: int = 2) -> str:
    return "–" if _missing(v) else f"{v:.{digits}f}"


def _interval(mean: Any, low: Any, high: Any, scale: float = 100.0, digits: int = 1) -> str:
    """``"+5.0 [-1.2, +11.3]"``; the bounds are left out when there are none (a single shared seed)."""
    if _missing(mean):
        return "–"
    text = f"{scale * mean:+.{digits}f}"
    if not (_missing(low) or _missing(high)):
        text += f" [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    return text


def _flag(v: Any, yes: str = "pass", no: str = "fail") -> str:
    return "–" if _missing(v) else (yes if v else no)


def markdown_table(display: pd.DataFrame) -> str:
    """A DataFrame of display strings as a pipe table (``DataFrame.to_markdown`` when tabulate is installed).

    Args:
        display: The cells, already formatted.

    Returns:
        The table, without a trailing newline.
    """
    try:
        import tabulate  # noqa: F401
    except ImportError:
        cells = [[str(c) for c in display.columns], *[[str(v) for v in row] for row in display.itertuples(False)]]
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(display.columns))
        return "\n".join(lines)
    # Numbers are formatted already: tabulate must not re-parse "70.0" into "70".
    return display.to_markdown(index=False, disable_numparse=True)


def _headroom_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "task": table["task"],
        "oracle %": table["oracle"].map(_pct),
        "uniform %": table["uniform"].map(_pct),
        "real_only %": table["real_only"].map(_pct),
        "oracle − uniform (points)": table["headroom"].map(lambda v: _pct(v, signed=True)),
        "utility_oracle %": table["utility_oracle"].map(_pct),
        f"oracle ≥ {100 * ORACLE_TARGET:.0f} %": table["oracle_ok"].map(_flag),
        f"headroom ≥ {100 * HEADROOM_TARGET:.0f} points": table["headroom_ok"].map(_flag),
        "real_only below both": table["real_only_below"].map(_flag),
    })


def _method_display(table: pd.DataFrame) -> pd.DataFrame:
    def half(row: pd.Series) -> str:
        if _missing(row["half_width"]):
            return "–"
        text = f"{100 * row['half_width']:.1f}"
        return text + f" (> {100 * HALF_WIDTH_TARGET:.0f})" if row["too_wide"] else text

    def baseline(row: pd.Series) -> str:
        if _missing(row["baseline"]):
            return "–"
        return f"{_interval(row['vs_baseline'], row['vs_baseline_low'], row['vs_baseline_high'])} vs " \
               f"`{row['baseline']}`"

    rows = table.to_dict("records")
    return pd.DataFrame({
        "task": table["task"],
        "method": table["method"].map(lambda m: f"`{m}`"),
        "seeds": table["n"].astype(str),
        "success %": table["success"].map(_pct),
        "IQM %": table["iqm"].map(_pct),
        "Δ uniform (points)": [_interval(r["vs_uniform"], r["vs_uniform_low"], r["vs_uniform_high"]) for r in rows],
        "half-width": table.apply(half, axis=1),
        "Δ best baseline (points)": table.apply(baseline, axis=1),
        "P(> uniform)": table["p_improvement"].map(_num),
        "headroom recovered": table["headroom_recovered"].map(_num),
        "of utility_oracle's": table["headroom_recovered_utility"].map(_num),
        "test NLL": table["test_nll"].map(lambda v: _num(v, 3)),
        "Δ NLL vs uniform": [_interval(r["nll_vs_uniform"], r["nll_vs_uniform_low"], r["nll_vs_uniform_high"],
                                       scale=1.0, digits=3) for r in rows],
    })


def _utility_display(table: pd.DataFrame, value: str = "utility (points)") -> pd.DataFrame:
    rows = table.to_dict("records")
    return pd.DataFrame({
        "task": table["task"],
        "generator": table["generator"].map(lambda g: f"`{g}`"),
        "seeds": table["n"].astype(str),
        value: [_interval(r["utility"], r["low"], r["high"]) for r in rows],
        "harmful": table["harmful"].map(lambda v: _flag(v, "yes", "no")),
        "learned weight": table["learned_weight"].map(_num),
    })


def _weights_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "task": table["task"],
        "generators": table["generators"].astype(str),
        "ρ(learned weight, utility)": table["rho_utility"].map(_num),
        "ρ(row weight, quality)": table["rho_quality"].map(_num),
        "seeds with row weights": table["weight_seeds"].astype(str),
        "weight harmful / helpful": table["harmful_helpful_ratio"].map(_num),
        "ρ(learned weight, leave-one-out)": table["rho_leave_one_out"].map(_num),
    })


_DESCRIPTIONS = {
    "headroom": "Mean success (%) of the oracle, `uniform` and `real_only` per task, and whether the task leaves "
                f"room for reweighting (oracle ≥ {100 * ORACLE_TARGET:.0f} %, oracle − uniform ≥ "
                f"{100 * HEADROOM_TARGET:.0f} points, `real_only` below both). `utility_oracle` is a second bound: "
                "real rows plus the generators of positive measured utility (the label oracle keeps rows by a "
                "ground-truth label, which is not the same as helping the policy).",
    "methods": "Per task and method (pool `all`): mean and IQM of success over seeds, paired differences in "
               "points to `uniform` and to the best other non-oracle method, with 95 % paired-bootstrap intervals "
               f"(half-widths above {100 * HALF_WIDTH_TARGET:.0f} points marked), P(method > uniform) over seeds, "
               "share of the oracle's headroom recovered (and of `utility_oracle`'s, where it ran), and held-out "
               "test NLL.",
    "utility": "Utility of each generator: success of `uniform` trained on the real rows plus that generator's "
               "rows only, minus `real_only`'s, in points over shared seeds with its 95 % paired-bootstrap "
               "interval; harmful when negative; `learned`'s mean weight of the generator's rows beside it.",
    "leave_one_out": "Value of each generator inside the pool: success of `uniform` on the whole pool minus that of "
                     "`uniform` on the pool without that generator, in points over shared seeds with its 95 % "
                     "paired-bootstrap interval (negative: the pool does better without it); `learned`'s mean "
                     "weight of the generator's rows beside it.",
    "weights": "Whether `learned` weighs generators by utility: Spearman ρ of its mean weight per generator and "
               "the generator's utility, ρ of row weight and ground-truth row quality (mean over seeds), and the "
               "mean weight of harmful generators over that of helpful ones (< 1: harmful ones weigh less).",
}


def report_sections(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]] = (), n_boot: int = N_BOOT,
                    seed: int = 0) -> dict[str, str]:
    """The body (description line and table) of every ``results.md`` section, keyed as :data:`SECTIONS`.

    Args:
        frame: Runs as from :func:`load_frame`.
        records: The run records (for the weight analysis' per-row weights).
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        ``{key: markdown}`` in section order; a section without data says so instead of a table.
    """
    utility, leave_one_out = utility_table(frame, n_boot, seed), leave_one_out_table(frame, n_boot, seed)
    tables = {"headroom": (headroom_table(frame), _headroom_display),
              "methods": (method_table(frame, n_boot, seed), _method_display),
              "utility": (utility, _utility_display),
              "leave_one_out": (leave_one_out, lambda t: _utility_display(t, "value in the pool (points)")),
              "weights": (weight_analysis(frame, records, utility, leave_one_out), _weights_display)}
    empty = {"headroom": "No runs in the main comparison (pool `all`).",
             "methods": "No runs in the main comparison (pool `all`).",
             "utility": "No utility runs (`uniform` on a single generator's pool).",
             "leave_one_out": "No leave-one-out runs (`uniform` on the pool without one generator).",
             "weights": "No `learned` runs in the main comparison."}
    return {key: _DESCRIPTIONS[key] + "\n\n" + (markdown_table(display(table)) if len(table) else empty[key])
            for key, (table, display) in tables.items()}


def markdown(frame: pd.DataFrame, records: Sequence[Mapping[str, Any]] = (), command: str | None = None,
             n_boot: int = N_BOOT, seed: int = 0) -> str:
    """``results.md``: the command, then the headroom, methods, utility and weight analysis sections.

    Args:
        frame: Runs as from :func:`load_frame`.
        records: The run records (for the weight analysis' per-row weights).
        command: The command that ran the suite, shown at the top.
        n_boot: Bootstrap samples per interval.
        seed: Seed of every bootstrap.

    Returns:
        The markdown text.
    """
    lines = ["# BOOST benchmark: rollout success on held-out task instances", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if frame.empty:
        return "\n".join([*lines, "No finished runs yet.", ""])
    tasks, methods = sorted(frame["task"].dropna().unique()), order_methods(frame["method"].dropna())
    lines += [f"{len(frame)} runs; tasks {', '.join(tasks)}; methods {', '.join(f'`{m}`' for m in methods)}. "
              "Success is the share of held-out real task instances solved by greedy play. Comparisons are "
              f"paired by seed; intervals are {100 * LEVEL:.0f} % percentile intervals of {n_boot:,} bootstrap "
              "resamples of the seed pairs.", ""]
    for key, body in report_sections(frame, records, n_boot, seed).items():
        lines += [f"## {SECTIONS[key]}", "", body, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_reports(out_dir: str | Path, command: str | None = None) -> str:
    """Write ``results.csv`` and ``results.md`` under ``out_dir`` from its ``runs/*.json``.

    Args:
        out_dir: The suite directory.
        command: The command that ran the suite, shown at the top of ``results.md``.

    Returns:
        The markdown written to ``results.md``.
    """
    out_dir = Path(out_dir)
    records = load_records(out_dir)
    frame = frame_from_records(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(frame, out_dir / "results.csv")
    text = markdown(frame, records, command)
    (out_dir / "results.md").write_text(text)
    return text


def console_table(frame: pd.DataFrame) -> str:
    """A compact success table for the terminal: methods × tasks, mean success % over seeds (pool ``all``).

    Args:
        frame: Runs as from :func:`load_frame`.

    Returns:
        The table as plain text.
    """
    main = _main(frame)
    if main.empty:
        return "no runs in the main comparison (pool all)"
    means = main.pivot_table(index="method", columns="task", values="success_rate", aggfunc="mean")
    counts = main.pivot_table(index="method", columns="task", values="success_rate", aggfunc="count")
    tasks, methods = sorted(means.columns), order_methods(list(means.index))
    width = max(len(m) for m in [*methods, "method"])
    cell = max([len(t) for t in tasks] + [10]) + 2
    out = ["success % on held-out instances, mean over seeds (seeds)",
           f"{'method':<{width}}" + "".join(f"{t:>{cell}}" for t in tasks)]
    for m in methods:
        cells = [f"{_pct(means.loc[m, t])} ({int(counts.loc[m, t])})" if not _missing(means.loc[m, t]) else "–"
                 for t in tasks]
        out.append(f"{m:<{width}}" + "".join(f"{c:>{cell}}" for c in cells))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- README


def write_readme_section(readme_path: str | Path, markdown_or_frame: str | pd.DataFrame,
                         plots_dir_relative: str) -> str:
    """Replace the README text between the bench markers with the headroom, method and utility tables.

    The markers themselves stay. Images are linked for the figures of :data:`plots.PLOT_FILES` that exist under
    ``plots_dir_relative`` (relative to the README's folder).

    Args:
        readme_path: The README to edit in place.
        markdown_or_frame: ``results.md`` text (from :func:`write_reports`), whose sections are copied, or the runs
            as a DataFrame, from which the tables are computed.
        plots_dir_relative: Folder of the figures, relative to the README (as it appears in the links).

    Returns:
        The text now between the markers.

    Raises:
        ValueError: The README lacks either marker, or the end marker precedes the begin marker.
    """
    from boost_lightning.bench.plots import PLOT_FILES

    readme_path = Path(readme_path)
    text = readme_path.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0 or end < begin:
        raise ValueError(f"{readme_path} needs {README_BEGIN} followed by {README_END}")
    keys = ("headroom", "methods", "utility")
    if isinstance(markdown_or_frame, pd.DataFrame):
        bodies = report_sections(markdown_or_frame)
    else:
        bodies = _split_sections(markdown_or_frame)
    parts = [f"### {SECTIONS[k]}\n\n{bodies[k].strip()}" for k in keys if k in bodies]
    plots_dir = readme_path.parent / plots_dir_relative
    images = [f"![{caption}]({plots_dir_relative.rstrip('/')}/{name})" for name, caption in PLOT_FILES.items()
              if (plots_dir / name).is_file()]
    if images:
        parts.append("\n".join(images))
    block = "\n\n".join(parts)
    readme_path.write_text(text[:begin + len(README_BEGIN)] + "\n" + block + "\n" + text[end:])
    return block


def _split_sections(md: str) -> dict[str, str]:
    """``results.md`` section bodies keyed as :data:`SECTIONS` (by their ``## `` headings)."""
    by_title = {title: key for key, title in SECTIONS.items()}
    out: dict[str, str] = {}
    for chunk in re.split(r"^## ", md, flags=re.MULTILINE)[1:]:
        title, _, body = chunk.partition("\n")
        if title.strip() in by_title:
            out[by_title[title.strip()]] = body.strip()
    return out


