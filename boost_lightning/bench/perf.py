"""Step time, tokens/s and peak memory of plain LoRA SFT vs BOOST, measured side by side in one run.

    python -m boost_lightning.bench.perf [--model tiny|smollm2-135m-instruct|<hub name or path>]
        [--precision bf16-mixed] [--accelerator auto|cpu|gpu] [--batch-size 8] [--seq-len 256] [--steps 16]
        [--methods sft,boost_k4,boost_k1,boost_exact_k1] [--gradient-checkpointing] [--compare-checkpointing]

Methods: ``sft`` (``weighting=uniform``, no hypergradient), ``boost_k4`` and ``boost_k1`` (first-order
hypergradient every 4th / every inner step), ``boost_exact_k1`` (exact one-step unrolled hypergradient every step,
a reference for small models), ``boost_k1_policy_features`` (``boost_k1`` whose head reads the policy's features
only: no reference adapter, whose ``excess_loss`` and ``reference_surprise`` the default head reads),
``boost_k1_cosine`` (``alignment: cosine``, 8 norm probes), ``boost_k1_reference_frozen`` (``boost_k1`` after
``reference_steps``: the reference adapter frozen, its features still read every step) and ``boost_k<N>`` for
first-order BOOST at any other outer cadence N. Every method runs the same ``BoostModule`` training step through a
real ``Trainer``, LoRA r=8 on every linear layer, validation batch as large as the inner one, one repeated random
batch; ``--compare-checkpointing`` runs every method without and with gradient checkpointing (rows
``<method>+ckpt``).

Each row is measured in its own process, so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights included); on CPU how far the peak resident set
(VmHWM, reset after warm-up) rises above the resident set of the warmed-up model, in a second process whose allocator
returns freed tensors' pages (the memory ratio is NaN if SFT's own rise rounds to zero). The step time is the mean
over the ``--steps`` timed steps after ``--warmup`` untimed ones (the mean, since with an outer cadence of k only one
step in k pays for the hypergradient). tokens/s counts the inner batch, padding included (``batch × seq_len``). SFT
is always measured (first) and every ratio is against it: ``time_x_sft``, ``tokens_x_sft``, ``memory_x_sft``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPT = "boost_lightning.bench.perf"
REFERENCE = "sft"
CHECKPOINTED = "+ckpt"
# BoostModule settings per method. The hypergradient's settings stay a dict that `_build_module` translates, so a
# change of the module's constructor is an edit there only.
METHODS: dict[str, dict[str, Any]] = {
    "sft": {"weighting": "uniform"},
    "boost_k4": {"weighting": "learned", "outer_every_n_steps": 4},
    "boost_k1": {"weighting": "learned", "outer_every_n_steps": 1},
    "boost_exact_k1": {"weighting": "learned", "outer_every_n_steps": 1, "hypergradient": {"method": "exact"}},
    # The default head without the reference adapter (the second adapter trained on the trusted rows).
    "boost_k1_policy_features": {"weighting": "learned", "outer_every_n_steps": 1, "head": {"features": [
        "hidden", "loss", "surprise", "reward", "source", "length", "turns"]}},
    "boost_k1_cosine": {"weighting": "learned", "outer_every_n_steps": 1, "hypergradient": {"alignment": "cosine"}},
    # The default head once its reference is frozen (`reference_steps` reached): only its feature forward is left.
    "boost_k1_reference_frozen": {"weighting": "learned", "outer_every_n_steps": 1, "reference_steps": 0},
}


def settings_of(method: str) -> dict[str, Any]:
    """The ``BoostModule`` settings of ``method`` (``<name>`` or ``<name>+ckpt``; ``boost_k<N>``: any cadence N).

    Raises:
        ValueError: ``method`` is not one this script knows.
    """
    name = method.removesuffix(CHECKPOINTED)
    if name in METHODS:
        return dict(METHODS[name])
    cadence = name.removeprefix("boost_k")
    if name.startswith("boost_k") and cadence.isdigit() and int(cadence) >= 1:
        return {"weighting": "learned", "outer_every_n_steps": int(cadence)}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} or boost_k<N> "
                     f"(first-order, outer every N), optionally with the suffix {CHECKPOINTED}")


def _build_module(policy, method_settings: dict[str, Any]):
    """The one place this script constructs a ``BoostModule``: ``policy`` trained with ``method_settings``."""
    import torch

    from boost_lightning.bilevel.hypergradient import HypergradientOptions
    from boost_lightning.module import BoostModule

    settings = dict(method_settings)
    if "head" in settings:
        from boost_lightning.models import WeightHead
        from boost_lightning.weightings import Learned

        settings["weighting"] = Learned(WeightHead(**settings.pop("head")))
    if "hypergradient" in settings:
        settings["hypergradient"] = HypergradientOptions(**settings["hypergradient"])
    return BoostModule(policy, policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4), **settings)


def tiny_config(args: argparse.Namespace) -> dict[str, Any]:
    """The random Llama of ``--model tiny`` (``--vocab-size``, ``--hidden-size``, ``--layers``, ``--seq-len``)."""
    return {
        "model_type": "llama", "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": max(512, args.seq_len), "pad_token_id": 0,
        "tie_word_embeddings": False,
    }


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this process.

    Returns:
        ``method``, ``step_s``, ``tokens_per_s`` and ``peak_mib`` (see :func:`measure_steps`).
    """
    import torch

    from boost_lightning.bench.batches import random_batch
    from boost_lightning.models import PolicyModel

    settings = settings_of(method)
    checkpointing = args.gradient_checkpointing or method.endswith(CHECKPOINTED)
    torch.manual_seed(0)
    source = {"config": tiny_config(args)} if args.model == "tiny" else {"model_name_or_path": args.model}
    policy = PolicyModel(**source, r=8, lora_alpha=16, target_modules="all-linear", dtype=args.dtype,
                         attn_implementation=args.attn, gradient_checkpointing=checkpointing)
    module = _build_module(policy, settings)
    inner = random_batch(policy.vocab_size, args.batch_size, args.seq_len, seed=0)
    outer = random_batch(policy.vocab_size, args.batch_size, args.seq_len, seed=1)
    result = measure_steps(module, inner, outer, args.steps, args.warmup, _accelerator(args) == "gpu",
                           args.precision)
    return {"method": method, **result}


def _reset_peak_rss() -> None:
    """Reset this process's peak resident set (VmHWM) to its current resident set (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure_steps(module, inner: dict, outer: dict, steps: int, warmup: int, cuda: bool,
                  precision: str) -> dict[str, float]:
    """Train ``warmup + steps`` steps of ``module`` on one repeated batch with a real ``Trainer``.

    Returns:
        ``step_s`` (mean seconds per timed step), ``tokens_per_s`` (inner-batch tokens, padding included) and
        ``peak_mib``: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (model included); on CPU the
        growth of the peak resident set over the timed steps (reset after warm-up) over the resident set then.
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
                _reset_peak_rss()
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
    step = sum(timer.times) / len(timer.times)
    return {"step_s": step, "tokens_per_s": inner["input_ids"].numel() / step, "peak_mib": peak}


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``time_x_sft``, ``tokens_x_sft`` and ``memory_x_sft`` against the ``sft`` row."""
    ref = next(r for r in rows if r["method"] == REFERENCE)
    # SFT's own CPU memory growth can round to nothing on a tiny model: the ratio is then undefined (NaN).
    memory = ref["peak_mib"] if ref["peak_mib"] > 0 else math.nan
    return [{**r, "time_x_sft": r["step_s"] / ref["step_s"], "tokens_x_sft": r["tokens_per_s"] / ref["tokens_per_s"],
             "memory_x_sft": r["peak_mib"] / memory} for r in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: step time, tokens/s and peak memory, each followed by its ratio to SFT."""
    width = max(16, *(len(r["method"]) + 2 for r in rows))
    lines = [f"{'method':<{width}}{'step (s)':>10}{'time x SFT':>12}{'tokens/s':>11}{'tokens x SFT':>14}"
             f"{'peak MiB':>10}{'mem x SFT':>11}"]
    lines += [f"{r['method']:<{width}}{r['step_s']:>10.4f}{r['time_x_sft']:>12.2f}{r['tokens_per_s']:>11.0f}"
              f"{r['tokens_x_sft']:>14.2f}{r['peak_mib']:>10.1f}{r['memory_x_sft']:>11.2f}" for r in rows]
    return "\n".join(lines)


def _accelerator(args: argparse.Namespace) -> str:
    if args.accelerator == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if args.accelerator == "cuda" else args.accelerator


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option documented in ``--help``)."""
    parser = argparse.ArgumentParser(prog=f"python -m {SCRIPT}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, an alias (smollm2-135m-instruct), HF name or path")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the frozen base weights")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2")
    parser.add_argument("--accelerator", "--device", dest="accelerator", default="auto",
                        choices=["auto", "cpu", "gpu", "cuda"], help="auto: a GPU when there is one (cuda = gpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows of the inner and of the validation batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per method (mean reported)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list of {', '.join(METHODS)} or boost_k<N> (first-order, an outer step every "
                             "N inner steps); sft is always measured first")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint every method")
    parser.add_argument("--compare-checkpointing", action="store_true",
                        help="every method without and with gradient checkpointing, side by side")
    parser.add_argument("--hidden-size", type=int, default=128, help="--model tiny only")
    parser.add_argument("--layers", type=int, default=4, help="--model tiny only")
    parser.add_argument("--vocab-size", type=int, default=1024, help="--model tiny only")
    parser.add_argument("--json", type=Path, default=None, help="also write the settings and rows to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; an unknown method or a bad count is a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for method in [*args.methods.split(","), *([args.one] if args.one else [])]:
        try:
            settings_of(method)
        except ValueError as err:
            parser.error(str(err))
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 4:
        parser.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1 and --seq-len >= 4")
    return args


def selected_methods(args: argparse.Namespace) -> list[str]:
    """The rows to measure, in order: ``sft`` first, then ``--methods``, deduplicated."""
    names = list(dict.fromkeys([REFERENCE, *args.methods.split(",")]))
    if args.compare_checkpointing:
        names = [n + suffix for n in names for suffix in ("", CHECKPOINTED)]
    return names


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every selected method, each in its own process, print the table and return its rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return []
    accelerator = _accelerator(args)
    # Children measure the one method they are given, on the accelerator resolved here.
    forwarded = [*_without(argv, ("--methods", "--accelerator", "--device")), "--accelerator", accelerator]
    rows = with_ratios(_run_methods(selected_methods(args), forwarded, cpu=accelerator == "cpu"))
    name = f"tiny llama hidden={args.hidden_size} layers={args.layers}" if args.model == "tiny" else args.model
    gpu = ""
    if accelerator == "gpu":
        import torch

        gpu = f" ({torch.cuda.get_device_name()})"
    header = (f"model: {name}, LoRA r=8 all-linear, batch {args.batch_size}x{args.seq_len}, "
              f"accelerator={accelerator}{gpu}, precision={args.precision}, weights {args.dtype}, attn={args.attn}"
              f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, "
              f"mean of {args.steps} steps after {args.warmup}")
    print(header)
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # Strict JSON: an undefined ratio (NaN) is written as null.
        safe = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        args.json.write_text(json.dumps({"command": f"python -m {SCRIPT} {shlex.join(argv)}", "setup": header,
                                         "rows": safe}, indent=2, allow_nan=False) + "\n")
    return rows


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (as ``name VALUE`` or ``name=VALUE``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            out.append(arg)
    return out


def _run_methods(methods: list[str], forwarded: list[str], cpu: bool) -> list[dict[str, Any]]:
    """Run ``python -m SCRIPT *forwarded --one method`` per method, each in a fresh process; rows in order.

    On CPU, memory gets its own second process with a fixed mmap threshold: glibc then returns every large tensor's
    pages on free, so the resident set follows live tensors (instead of freed, fragmented heap). That slows
    allocation, so the timing process runs with the default allocator.
    """
    timing_env, memory_env = dict(os.environ), {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for method in methods:
        row = _subprocess(method, forwarded, timing_env)
        if cpu:
            row["peak_mib"] = _subprocess(method, forwarded, memory_env)["peak_mib"]
        rows.append(row)
    return rows


def _subprocess(method: str, forwarded: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", SCRIPT, *forwarded, "--one", method],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} failed (exit status {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
