"""Benchmark reports: ``results.csv`` (one row per run), ``results.md`` (mean ± 95 % CI, weight analysis, ablation).

Numpy only (no scipy at run time): Student-t quantiles come from a table, Spearman's ρ is the Pearson correlation
of average ranks.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Two-sided 95 % Student-t quantiles t_{0.975, df}; between tabulated df the smaller df is used (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom (beyond 120: the Cornish-Fisher expansion around z = 1.95996)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df > 120:
        z = 1.959964
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: Iterable[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % Student-t confidence interval (NaN half-width for fewer than 2 values)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    return float(x.mean()), t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as ``scipy.stats.rankdata``'s default)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=float)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); NaN if either side is constant or too short."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    if len(x) < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def weight_analysis(weights: dict[str, Any]) -> dict[str, float]:
    """What the learned weights say about the ground truth (a run's ``weights`` record, see ``score_pool``).

    Returns:
        ``spearman_quality`` (ρ of weight and ``meta.quality`` over synthetic rows), ``spearman_on_distribution``
        (the same over on-distribution synthetic rows only), mean weights of on-distribution
        synthetic rows (neither shifted nor hallucinated), shifted and hallucinated rows and their ratios to the
        on-distribution mean, the real rows' mean weight, and the weight mass on real vs synthetic rows next to
        their share of rows. Weights are relative to the pool mean (= 1).
    """
    syn = weights["synthetic"]
    w = np.asarray(syn["weight"], dtype=float)
    shifted = np.asarray(syn["shifted"], dtype=bool)
    halluc = np.asarray(syn["hallucinated"], dtype=bool)
    on_dist = ~shifted & ~halluc
    real = np.asarray(weights["real_weights"], dtype=float)

    def mean(mask: np.ndarray) -> float:
        return float(w[mask].mean()) if mask.any() else math.nan

    on, sh, ha = mean(on_dist), mean(shifted), mean(halluc)
    total = float(w.sum() + real.sum())
    quality = np.asarray(syn["quality"], dtype=float)
    return {
        "spearman_quality": spearman(w.tolist(), quality.tolist()),
        "spearman_on_distribution": spearman(w[on_dist].tolist(), quality[on_dist].tolist()),
        "weight_on_distribution": on,
        "weight_shifted": sh,
        "weight_hallucinated": ha,
        "shifted_ratio": sh / on if on > 0 else math.nan,
        "hallucinated_ratio": ha / on if on > 0 else math.nan,
        "weight_real": float(real.mean()) if real.size else math.nan,
        "mass_real": float(real.sum()) / total if total > 0 else math.nan,
        "share_real": real.size / max(real.size + w.size, 1),
        "pool_ess_fraction": float(weights.get("pool_ess_fraction", math.nan)),
    }


def generator_means(weights: dict[str, Any]) -> dict[str, float]:
    """Mean learned weight per ground-truth generator (synthetic rows) and of the real rows."""
    groups: dict[str, list[float]] = defaultdict(list)
    for w, g in zip(weights["synthetic"]["weight"], weights["synthetic"]["generator"]):
        groups[g].append(w)
    out = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
    if weights["real_weights"]:
        out["real (expert)"] = float(np.mean(weights["real_weights"]))
    return out


CSV_FIELDS = ("run_id", "task", "method", "seed", "shifted_fraction", "num_synthetic", "regularizer_strength", "axes",
              "success_rate", "mean_return", "mean_turns", "val_loss", "inner_steps", "outer_steps", "ess_fraction",
              "pool_ess_fraction", "spearman_quality", "spearman_on_distribution", "shifted_ratio",
              "hallucinated_ratio", "mass_real", "train_seconds", "eval_seconds", "model", "preset")


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a run record (spec, metrics, weight analysis, final ``tradeoff/*`` values)."""
    spec, metrics = result["spec"], result["metrics"]
    row: dict[str, Any] = {**{k: spec[k] for k in ("task", "method", "seed", "shifted_fraction", "num_synthetic",
                                                   "regularizer_strength")},
                           "run_id": result["run_id"], "axes": "+".join(spec["axes"]),
                           "model": result.get("model"), "preset": result["preset"]["name"]}
    row.update({k: metrics.get(k) for k in CSV_FIELDS if k in metrics})
    if "weights" in result:
        analysis = weight_analysis(result["weights"])
        row.update({k: analysis[k] for k in ("spearman_quality", "spearman_on_distribution", "shifted_ratio",
                                             "hallucinated_ratio", "mass_real")})
    row.update(result.get("tradeoff", {}))
    return row


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    """``results.csv``: one row per run; extra columns for any ``tradeoff/*`` metrics the runs logged."""
    rows = [flatten(r) for r in results]
    extra = sorted({k for row in rows for k in row} - set(CSV_FIELDS))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *extra])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in writer.fieldnames})


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def fmt_ci(mean: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"31.2 ± 4.0"`` (``scale`` 100 turns rates into percent); ``"31.2"`` with one value."""
    if math.isnan(mean):
        return "–"
    if math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def _f(v: float, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates the reports are written from.

    Returns:
        ``{"tasks", "methods", "success": {(method, task): [rates]}, "analysis": {task: [weight_analysis]},
        "generators": {task: [generator_means]}, "alignment": {task: [per-generator alignment]}, ...}`` for the
        main comparison.
    """
    from boost_lightning.envs.base import TASKS
    from boost_lightning.weightings import WEIGHTINGS

    main = [r for r in results if "main" in r["spec"]["axes"]]
    tasks = _ordered((r["spec"]["task"] for r in main), TASKS)
    methods = _ordered((r["spec"]["method"] for r in main), WEIGHTINGS)
    success: dict[tuple[str, str], list[float]] = defaultdict(list)
    val_loss: dict[tuple[str, str], list[float]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    analysis: dict[str, list[dict[str, float]]] = defaultdict(list)
    generators: dict[str, list[dict[str, float]]] = defaultdict(list)
    alignment: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in main:
        key = (r["spec"]["method"], r["spec"]["task"])
        success[key].append(r["metrics"]["success_rate"])
        if r["metrics"].get("val_loss") is not None:
            val_loss[key].append(r["metrics"]["val_loss"])
        seconds[r["spec"]["method"]].append(r["metrics"]["train_seconds"])
        if "weights" in r:
            analysis[r["spec"]["task"]].append(weight_analysis(r["weights"]))
            generators[r["spec"]["task"]].append(generator_means(r["weights"]))
        if r.get("alignment"):
            alignment[r["spec"]["task"]].append(r["alignment"])
    wins = []
    if "learned" in methods:
        for task in tasks:
            boost = np.mean(success.get(("learned", task), [math.nan]))
            others = [np.mean(success[(m, task)]) for m in methods if m != "learned" and (m, task) in success]
            # A task that no method solved at all compares nothing: it counts as neither a win nor a loss.
            if others and not math.isnan(boost) and boost >= max(others) and max(boost, *others) > 0:
                wins.append(task)
    unsolved = [t for t in tasks if not any(np.mean(success[(m, t)]) > 0 for m in methods if (m, t) in success)]
    return {"tasks": tasks, "methods": methods, "success": success, "val_loss": val_loss, "seconds": seconds,
            "analysis": analysis, "generators": generators, "alignment": alignment, "boost_best_on": wins,
            "unsolved": unsolved}


def _mean_of(dicts: Sequence[dict[str, float]], key: str) -> float:
    vals = [d[key] for d in dicts if key in d and not math.isnan(d[key])]
    return float(np.mean(vals)) if vals else math.nan


def markdown(results: Sequence[dict[str, Any]], command: str | None = None) -> str:
    """``results.md``: main table (success %, mean ± 95 % CI over seeds), weight analysis, ablation tables."""
    if not results:
        return "# Benchmark\n\nNo finished runs yet.\n"
    s = summarize(results)
    preset = results[0]["preset"]
    lines = ["# BOOST vs baselines: rollout success on held-out task instances", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Preset `{preset['name']}`, model `{results[0].get('model')}`, device `{results[0].get('accelerator')}`"
        + "".join(sorted({f", learned head reweights `{r['head_reweight']}` rows" for r in results
                          if r.get("head_reweight", "all") != "all"}))
        + ". "
        f"Same budget for every method: {preset['steps']} inner (policy) steps, batch {preset['batch_size']}, "
        f"policy lr {preset['lr']:g}, {preset['num_real']} real + {preset['num_synthetic']} synthetic trajectories "
        f"({preset['shifted_fraction']:.0%} task-shifted, {preset['hallucinated_fraction']:.0%} hallucinated). "
        "`learned` (BOOST) and `l2rw` also compute a hypergradient on a validation batch every inner step: extra "
        "compute that the budget (counted in inner steps) does not charge them for. Success is the share of "
        f"{preset['episodes']} held-out real instances (evaluation seeds, never in any training split) solved by "
        "greedy play, in percent, mean ± 95 % CI (Student t) over seeds.",
        "",
    ]
    tasks, methods = s["tasks"], s["methods"]
    if tasks:
        lines += ["| method | " + " | ".join(tasks) + " | mean | train s |",
                  "|---|" + "---|" * (len(tasks) + 2)]
        best = {t: max(np.mean(s["success"][(m, t)]) for m in methods if (m, t) in s["success"]) for t in tasks}
        for m in methods:
            cells, means = [], []
            for t in tasks:
                vals = s["success"].get((m, t), [])
                mean, half = mean_ci(vals)
                cell = fmt_ci(mean, half)
                cells.append(f"**{cell}**" if vals and np.mean(vals) == best[t] else cell)
                means.append(mean)
            overall = float(np.nanmean(means)) if not all(math.isnan(x) for x in means) else math.nan
            lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {_f(overall * 100, 1)} | "
                         f"{_f(float(np.mean(s['seconds'][m])), 0)} |")
        lines.append("")
        if "learned" in methods and len(methods) > 1:
            lines += [f"BOOST (`learned`) is at least as good as every baseline on {len(s['boost_best_on'])} of "
                      f"{len(tasks)} tasks" + (f" ({', '.join(s['boost_best_on'])})." if s["boost_best_on"] else ".")
                      + (f" No method solved any instance of {', '.join(s['unsolved'])} (not counted)."
                         if s["unsolved"] else ""), ""]
    lines += _val_loss_section(s)
    lines += _weight_section(s)
    lines += _tradeoff_section(results)
    lines += _ablation_section(results)
    return "\n".join(lines).rstrip() + "\n"


def _val_loss_section(s: dict[str, Any]) -> list[str]:
    """Held-out real validation loss per method × task: the quantity the outer level of BOOST minimises."""
    tasks, methods = s["tasks"], s["methods"]
    if not tasks or not s["val_loss"]:
        return []
    lines = ["## Held-out real validation loss", "",
             "Agent-token NLL of the real validation trajectories after training (lower is better), mean ± 95 % CI "
             "over seeds: the objective BOOST's outer level minimises.", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    best = {t: min((np.mean(s["val_loss"][(m, t)]) for m in methods if (m, t) in s["val_loss"]), default=math.nan)
            for t in tasks}
    for m in methods:
        cells = []
        for t in tasks:
            vals = s["val_loss"].get((m, t), [])
            cell = fmt_ci(*mean_ci(vals), scale=1.0, digits=3)
            cells.append(f"**{cell}**" if vals and np.mean(vals) == best[t] else cell)
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _weight_section(s: dict[str, Any]) -> list[str]:
    if not s["analysis"]:
        return []
    lines = ["## Learned weights vs ground truth", "",
             "Every training row scored by the trained head, normalised over the whole pool (pool mean = 1); the "
             "ground truth (`meta`) is never shown to the head. ρ: Spearman correlation of weight and "
             "`meta.quality` over synthetic rows. On-distribution: synthetic rows that are neither task-shifted "
             "nor hallucinated. Mean over seeds.", "",
             "| task | ρ(weight, quality) | ρ on-dist only | on-distribution | shifted (× on-dist) | "
             "hallucinated (× on-dist) | real rows | weight mass real (row share) | pool ESS / N |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in [t for t in s["tasks"] if t in s["analysis"]]:
        analyses = s["analysis"][task]
        a = {k: _mean_of(analyses, k) for k in analyses[0]}
        lines.append(
            f"| {task} | {_f(a['spearman_quality'])} | {_f(a.get('spearman_on_distribution', math.nan))} | "
            f"{_f(a['weight_on_distribution'])} | "
            f"{_f(a['weight_shifted'])} ({_f(a['shifted_ratio'])}×) | {_f(a['weight_hallucinated'])} "
            f"({_f(a['hallucinated_ratio'])}×) | {_f(a['weight_real'])} | {a['mass_real']:.1%} "
            f"({a['share_real']:.1%}) | {_f(a['pool_ess_fraction'])} |")
    lines += ["", "Mean weight per generator:", ""]
    for task in [t for t in s["tasks"] if t in s["generators"]]:
        gens = s["generators"][task]
        keys = list(dict.fromkeys(k for g in gens for k in g))
        lines.append(f"- {task}: " + ", ".join(f"{k} {_mean_of(gens, k):.2f}" for k in keys))
    lines.append("")
    if s["alignment"]:
        lines += ["What the validation loss asked for: mean alignment −gᵢ / rms(g) of the rows of each generator over "
                  "every outer step (gᵢ = ∂L_val/∂wᵢ, scaled per batch as the head sees it). Positive: a larger "
                  "weight lowers the held-out real validation loss. The head can only learn what this signal says.",
                  ""]
        for task in [t for t in s["tasks"] if t in s["alignment"]]:
            runs = s["alignment"][task]
            keys = list(dict.fromkeys(k for a in runs for k in a))
            lines.append(f"- {task}: " + ", ".join(f"{k} {_mean_of(runs, k):+.2f}" for k in keys))
        lines.append("")
    return lines


def _tradeoff_section(results: Sequence[dict[str, Any]]) -> list[str]:
    """Final values of the ``tradeoff/*`` metrics the module logged (mean over seeds), if any."""
    main = [r for r in results if "main" in r["spec"]["axes"] and r.get("tradeoff")]
    keys = sorted({k for r in main for k in r["tradeoff"]})
    if not keys:
        return []
    grouped: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for r in main:
        grouped[(r["spec"]["method"], r["spec"]["task"])].append(r["tradeoff"])
    lines = ["## Trade-off terms at the end of training", "",
             "| method | task | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for (method, task), values in sorted(grouped.items()):
        lines.append(f"| `{method}` | {task} | " + " | ".join(_f(_mean_of(values, k), 3) for k in keys) + " |")
    return [*lines, ""]


def ablation_rows(results: Sequence[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Runs on one ablation axis (``shifted``, ``pool``, ``regularizer``), flattened, sorted by axis value."""
    key = {"shifted": "shifted_fraction", "pool": "num_synthetic", "regularizer": "regularizer_strength"}[axis]
    rows = [flatten(r) | {"_key": r["spec"][key]} for r in results if axis in r["spec"]["axes"]]
    return sorted(rows, key=lambda r: (r["method"], r["_key"], r["seed"]))


def _ablation_section(results: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    titles = {"shifted": ("Share of task-shifted synthetic rows", "shifted fraction", lambda v: f"{v:.0%}"),
              "pool": ("Synthetic pool size", "pool size", lambda v: f"{v:d}"),
              "regularizer": ("ESS regulariser strength of the head (`learned`)", "strength", lambda v: f"{v:g}")}
    for axis, (title, label, fmt) in titles.items():
        rows = ablation_rows(results, axis)
        if not rows:
            continue
        if not lines:
            lines += ["## Ablation: diversity vs task-shift vs ESS", "",
                      f"On `{rows[0]['task']}`; everything else as in the main comparison.", ""]
        lines += [f"### {title}", "",
                  f"| method | {label} | success % | ESS / B (end of training) | pool ESS / N | ρ(weight, quality) | "
                  "shifted × on-dist | hallucinated × on-dist |",
                  "|---|---|---|---|---|---|---|---|"]
        grouped: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            grouped[(row["method"], row["_key"])].append(row)
        for (method, value), group in grouped.items():
            def col(name: str, group=group) -> float:
                return _mean_of([{name: g[name]} for g in group if g.get(name) is not None], name)

            mean, half = mean_ci([g["success_rate"] for g in group])
            lines.append(f"| `{method}` | {fmt(value)} | {fmt_ci(mean, half)} | {_f(col('ess_fraction'))} | "
                         f"{_f(col('pool_ess_fraction'))} | {_f(col('spearman_quality'))} | "
                         f"{_f(col('shifted_ratio'))} | {_f(col('hallucinated_ratio'))} |")
        lines.append("")
    return lines


def console_table(results: Sequence[dict[str, Any]]) -> str:
    """A compact success table (percent, mean over seeds) for the terminal."""
    s = summarize(results)
    tasks, methods = s["tasks"], s["methods"]
    width = max([len(m) for m in methods] + [8])
    out = ["success % (held-out rollouts, mean over seeds)",
           f"{'method':<{width}}" + "".join(f"{t[:16]:>18}" for t in tasks)]
    for m in methods:
        cells = [fmt_ci(*mean_ci(s["success"].get((m, t), []))) for t in tasks]
        out.append(f"{m:<{width}}" + "".join(f"{c:>18}" for c in cells))
    for task in [t for t in tasks if t in s["analysis"]]:
        analyses = s["analysis"][task]
        a = {k: _mean_of(analyses, k) for k in analyses[0]}
        out.append(f"learned weights on {task}: rho(weight, quality) {_f(a['spearman_quality'])} "
                   f"({_f(a.get('spearman_on_distribution', math.nan))} on-distribution only), shifted "
                   f"{_f(a['shifted_ratio'])}x and hallucinated {_f(a['hallucinated_ratio'])}x the on-distribution "
                   f"mean, real rows {_f(a['weight_real'])}, weight mass on real {a['mass_real']:.1%} "
                   f"(row share {a['share_real']:.1%})")
    return "\n".join(out)


def write_reports(out_dir: Path, results: Sequence[dict[str, Any]], command: str | None = None) -> str:
    """Write ``results.csv`` and ``results.md`` under ``out_dir``; return the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "results.csv", results)
    text = markdown(results, command)
    (out_dir / "results.md").write_text(text)
    return text
