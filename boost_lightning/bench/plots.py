"""Benchmark figures (matplotlib, Agg backend, small PNGs) from a suite's runs.

``success.png`` (success per task and method, paired interval to ``uniform``), ``weight_vs_utility.png`` (mean
learned weight per generator against its measured utility), ``ess.png`` (batch ESS / B over training),
``weight_per_generator.png`` (mean weight per generator over training) and ``weight_vs_quality.png`` (learned row
weight against ground-truth row quality).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boost_lightning.bench.report import (
    MAIN_POOL,
    frame_from_records,
    method_table,
    order_methods,
    spearman,
    utility_table,
)

DPI = 100

#: Figure file names and the captions the README links them with, in the order they are written.
PLOT_FILES = {
    "success.png": "success per task and method, paired 95 % interval to uniform",
    "weight_vs_utility.png": "mean learned weight per generator vs measured utility",
    "ess.png": "ESS over training",
    "weight_per_generator.png": "mean weight per generator over training",
    "weight_vs_quality.png": "learned row weight vs ground-truth quality",
}

Records = Sequence[Mapping[str, Any]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(names: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _frame(frame_or_records: pd.DataFrame | Records) -> pd.DataFrame:
    if isinstance(frame_or_records, pd.DataFrame):
        return frame_or_records
    return frame_from_records(frame_or_records)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _main_records(records: Records, method: str | None = None) -> list[Mapping[str, Any]]:
    """Records of the main comparison (pool ``all``), of ``method`` if given, sorted by task then seed."""
    picked = [r for r in records if r.get("row", {}).get("pool") == MAIN_POOL
              and (method is None or r["row"].get("method") == method)]
    return sorted(picked, key=lambda r: (str(r["row"].get("task")), r["row"].get("seed", 0)))


def _by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(str(r["row"]["task"]), []).append(r)
    return out


def _panels(count: int, height: float = 3.2):
    fig, axes = _plt().subplots(1, count, figsize=(4.2 * count, height), squeeze=False)
    return fig, axes[0]


def plot_success(frame_or_records: pd.DataFrame | Records, path: str | Path) -> Path | None:
    """Grouped bars of mean success (%) per task and method (pool ``all``).

    Each bar's whisker is the 95 % paired-bootstrap interval of (method − uniform) placed around the method's mean,
    so a whisker that crosses the task's ``uniform`` line is a difference the seeds do not resolve. Dashed and
    dotted segments mark the task's ``oracle`` and ``uniform`` means.

    Args:
        frame_or_records: Runs as a DataFrame (:func:`report.load_frame`) or run records.
        path: Output PNG.

    Returns:
        ``path``, or None without runs in the main comparison.
    """
    table = method_table(_frame(frame_or_records))
    if table.empty:
        return None
    tasks, methods = sorted(table["task"].unique()), order_methods(table["method"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(tasks) + 4), 3.6))
    width = 0.8 / len(methods)
    colours = _colours(methods)
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("task").reindex(tasks)
        ran = rows["success"].notna().to_numpy()  # a method missing on a task gets no bar there
        x = (np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width)[ran]
        mean = 100 * rows["success"].to_numpy(dtype=float)[ran]
        d, lo, hi = (rows[c].to_numpy(dtype=float)[ran] for c in ("vs_uniform", "vs_uniform_low", "vs_uniform_high"))
        err = np.nan_to_num(100 * np.vstack([d - lo, hi - d]))
        ax.bar(x, mean, width, yerr=err, label=method, color=colours[method], capsize=2,
               edgecolor="black" if method == "learned" else "none", linewidth=1.2)
    for t, task in enumerate(tasks):
        rows = table[table["task"] == task].set_index("method")["success"]
        for method, style in (("oracle", "--"), ("uniform", ":")):
            if method in rows and not math.isnan(rows[method]):
                ax.hlines(100 * rows[method], t - 0.45, t + 0.45, colors="black", linestyles=style, lw=1,
                          label=f"{method} (reference)" if t == 0 else None)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("success on held-out instances (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_weight_vs_utility(frame_or_records: pd.DataFrame | Records, path: str | Path) -> Path | None:
    """Per task: ``learned``'s mean weight per generator against the generator's measured utility.

    Horizontal whiskers are the utility's 95 % paired interval; the title gives Spearman's ρ of the points.

    Args:
        frame_or_records: Runs as a DataFrame (:func:`report.load_frame`) or run records.
        path: Output PNG.

    Returns:
        ``path``, or None when no task has both utility runs and ``learned`` weights.
    """
    table = utility_table(_frame(frame_or_records))
    table = table[table["utility"].notna() & table["learned_weight"].notna()]
    if table.empty:
        return None
    tasks = sorted(table["task"].unique())
    fig, axes = _panels(len(tasks), 3.4)
    for ax, task in zip(axes, tasks):
        rows = table[table["task"] == task]
        u, w = 100 * rows["utility"].to_numpy(dtype=float), rows["learned_weight"].to_numpy(dtype=float)
        err = np.nan_to_num(np.vstack([u - 100 * rows["low"].to_numpy(dtype=float),
                                       100 * rows["high"].to_numpy(dtype=float) - u]))
        ax.errorbar(u, w, xerr=err, fmt="o", capsize=2, color="tab:blue", ms=5)
        for name, x, y in zip(rows["generator"], u, w):
            ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.margins(0.15)  # room for the generator names at the edges
        rho = spearman(w, u)
        ax.set_title(f"{task}: ρ = {'–' if math.isnan(rho) else f'{rho:.2f}'}", fontsize=9)
        ax.set_xlabel("utility: success − real_only (points)")
        ax.set_ylabel("mean learned weight (pool mean = 1)")
    return _save(fig, path)


def plot_ess(records: Records, path: str | Path) -> Path | None:
    """Per task: batch ESS / B over training, one line per run of the main comparison that logged it.

    Args:
        records: Run records (their ``history``).
        path: Output PNG.

    Returns:
        ``path``, or None when no run has an ESS history.
    """
    runs = [r for r in _main_records(records) if (r.get("history") or {}).get("ess_fraction")]
    if not runs:
        return None
    by_task = _by_task(runs)
    colours = _colours(order_methods([r["row"]["method"] for r in runs]))
    fig, axes = _panels(len(by_task))
    for ax, (task, task_runs) in zip(axes, by_task.items()):
        labelled: set[str] = set()
        for r in task_runs:
            method = r["row"]["method"]
            ax.plot(r["history"]["step"], r["history"]["ess_fraction"], color=colours[method], lw=1.2, alpha=0.8,
                    label=None if method in labelled else method)
            labelled.add(method)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("inner step")
        ax.set_ylabel("ESS / B")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_weight_per_generator(records: Records, path: str | Path) -> Path | None:
    """Per task: ``learned``'s mean weight per generator in the training batches over inner steps, mean over seeds.

    Args:
        records: Run records (their ``history.generators``).
        path: Output PNG.

    Returns:
        ``path``, or None when no ``learned`` run logged generator weights.
    """
    runs = [r for r in _main_records(records, "learned") if (r.get("history") or {}).get("generators")]
    if not runs:
        return None
    by_task = _by_task(runs)
    fig, axes = _panels(len(by_task))
    for ax, (task, task_runs) in zip(axes, by_task.items()):
        history = pd.DataFrame([h for r in task_runs for h in r["history"]["generators"]])
        # Seeds log the same steps, so the per-step mean is the mean over seeds.
        history = history.groupby("step").mean(numeric_only=True).sort_index()
        names = sorted(history.columns)
        colours = _colours(names)
        for name in names:
            ax.plot(history.index, history[name], label=name, color=colours[name], lw=1.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{task} ({len(task_runs)} seeds)", fontsize=9)
        ax.set_xlabel("inner step")
        ax.set_ylabel("mean weight in batch")
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def plot_weight_vs_quality(records: Records, path: str | Path) -> Path | None:
    """Per task: every synthetic row's learned weight against its ground-truth quality, coloured by generator.

    One ``learned`` run per task (the lowest seed): several seeds in one panel would hide each other.

    Args:
        records: Run records (their ``weights``).
        path: Output PNG.

    Returns:
        ``path``, or None when no ``learned`` run recorded row weights.
    """
    runs = [r for r in _main_records(records, "learned") if (r.get("weights") or {}).get("synthetic")]
    if not runs:
        return None
    first = {task: task_runs[0] for task, task_runs in _by_task(runs).items()}
    fig, axes = _panels(len(first), 3.4)
    rng = np.random.default_rng(0)
    for ax, (task, run) in zip(axes, first.items()):
        synthetic = run["weights"]["synthetic"]
        w, q = np.asarray(synthetic["weight"], dtype=float), np.asarray(synthetic["quality"], dtype=float)
        g = np.asarray(synthetic["generator"], dtype=str)
        names = sorted(set(g.tolist()))
        colours = _colours(names)
        for name in names:
            mask = g == name
            # Many rows share a quality (0 for every task-shifted row): jitter keeps the colours visible.
            ax.scatter(q[mask] + rng.uniform(-0.02, 0.02, mask.sum()), w[mask], s=5, alpha=0.5, color=colours[name],
                       label=name, linewidths=0)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        rho = spearman(w, q)
        ax.set_title(f"{task} (seed {run['row'].get('seed')}): ρ = {'–' if math.isnan(rho) else f'{rho:.2f}'}",
                     fontsize=9)
        ax.set_xlabel("ground-truth quality")
        ax.set_ylabel("learned weight (pool mean = 1)")
        positive = w[np.isfinite(w)]
        if positive.size and positive.min() > 0 and positive.max() / positive.min() > 10:
            ax.set_yscale("log")  # a peaked head spans decades; a nearly uniform one reads better linearly
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return _save(fig, path)


def write_plots(out_dir: str | Path, records: Records) -> list[Path]:
    """Every figure of :data:`PLOT_FILES` that the runs allow, under ``out_dir``.

    Args:
        out_dir: Output folder (the suite directory).
        records: The suite's run records.

    Returns:
        The written paths, in :data:`PLOT_FILES` order.
    """
    out_dir = Path(out_dir)
    frame = frame_from_records(records)
    made = [plot_success(frame, out_dir / "success.png"),
            plot_weight_vs_utility(frame, out_dir / "weight_vs_utility.png"),
            plot_ess(records, out_dir / "ess.png"),
            plot_weight_per_generator(records, out_dir / "weight_per_generator.png"),
            plot_weight_vs_quality(records, out_dir / "weight_vs_quality.png")]
    return [p for p in made if p is not None]
