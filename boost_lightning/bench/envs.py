"""Speed of the embedded tasks: environment steps/s, synthesizer trajectories/s, and trajectory token lengths.

``python -m boost_lightning.bench.envs [--num 2000] [--seconds 1.0] [--no-tokens]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from boost_lightning.envs.base import SYNTHETIC_SEED_START, TASKS, make_env
from boost_lightning.envs.synthesize import build_splits


def env_steps_per_second(task: str, seconds: float = 1.0) -> float:
    """Steps/s of the real environment driven by a noisy expert (0.3), parsing included."""
    env = make_env(task)
    rng = random.Random(0)
    steps, seed = 0, SYNTHETIC_SEED_START
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed)
        seed += 1
        done = False
        while not done:
            action = env.random_action(rng) if rng.random() < 0.3 else env.expert_action()
            _, _, done, _ = env.step(action)
            steps += 1
    return steps / (time.perf_counter() - start)


def token_lengths(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per-generator token lengths (chat template applied) under a 1024-vocab tokenizer trained on ``rows``."""
    from boost_lightning.data.tokenizer import train_chat_tokenizer

    tok = train_chat_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=1024)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    by_generator: dict[str, list[int]] = {}
    for row, n in zip(rows, lengths):
        by_generator.setdefault(row["meta"]["generator"], []).append(n)
    return {g: {"mean": statistics.mean(v), "p95": sorted(v)[int(0.95 * (len(v) - 1))], "max": max(v)}
            for g, v in sorted(by_generator.items())}


def main(argv: Sequence[str] | None = None) -> None:
    """Print the figures for every task."""
    parser = argparse.ArgumentParser(prog="python -m boost_lightning.bench.envs", description=__doc__)
    parser.add_argument("--num", type=int, default=2000, help="synthetic trajectories generated per task")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent measuring env steps per task")
    parser.add_argument("--no-tokens", action="store_true", help="skip the token length statistics")
    args = parser.parse_args(argv)
    print(f"{'task':<18}{'env steps/s':>12}{'synth traj/s':>14}{'trajectories':>14}{'seconds':>9}")
    lengths = {}
    for task in TASKS:
        steps = env_steps_per_second(task, args.seconds)
        start = time.perf_counter()
        splits = build_splits(task, num_synthetic=args.num)
        elapsed = time.perf_counter() - start
        total = sum(len(rows) for rows in splits.values())
        print(f"{task:<18}{steps:>12,.0f}{total / elapsed:>14,.0f}{total:>14,}{elapsed:>9.2f}")
        if not args.no_tokens:
            lengths[task] = token_lengths([r for rows in splits.values() for r in rows])
    for task, stats in lengths.items():
        print(f"\ntokens per trajectory ({task}, 1024-vocab byte BPE, chat template):")
        for generator, s in stats.items():
            print(f"  {generator:<28} mean {s['mean']:6.1f}  p95 {s['p95']:4d}  max {s['max']:4d}")


if __name__ == "__main__":
    main()
