"""Write an embedded task's data: real demonstrations, a validation split and a heterogeneous synthetic pool.

``python -m boost_lightning.envs.synthesize --task maze --out DIR`` writes, in ``DIR``:

- ``real.jsonl``: ``--num-real`` expert demonstrations (seeds ``0..``), ``source: real``.
- ``validation.jsonl``: ``--num-validation`` expert demonstrations on disjoint seeds (``5000..``), ``source: real``.
- ``test.jsonl``: ``--num-test`` expert demonstrations on seeds ``7500..``, disjoint from validation and from the
  rollout instances, ``source: real``: the held-out real test split of the benchmark's NLL.
- ``synthetic.jsonl``: ``--num-synthetic`` rows (seeds ``20000..``), ``source: synthetic``, from five generator
  families (see ``generators.synthetic_pool``): conflicting task shift (``--conflicting-fraction``), benign shift
  (``--benign-fraction``), a reward-hacked simulator (``--hacked-fraction``), a hallucinating simulator
  (``--hallucinated-fraction``), and noisy experts at ``--noise-levels`` sharing the rest; plus ``--num-lm`` rows
  sampled from ``--lm-model`` if given.
- ``summary.json``: the settings and, per split and per generator, row counts, success rates, mean quality, turns
  and return.

Seeds from 10000 to 19999 are never written: they are the held-out instances of rollout evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from boost_lightning.envs.base import EVAL_SEED_START, TASKS, TEST_SEED_START, VALIDATION_SEED_START, task_spec
from boost_lightning.envs.generators import DEFAULT_SETTINGS, real_rows, synthetic_pool, test_rows, validation_rows

SPLITS = ("real", "validation", "test", "synthetic")


def build_splits(
    task: str,
    num_real: int = DEFAULT_SETTINGS["num_real"],
    num_validation: int = DEFAULT_SETTINGS["num_validation"],
    num_test: int = DEFAULT_SETTINGS["num_test"],
    num_synthetic: int = DEFAULT_SETTINGS["num_synthetic"],
    conflicting_fraction: float = DEFAULT_SETTINGS["conflicting_fraction"],
    benign_fraction: float = DEFAULT_SETTINGS["benign_fraction"],
    hacked_fraction: float = DEFAULT_SETTINGS["hacked_fraction"],
    hallucinated_fraction: float = DEFAULT_SETTINGS["hallucinated_fraction"],
    noise_levels: Sequence[float] = DEFAULT_SETTINGS["noise_levels"],
    hallucination_rate: float = DEFAULT_SETTINGS["hallucination_rate"],
    seed: int = DEFAULT_SETTINGS["seed"],
    progress: bool = False,
) -> dict[str, list[dict]]:
    """Generate the three splits in memory.

    Args:
        task: Task name.
        num_real: Real expert demonstrations (at most 5000).
        num_validation: Validation demonstrations (at most 2500).
        num_test: Test demonstrations (at most 2500).
        num_synthetic: Rows in the synthetic pool.
        conflicting_fraction: Share of conflicting-shift rows in the pool.
        benign_fraction: Share of benign-shift rows in the pool.
        hacked_fraction: Share of reward-hacked rows in the pool.
        hallucinated_fraction: Share of hallucinating-simulator rows in the pool.
        noise_levels: Noisy-expert levels sharing the rest of the pool.
        hallucination_rate: Per-turn probability of a made-up reply in hallucinated rows.
        seed: Synthetic pool seed (real and validation rows do not depend on it: they are the fixed real data).
        progress: Show a tqdm progress bar.

    Returns:
        ``{"real": rows, "validation": rows, "test": rows, "synthetic": rows}``.
    """
    task_spec(task)
    if not 0 <= num_real <= VALIDATION_SEED_START:
        raise ValueError(f"num_real must be in [0, {VALIDATION_SEED_START}]")
    if not (0 <= num_validation <= TEST_SEED_START - VALIDATION_SEED_START
            and 0 <= num_test <= EVAL_SEED_START - TEST_SEED_START):
        raise ValueError("num_validation and num_test must be in [0, 2500]")
    from tqdm.auto import tqdm

    with tqdm(total=num_real + num_validation + num_test + num_synthetic, desc=f"synthesize {task}", unit="traj",
              disable=not progress, file=sys.stderr) as bar:
        real = real_rows(task, num_real)
        bar.update(num_real)
        validation = validation_rows(task, num_validation)
        test = test_rows(task, num_test)
        bar.update(num_validation + num_test)
        synthetic = synthetic_pool(task, num_synthetic, conflicting_fraction=conflicting_fraction,
                                   benign_fraction=benign_fraction, hacked_fraction=hacked_fraction,
                                   hallucinated_fraction=hallucinated_fraction, noise_levels=noise_levels,
                                   hallucination_rate=hallucination_rate, seed=seed, on_row=lambda: bar.update(1))
    return {"real": real, "validation": validation, "test": test, "synthetic": synthetic}


def _stats(rows: list[dict]) -> dict[str, Any]:
    n = max(len(rows), 1)
    return {
        "count": len(rows),
        "success_rate": round(sum(r["meta"]["success"] for r in rows) / n, 4),
        "claimed_success_rate": round(sum(r["meta"]["claimed_success"] for r in rows) / n, 4),
        "mean_quality": round(sum(r["meta"]["quality"] for r in rows) / n, 4),
        "mean_turns": round(sum(r["meta"]["turns"] for r in rows) / n, 3),
        "mean_return": round(sum(r["reward"] for r in rows) / n, 4),
    }


def summarize(task: str, splits: dict[str, list[dict]], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pool composition and label statistics of generated splits.

    Returns:
        ``{"task", "settings", "eval_seed_start", "disjoint_instances", "splits": {split: stats},
        "generators": {generator: stats + fraction of the synthetic pool}}``.
    """
    by_generator: dict[str, list[dict]] = defaultdict(list)
    for row in splits.get("synthetic", []):
        by_generator[row["meta"]["generator"]].append(row)
    total = max(len(splits.get("synthetic", [])), 1)
    split_stats = {}
    for name, rows in splits.items():
        split_stats[name] = _stats(rows)
        split_stats[name]["unique_instances"] = len({json.dumps(r["meta"]["instance"], sort_keys=True) for r in rows})
    return {
        "task": task,
        "settings": settings or {},
        "eval_seed_start": EVAL_SEED_START,
        "disjoint_instances": task_spec(task).disjoint_instances,
        "splits": split_stats,
        "generators": {g: {**_stats(rows), "fraction": round(len(rows) / total, 4)}
                       for g, rows in sorted(by_generator.items())},
    }


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(out_dir: str | Path, task: str, splits: dict[str, list[dict]],
                 settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``real.jsonl``, ``validation.jsonl``, ``test.jsonl``, ``synthetic.jsonl`` and ``summary.json`` into
    ``out_dir``.

    Returns:
        The summary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", splits.get(name, []))
    summary = summarize(task, splits, settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synthesize(task: str, out_dir: str | Path, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Generate and write a task's splits (see :func:`build_splits` for ``settings``).

    Returns:
        The summary written to ``summary.json``.
    """
    splits = build_splits(task, progress=progress, **settings)
    return write_splits(out_dir, task, splits, _jsonable(settings))


def _jsonable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in settings.items()}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point; prints the summary."""
    parser = argparse.ArgumentParser(prog="python -m boost_lightning.envs.synthesize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, help="output directory")
    default = DEFAULT_SETTINGS
    parser.add_argument("--num-real", type=int, default=default["num_real"])
    parser.add_argument("--num-validation", type=int, default=default["num_validation"])
    parser.add_argument("--num-test", type=int, default=default["num_test"])
    parser.add_argument("--num-synthetic", type=int, default=default["num_synthetic"])
    parser.add_argument("--conflicting-fraction", type=float, default=default["conflicting_fraction"])
    parser.add_argument("--benign-fraction", type=float, default=default["benign_fraction"])
    parser.add_argument("--hacked-fraction", type=float, default=default["hacked_fraction"])
    parser.add_argument("--hallucinated-fraction", type=float, default=default["hallucinated_fraction"])
    parser.add_argument("--noise-levels", type=_floats, default=default["noise_levels"],
                        help="comma separated, e.g. 0.1,0.3")
    parser.add_argument("--hallucination-rate", type=float, default=default["hallucination_rate"])
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.add_argument("--lm-model", default=None, help="local HF causal LM directory that plays the task by sampling")
    parser.add_argument("--num-lm", type=int, default=0, help="episodes sampled from --lm-model (added to the pool)")
    parser.add_argument("--lm-temperature", type=float, default=1.0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    settings = {name: getattr(args, name) for name in DEFAULT_SETTINGS}
    settings["noise_levels"] = tuple(settings["noise_levels"])
    start = time.perf_counter()
    splits = build_splits(args.task, progress=not args.no_progress, **settings)
    if args.lm_model and args.num_lm:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from boost_lightning.envs.generators import lm_rows

        tokenizer = AutoTokenizer.from_pretrained(args.lm_model)
        model = AutoModelForCausalLM.from_pretrained(args.lm_model)
        splits["synthetic"] += lm_rows(model, tokenizer, args.task, args.num_lm, seed=args.seed,
                                       temperature=args.lm_temperature)
        settings.update(lm_model=args.lm_model, num_lm=args.num_lm, lm_temperature=args.lm_temperature)
    summary = write_splits(args.out, args.task, splits, _jsonable(settings))
    elapsed = time.perf_counter() - start
    print(json.dumps(summary, indent=2))
    total = sum(len(rows) for rows in splits.values())
    print(f"wrote {total} trajectories to {args.out} in {elapsed:.2f}s ({total / max(elapsed, 1e-9):.0f}/s)",
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
