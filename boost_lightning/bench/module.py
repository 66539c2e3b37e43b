"""Step time and peak memory of plain LoRA SFT vs BOOST, side by side on one model and batch.

    python -m boost_lightning.bench.module [--steps 20] [--batch-size 8] [--seq-len 256] [--device cpu|cuda]

Every method runs the same ``BoostModule`` training step through a real ``Trainer`` (plain SFT is
``weighting=uniform``, which takes no hypergradient), each in its own subprocess so that peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak resident set (VmHWM) over
its resident set once the model is built and warmed up. Ratios are against SFT measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = {
    "sft": {"weighting": "uniform"},
    "boost_fo_k4": {"weighting": "learned", "outer_every_n_steps": 4},
    "boost_fo_k1": {"weighting": "learned", "outer_every_n_steps": 1},
    "boost_exact_k1": {"weighting": "learned", "outer_every_n_steps": 1, "hypergradient": "exact"},
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def tiny_config(args) -> dict:
    """The random Llama of the benches (``--vocab-size``, ``--hidden-size``, ``--layers``, ``--seq-len``)."""
    return {
        "model_type": "llama", "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": max(512, args.seq_len), "pad_token_id": 0,
        "tie_word_embeddings": False,
    }


def run_one(method: str, args) -> dict:
    """Train ``args.steps`` (+ warm-up) steps of one method; return seconds per step and peak memory (MiB)."""
    import torch

    from boost_lightning.bench.batches import random_batch
    from boost_lightning.models import PolicyModel, WeightHead
    from boost_lightning.module import BoostModule

    torch.manual_seed(0)
    attn = "eager" if METHODS[method].get("hypergradient") == "exact" else "sdpa"
    policy = PolicyModel(config=tiny_config(args), r=8, lora_alpha=16, attn_implementation=attn,
                         dtype="bfloat16" if args.bf16 else "float32")
    module = BoostModule(policy, WeightHead(), policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                         **METHODS[method])
    inner = random_batch(args.vocab_size, args.batch_size, args.seq_len, seed=0)
    outer = random_batch(args.vocab_size, args.batch_size, args.seq_len, seed=1)
    cuda = args.device == "cuda"
    result = measure_steps(module, inner, outer, args.steps, args.warmup, cuda,
                           "bf16-mixed" if args.bf16 and cuda else "32-true")
    return {"method": method, **result}


def measure_steps(module, inner: dict, outer: dict, steps: int, warmup: int, cuda: bool, precision: str) -> dict:
    """Train ``warmup + steps`` steps of ``module`` on one repeated batch with a real ``Trainer``.

    Returns:
        ``step_s`` (mean seconds per timed step), ``tokens_per_s`` (inner-batch tokens, padding included) and
        ``peak_mib``: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (model included); on CPU the
        growth of the peak resident set over the resident set after warm-up.
    """
    import torch
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    data = DataLoader([{"inner": inner, "outer": outer}] * (warmup + steps), batch_size=None)

    class Timer(Callback):
        def __init__(self):
            self.times, self.t0, self.base = [], 0.0, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                self.base = _rss_kib("VmRSS")
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            if batch_idx >= warmup:
                self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="gpu" if cuda else "cpu", devices=1,
                      precision=precision, callbacks=[timer])
    trainer.fit(module, train_dataloaders=data)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (_rss_kib("VmHWM") - timer.base) / 1024
    # Mean, not median: with outer_every_n_steps = k only one step in k pays for the hypergradient.
    step = sum(timer.times) / len(timer.times)
    tokens = inner["input_ids"].numel()
    return {"step_s": step, "peak_mib": peak, "tokens_per_s": tokens / step}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per method (a multiple of 4; mean reported)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 weights / bf16-mixed precision (CUDA)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return []
    forwarded = without_option(argv if argv is not None else sys.argv[1:], "--methods")
    rows = run_methods("boost_lightning.bench.module", args.methods.split(","), forwarded, cpu=args.device == "cpu")
    print(f"model: llama hidden={args.hidden_size} layers={args.layers}, batch {args.batch_size}x{args.seq_len}, "
          f"device={args.device}{' bf16' if args.bf16 else ''}")
    print_table(rows)
    return rows


def run_methods(script: str, methods: list[str], forwarded: list[str], cpu: bool) -> list[dict]:
    """Run ``python -m script *forwarded --one method`` per method, each in a fresh process; rows in order.

    On CPU, memory gets its own second subprocess with a fixed mmap threshold: glibc then returns every large
    tensor's pages on free, so the resident set follows live tensors (instead of freed, fragmented heap). That slows
    allocation, so the timing subprocess runs with the default allocator.
    """
    timing_env, memory_env = dict(os.environ), {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for method in methods:
        timed = _subprocess(script, method, forwarded, timing_env)
        if cpu:
            timed["peak_mib"] = _subprocess(script, method, forwarded, memory_env)["peak_mib"]
        rows.append(timed)
    return rows


def print_table(rows: list[dict]) -> None:
    """Step time, tokens/s and peak memory per row, with ratios to the first row (the SFT reference)."""
    ref = rows[0]
    width = max(16, *(len(r["method"]) + 2 for r in rows))
    print(f"{'method':<{width}}{'step (s)':>10}{'time x SFT':>12}{'tokens/s':>11}{'peak MiB':>10}{'mem x SFT':>11}")
    for r in rows:
        print(f"{r['method']:<{width}}{r['step_s']:>10.4f}{r['step_s'] / ref['step_s']:>12.2f}"
              f"{r['tokens_per_s']:>11.0f}{r['peak_mib']:>10.1f}{r['peak_mib'] / max(ref['peak_mib'], 1e-9):>11.2f}")


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (the parent's selection, not forwarded to subprocesses)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _subprocess(script: str, method: str, forwarded: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", script, *forwarded, "--one", method],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
