"""Training throughput and peak memory of plain LoRA SFT vs BOOST on any model, side by side in one run.

    python -m boost_lightning.bench.throughput --model smollm2-135m-instruct --precision bf16-mixed \\
        [--batch-size 8] [--seq-len 512] [--steps 16] [--gradient-checkpointing] [--compare-checkpointing]

``--model`` is ``tiny`` (a random Llama built from ``--hidden-size`` / ``--layers``), an alias such as
``smollm2-135m-instruct``, or any HF hub name or local directory. Methods: ``sft`` (``weighting=uniform``, no
hypergradient), ``boost_k4`` and ``boost_k1`` (first-order hypergradient every 4th / every inner step), all through
the same ``BoostModule`` step and a real ``Trainer``, LoRA r=8 on every linear layer, validation batch as large as
the inner one. ``--compare-checkpointing`` runs every method without and with gradient checkpointing. Each row is
measured in its own process (see :mod:`boost_lightning.bench.module`, whose measurement this reuses): on CUDA peak
memory is ``torch.cuda.max_memory_allocated`` (weights included), on CPU the growth of the peak resident set over the
warmed-up model. tokens/s counts the inner batch (``batch × seq_len``); ratios are against the first row.
"""

from __future__ import annotations

import argparse
import json
import sys

from boost_lightning.bench.module import measure_steps, print_table, run_methods, tiny_config, without_option

METHODS = {
    "sft": {"weighting": "uniform"},
    "boost_k4": {"weighting": "learned", "outer_every_n_steps": 4},
    "boost_k1": {"weighting": "learned", "outer_every_n_steps": 1},
}
CHECKPOINTED = "+ckpt"


def run_one(method: str, args) -> dict:
    """Measure one method (``<method>`` or ``<method>+ckpt``) in this process."""
    import torch

    from boost_lightning.bench.batches import random_batch
    from boost_lightning.models import PolicyModel, WeightHead
    from boost_lightning.module import BoostModule

    name = method.removesuffix(CHECKPOINTED)
    checkpointing = args.gradient_checkpointing or method.endswith(CHECKPOINTED)
    cuda = _device(args) == "cuda"
    torch.manual_seed(0)
    source = {"config": tiny_config(args)} if args.model == "tiny" else {"model_name_or_path": args.model}
    policy = PolicyModel(**source, r=8, lora_alpha=16, target_modules="all-linear", dtype=args.dtype,
                         attn_implementation=args.attn, gradient_checkpointing=checkpointing)
    module = BoostModule(policy, WeightHead(), policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                         **METHODS[name])
    inner = random_batch(policy.vocab_size, args.batch_size, args.seq_len, seed=0)
    outer = random_batch(policy.vocab_size, args.batch_size, args.seq_len, seed=1)
    result = measure_steps(module, inner, outer, args.steps, args.warmup, cuda, args.precision)
    return {"method": method, **result}


def _device(args) -> str:
    if args.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, an alias (smollm2-135m-instruct), HF name or path")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the frozen base weights")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per method (a multiple of 4; mean reported)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint every method")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="every method without and with gradient checkpointing, side by side")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--hidden-size", type=int, default=128, help="--model tiny only")
    parser.add_argument("--layers", type=int, default=4, help="--model tiny only")
    parser.add_argument("--vocab-size", type=int, default=1024, help="--model tiny only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return []
    device = _device(args)
    methods = args.methods.split(",")
    if args.compare_checkpointing:
        methods = [m + suffix for m in methods for suffix in ("", CHECKPOINTED)]
    forwarded = without_option(without_option(argv, "--methods"), "--device") + ["--device", device]
    rows = run_methods("boost_lightning.bench.throughput", methods, forwarded, cpu=device == "cpu")
    name = f"tiny llama hidden={args.hidden_size} layers={args.layers}" if args.model == "tiny" else args.model
    gpu = ""
    if device == "cuda":
        import torch

        gpu = f" ({torch.cuda.get_device_name()})"
    print(f"model: {name}, LoRA r=8 all-linear, batch {args.batch_size}x{args.seq_len}, device={device}{gpu}, "
          f"precision={args.precision}, weights {args.dtype}, attn={args.attn}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
