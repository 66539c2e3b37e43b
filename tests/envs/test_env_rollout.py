"""Rollouts of a tiny random Llama (tokenizer trained on the task's own data) run end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from boost_lightning.envs.base import EVAL_SEED_START, make_env
from boost_lightning.envs.generators import lm_rows
from boost_lightning.envs.rollout import RolloutResult, evaluate_policy, play_policy


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and lose a lot when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["maze", "twenty_questions"])
def task_tokenizer(request, embedded_data):
    """The tokenizer saved with the task's embedded data (trained on its messages)."""
    return request.param, transformers.AutoTokenizer.from_pretrained(str(embedded_data(request.param)["tokenizer"]))


def tiny_model(config: dict, tok) -> transformers.LlamaForCausalLM:
    config = {k: v for k, v in config.items() if k != "model_type"}
    config.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def test_rollout_end_to_end(task_tokenizer, tiny_llama_config):
    task, tok = task_tokenizer
    model = tiny_model(tiny_llama_config, tok)
    model.train()
    rng_state = torch.get_rng_state()
    result = evaluate_policy(model, tok, task, num_episodes=5, batch_size=2, max_new_tokens=6, max_turns=3)
    assert isinstance(result, RolloutResult)
    assert model.training, "training mode is restored"
    assert torch.equal(rng_state, torch.get_rng_state()), "the global RNG is left alone"
    assert result.seeds == list(range(EVAL_SEED_START, EVAL_SEED_START + 5))
    assert len(result.transcripts) == len(result.turns) == len(result.returns) == 5
    for transcript, turns in zip(result.transcripts, result.turns):
        assert 1 <= turns <= 3
        roles = [m["role"] for m in transcript]
        assert roles == ["system", "user"] + ["assistant", "user"] * turns
        assert all(isinstance(m["content"], str) for m in transcript)
    assert result.mean_turns == pytest.approx(sum(result.turns) / 5)
    assert result.mean_return == pytest.approx(sum(result.returns) / 5)
    again = evaluate_policy(model, tok, task, num_episodes=5, batch_size=3, max_new_tokens=6, max_turns=3)
    assert again.transcripts == result.transcripts, "greedy decoding is deterministic and batch-size independent"


def test_lm_rows_are_labelled_by_the_real_outcome(task_tokenizer, tiny_llama_config):
    task, tok = task_tokenizer
    model = tiny_model(tiny_llama_config, tok)
    rows = lm_rows(model, tok, task, 3, max_new_tokens=4, batch_size=3, name="tiny")
    assert len(rows) == 3
    for row in rows:
        meta = row["meta"]
        assert row["source"] == "synthetic" and meta["generator"] == "lm-tiny" and not meta["shifted"]
        assert meta["quality"] == float(meta["success"]) * min(1.0, meta["optimal_turns"] / meta["turns"])
        assert len(row["rewards"]) == meta["turns"]


def test_rollout_with_peft_model(tiny_llama_config, embedded_data):
    peft = pytest.importorskip("peft")
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_data("guess_number")["tokenizer"]))
    model = peft.get_peft_model(tiny_model(tiny_llama_config, tok),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    result = evaluate_policy(model, tok, "guess_number", num_episodes=2, max_new_tokens=4, max_turns=2)
    assert not model.training and len(result.transcripts) == 2


def test_rollout_needs_a_chat_template(plain_tokenizer, tiny_llama_config):
    model = tiny_model(tiny_llama_config, plain_tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        evaluate_policy(model, plain_tokenizer, "maze", num_episodes=1)


def test_rollout_truncates_prompts_at_the_context_limit_and_without_pad_token(task_tokenizer, tiny_llama_config):
    task, tok = task_tokenizer
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    model = tiny_model({**tiny_llama_config, "max_position_embeddings": 96}, tok)
    widths = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: widths.append(input_ids.shape[1]) or generate(input_ids, **kwargs)
    played = play_policy(model, tok, task, [EVAL_SEED_START, EVAL_SEED_START + 1], max_new_tokens=8, max_turns=12)
    assert tok.pad_token is None and tok.padding_side == "right", "the tokenizer is restored"
    assert max(widths) + 8 <= 96, "every prompt fits the context with its generation budget"
    for ep in played:
        assert not ep.truncated and ep.turns == 12 and ep.truncated_prompts > 0, "the episode plays to its end"
        prompt = tok.apply_chat_template(ep.messages, tokenize=False, add_generation_prompt=True)
        assert len(tok(prompt, add_special_tokens=False)["input_ids"]) + 8 > 96, "the transcript itself is whole"
    # A context that cannot hold the rules and the first observation ends the episode before its first turn.
    (ep,) = play_policy(tiny_model({**tiny_llama_config, "max_position_embeddings": 24}, tok), tok, task,
                        [EVAL_SEED_START], max_new_tokens=8)
    assert ep.truncated and ep.turns == 0


class ScriptedModel(torch.nn.Module):
    """Stands in for the LM: every ``generate`` writes ``act(env)`` for the one episode in flight (batch size 1).

    A shadow environment follows the episodes in the order ``play_policy`` plays them, so ``act`` sees what the
    agent has been told so far.
    """

    def __init__(self, tok, task: str, seeds, act, max_turns=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # rollouts read the device off the parameters
        self.tok, self.act, self.seeds = tok, act, list(seeds)
        self.env = make_env(task, max_turns=max_turns)
        self.env.reset(self.seeds.pop(0))

    def generate(self, input_ids, attention_mask, **kwargs):
        assert input_ids.shape[0] == 1
        text = self.act(self.env)
        self.env.step(text)
        if self.env.done and self.seeds:
            self.env.reset(self.seeds.pop(0))
        new = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_the_expert_solves_every_episode_and_invalid_actions_solve_none(task_tokenizer):
    task, tok = task_tokenizer
    seeds = range(EVAL_SEED_START, EVAL_SEED_START + 4)
    expert = ScriptedModel(tok, task, seeds, lambda env: env.expert_action())
    result = evaluate_policy(expert, tok, task, num_episodes=4, batch_size=1, max_new_tokens=16)
    assert result.success_rate == 1.0 and result.successes == [True] * 4
    invalid = ScriptedModel(tok, task, seeds, lambda env: "xyzzy plugh", max_turns=3)
    result = evaluate_policy(invalid, tok, task, num_episodes=4, batch_size=1, max_turns=3)
    assert result.success_rate == 0.0 and result.turns == [3] * 4
    assert result.mean_return == pytest.approx(-0.3)  # three invalid turns at a penalty of 0.1 each
