"""Tokenization throughput of the data layer: ``python -m boost_lightning.bench.data``.

Generates synthetic six-turn maze-like trajectories into a temporary directory, trains a ChatML tokenizer on them
(saved there and reloaded, as a user's tokenizer would be), then loads the file twice through ``load_split``: cold
(fresh cache directory: read, validate, render, tokenize, write arrow) and cached (same cache directory), and prints
trajectories per second for both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "north south east west wall door key goal corridor room dark light open closed left right ahead behind "
    "you see a the is at to and there nothing here step move turn look take drop"
).split()


def make_trajectory(rng: random.Random, index: int, turns: int) -> dict:
    """One synthetic trajectory: a system prompt, then ``turns`` observation/action exchanges."""

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    messages = [{"role": "system", "content": "You are an agent in a maze. Reach the goal in few moves."}]
    for _ in range(turns):
        position = f"You are at ({rng.randint(0, 9)}, {rng.randint(0, 9)}). "
        messages.append({"role": "user", "content": position + sentence(15, 40)})
        messages.append({"role": "assistant", "content": f"move {rng.choice(WORDS[:4])}. " + sentence(2, 8)})
    return {
        "messages": messages,
        "reward": rng.random(),
        "source": "synthetic",
        "task_id": f"maze-{index % 97}",
        "meta": {"generator": f"noisy-expert-{rng.choice([0.1, 0.3, 0.6])}", "index": index},
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its figures; returns them too."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="trajectories to generate")
    parser.add_argument("--turns", type=int, default=6, help="assistant turns per trajectory")
    parser.add_argument("--max-length", type=int, default=1024, help="max_length passed to load_split")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the trained tokenizer")
    args = parser.parse_args(argv)

    import datasets
    from transformers import AutoTokenizer

    from boost_lightning.data.sources import load_split
    from boost_lightning.data.tokenizer import train_chat_tokenizer

    datasets.disable_progress_bars()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "synthetic.jsonl"
        rows = [make_trajectory(rng, i, args.turns) for i in range(args.rows)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        texts = [m["content"] for row in rows[:2000] for m in row["messages"]]
        train_chat_tokenizer(texts, vocab_size=args.vocab_size).save_pretrained(root / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")

        timings = {}
        for run in ("cold", "cached"):
            start = time.perf_counter()
            loaded = load_split(path, "synthetic", tokenizer, max_length=args.max_length, cache_dir=root / "cache")
            timings[run] = time.perf_counter() - start
            assert loaded.from_cache == (run == "cached") and len(loaded.dataset) == args.rows
        tokens = sum(loaded.dataset["length"])

    cold, cached = args.rows / timings["cold"], args.rows / timings["cached"]
    print(f"{args.rows} trajectories, {args.turns} turns each, {tokens / args.rows:.0f} tokens on average")
    print(f"cold   : {timings['cold']:8.3f} s  {cold:12,.0f} traj/s  {tokens / timings['cold']:12,.0f} tokens/s")
    print(f"cached : {timings['cached']:8.3f} s  {cached:12,.0f} traj/s")
    print(f"cached / cold speed-up: {cached / cold:,.0f}x")
    return {"cold_traj_per_s": cold, "cached_traj_per_s": cached, "speedup": cached / cold}


if __name__ == "__main__":
    main()
