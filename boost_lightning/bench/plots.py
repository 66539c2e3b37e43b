"""Benchmark figures (matplotlib, Agg backend, small PNGs).

``success.png`` (success per method and task, 95 % CI bars), ``weight_vs_quality.png`` (learned weight vs
ground-truth quality, coloured by generator), ``weight_per_generator.png`` (mean learned weight per generator over
training), ``ess.png`` (batch ESS / B over training) and ``ablation.png`` (success and ESS along the ablation axes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boost_lightning.bench.report import ablation_rows, mean_ci, summarize

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_learned(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the main-comparison ``learned`` run with the lowest seed."""
    picked: dict[str, dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: r["spec"]["seed"]):
        if r["spec"]["method"] == "learned" and "main" in r["spec"]["axes"] and "weights" in r:
            picked.setdefault(r["spec"]["task"], r)
    order = summarize(results)["tasks"]
    return {t: picked[t] for t in [*order, *sorted(set(picked) - set(order))] if t in picked}


def _colours(names: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot_success(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: success (%) per task, one bar per method, 95 % CI whiskers."""
    s = summarize(results)
    tasks, methods = s["tasks"], s["methods"]
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 3), 3.4))
    width = 0.8 / max(len(methods), 1)
    colours = _colours(methods)
    for i, m in enumerate(methods):
        stats = [mean_ci(s["success"].get((m, t), [])) for t in tasks]
        means = [100 * (0 if math.isnan(mu) else mu) for mu, _ in stats]
        errs = [0 if math.isnan(h) else 100 * h for _, h in stats]
        ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=errs,
               label=m, color=colours[m], capsize=2, edgecolor="black" if m == "learned" else "none", linewidth=1.2)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("success on held-out instances (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_weight_vs_quality(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Per task: every synthetic row's learned weight against its ground-truth quality, coloured by generator."""
    runs = _first_learned(results)
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (task, run) in zip(axes[0], runs.items()):
        syn = run["weights"]["synthetic"]
        gens = sorted(set(syn["generator"]))
        colours = _colours(gens)
        w, q = np.asarray(syn["weight"]), np.asarray(syn["quality"])
        g = np.asarray(syn["generator"])
        for name in gens:
            mask = g == name
            # Shifted and hallucinated rows all have quality 0: jitter spreads the pile so colours stay visible.
            ax.scatter(q[mask] + rng.uniform(-0.02, 0.02, mask.sum()), w[mask], s=5, alpha=0.5, color=colours[name],
                       label=name, linewidths=0)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{task} (seed {run['spec']['seed']})", fontsize=9)
        ax.set_xlabel("ground-truth quality (meta.quality)")
        ax.set_ylabel("learned weight (pool mean = 1)")
        if w.size and w.min() > 0 and w.max() / w.min() > 10:
            ax.set_yscale("log")  # a peaked head spans decades; a nearly uniform one reads better linearly
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return _save(fig, path)


def plot_weight_per_generator(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Per task: mean learned weight per generator (as seen in training batches) over inner steps."""
    runs = {t: r for t, r in _first_learned(results).items() if r["history"]["generators"]}
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (task, run) in zip(axes[0], runs.items()):
        history = run["history"]["generators"]
        names = sorted({k for h in history for k in h if k != "step"})
        colours = _colours(names)
        xs = [h["step"] for h in history]  # WeightDiagnostics records the module's inner steps
        for name in names:
            ax.plot(xs, [h.get(name, math.nan) for h in history], label=name, color=colours[name], lw=1.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("inner step")
        ax.set_ylabel("mean weight in batch")
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def plot_ess(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Batch ESS / B over training: ``learned`` per task, and the regulariser-strength ablation."""
    learned = [r for r in results if r["spec"]["method"] == "learned" and r["history"]["ess_fraction"]]
    if not learned:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in learned:
        if "main" in r["spec"]["axes"]:
            by_task[r["spec"]["task"]].append(r)
    colours = _colours(list(by_task))
    for task, runs in by_task.items():
        for i, r in enumerate(runs):
            axes[0].plot(r["history"]["step"], r["history"]["ess_fraction"], color=colours[task], lw=1.2,
                         alpha=0.8, label=task if i == 0 else None)
    axes[0].set_title("BOOST, main comparison", fontsize=9)
    reg = [r for r in learned if "regularizer" in r["spec"]["axes"]]
    strengths = sorted({r["spec"]["regularizer_strength"] for r in reg})
    colours = _colours([f"{v:g}" for v in strengths])
    for r in sorted(reg, key=lambda r: r["spec"]["regularizer_strength"]):
        v = f"{r['spec']['regularizer_strength']:g}"
        axes[1].plot(r["history"]["step"], r["history"]["ess_fraction"], color=colours[v], lw=1.2,
                     label=f"ESS penalty {v}")
    axes[1].set_title("regulariser strength (ablation)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("inner step")
        ax.set_ylabel("ESS / B")
        ax.set_ylim(0, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ablation(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Success along each ablation axis (one line per method), ESS and ρ on the regulariser axis."""
    axes_present = [a for a in ("shifted", "pool", "regularizer") if ablation_rows(results, a)]
    if not axes_present:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(axes_present), figsize=(3.6 * len(axes_present), 3.2), squeeze=False)
    labels = {"shifted": "share of task-shifted synthetic rows", "pool": "synthetic pool size",
              "regularizer": "ESS regulariser strength (learned)"}
    for ax, axis in zip(axes[0], axes_present):
        rows = ablation_rows(results, axis)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        colours = _colours(methods)
        for m in methods:
            points: dict[Any, list[float]] = defaultdict(list)
            for r in rows:
                if r["method"] == m:
                    points[r["_key"]].append(r["success_rate"])
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            ax.errorbar(xs, [100 * mu for mu, _ in stats], yerr=[0 if math.isnan(h) else 100 * h for _, h in stats],
                        marker="o", label=f"{m} success", color=colours[m], capsize=2)
        if axis == "regularizer":
            twin = ax.twinx()
            pts = defaultdict(list)
            for r in rows:
                if r.get("pool_ess_fraction") is not None:
                    pts[r["_key"]].append(r["pool_ess_fraction"])
            xs = sorted(pts)
            twin.plot(xs, [np.mean(pts[x]) for x in xs], ls="--", marker="s", color="grey", label="pool ESS / N")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("pool ESS / N", fontsize=8)
            twin.legend(fontsize=7, loc="lower right")
        ax.set_xlabel(labels[axis], fontsize=8)
        ax.set_ylabel("success (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def write_plots(out_dir: Path, results: Sequence[dict[str, Any]]) -> list[Path]:
    """Every figure that the finished runs allow, under ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    made = [plot_success(results, out_dir / "success.png"),
            plot_weight_vs_quality(results, out_dir / "weight_vs_quality.png"),
            plot_weight_per_generator(results, out_dir / "weight_per_generator.png"),
            plot_ess(results, out_dir / "ess.png"),
            plot_ablation(results, out_dir / "ablation.png")]
    return [p for p in made if p is not None]
