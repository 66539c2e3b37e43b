"""A third-party environment, defined here, rolled out by ``RolloutEvaluation`` inside a fit; prompt truncation."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import transformers
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from boost_lightning.cli import cli_main
from boost_lightning.data.datamodule import BoostDataModule
from boost_lightning.envs.base import Env, EnvProtocol, make_env
from boost_lightning.envs.rollout import env_factory, evaluate_policy, is_invalid, play_policy
from boost_lightning.evaluation import RolloutEvaluation
from boost_lightning.models import PolicyModel
from boost_lightning.module import BoostModule


class Countdown:
    """Count down from ``start`` to 1, one number per turn; ``padding`` lengthens every observation.

    The episode always lasts ``start`` turns and is solved when every reply names the right number; a reply without
    a number is invalid.
    """

    def __init__(self, start: int = 3, padding: int = 0) -> None:
        self.start, self.padding = start, padding
        self.success = False

    def _observation(self) -> str:
        return f"Say {self.left}." + " You are in a maze." * self.padding

    def reset(self, seed: int) -> list[dict[str, str]]:
        self.left, self.correct, self.success = self.start, 0, False
        return [{"role": "system", "content": "Count down to 1, one number per turn."},
                {"role": "user", "content": self._observation()}]

    def step(self, agent_text: str) -> tuple[str, float, bool, dict]:
        numbers = re.findall(r"[0-9]+", agent_text)
        right = bool(numbers) and int(numbers[0]) == self.left
        self.correct += right
        self.left -= 1
        done = self.left == 0
        self.success = done and self.correct == self.start
        return ("Done." if done else self._observation()), float(right), done, {"invalid": not numbers}


def tiny_model(config: dict, tok, **overrides) -> transformers.LlamaForCausalLM:
    config = {k: v for k, v in config.items() if k != "model_type"}
    config.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def test_env_factory_takes_task_names_import_paths_and_callables():
    assert isinstance(Countdown(), EnvProtocol) and isinstance(make_env("maze"), EnvProtocol)
    assert isinstance(env_factory("maze", max_turns=3)(), Env) and env_factory("maze", max_turns=3)().max_turns == 3
    for path in (f"{__name__}:Countdown", f"{__name__}.Countdown"):
        env = env_factory(path, {"start": 5})()
        assert isinstance(env, Countdown) and env.start == 5
    assert env_factory(Countdown)().start == 3
    for bad, match in (("mazes", "unknown environment 'mazes'"), ("no_such_module:Env", "cannot import"),
                       (f"{__name__}:Nope", "has no attribute 'Nope'")):
        with pytest.raises(ValueError, match=match):
            env_factory(bad)


def test_invalid_means_unparseable():
    env = Countdown()
    env.reset(0)
    assert is_invalid(env, env.step("no number")[3]) and not is_invalid(env, env.step("7")[3])
    maze = make_env("maze")
    maze.reset(0)
    assert is_invalid(maze, maze.step("xyzzy plugh")[3])
    assert not any(is_invalid(maze, maze.step(f"move {d}")[3]) for d in ("north", "south", "east", "west"))


@pytest.fixture()
def datamodule(tmp_path, make_row, write_jsonl, tiny_tokenizer):
    return BoostDataModule(real=write_jsonl("real.jsonl", [make_row(i) for i in range(4)]),
                           synthetic=write_jsonl("synthetic.jsonl", [make_row(10 + i) for i in range(4)]),
                           validation=write_jsonl("validation.jsonl", [make_row(20 + i) for i in range(2)]),
                           tokenizer=tiny_tokenizer, batch_size=4, validation_batch_size=2, max_length=128,
                           cache_dir=str(tmp_path / "cache"))


def test_rollout_evaluation_plays_a_custom_env_inside_fit(datamodule, tiny_llama_config, tmp_path):
    module = BoostModule(PolicyModel(config=tiny_llama_config, r=4), weighting="uniform",
                         policy_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    rollout = RolloutEvaluation(env=f"{__name__}:Countdown", env_kwargs={"start": 3}, num_episodes=3,
                                max_new_tokens=4, batch_size=3, seed=7)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="run", version="", default_hp_metric=False)
    trainer = Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=logger, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[rollout], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)

    result = rollout.last_result
    assert result is not None and result.seeds == [7, 8, 9] and result.turns == [3, 3, 3]
    replies = [m["content"] for t in result.transcripts for m in t if m["role"] == "assistant"]
    assert result.invalid_action_rate == pytest.approx(sum(not re.search("[0-9]", r) for r in replies) / 9)
    assert result.truncated_prompts == 0
    metrics = trainer.callback_metrics
    for key, value in (("success_rate", result.success_rate), ("return", result.mean_return), ("turns", 3.0),
                       ("invalid_action_rate", result.invalid_action_rate), ("truncated_prompts", 0.0)):
        assert metrics[f"rollout/{key}"].item() == pytest.approx(value), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(logger.log_dir)).Reload().Tags()
    assert {"rollout/transcript_0/text_summary", "rollout/transcript_1/text_summary"} <= set(tags["tensors"])
    assert {"rollout/success_rate", "rollout/invalid_action_rate", "rollout/truncated_prompts"} <= set(tags["scalars"])


def test_an_episode_longer_than_the_context_plays_to_the_end(tiny_tokenizer, tiny_llama_config):
    context, budget = 160, 4
    model = tiny_model(tiny_llama_config, tiny_tokenizer, max_position_embeddings=context)
    inputs: list[list[int]] = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: inputs.append(input_ids[0].tolist()) or generate(input_ids, **kwargs)
    result = evaluate_policy(model, tiny_tokenizer, Countdown, num_episodes=1, batch_size=1, max_new_tokens=budget,
                             env_kwargs={"start": 10, "padding": 3})
    assert result.turns == [10], "the episode plays to its end"
    assert result.truncated_prompts > 0

    def tokens(messages):
        return tiny_tokenizer(tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]

    (transcript,) = result.transcripts
    assert len(tokens(transcript)) + budget > context, "the transcript is whole"
    system, history = transcript[:1], transcript[1:]
    for turn, ids in enumerate(inputs):
        chat = history[: 2 * turn + 1]  # the observations and replies the model had seen when it wrote turn `turn`
        assert len(ids) + budget <= context
        # What the model read: the system message and the latest exchanges; the earliest whole exchanges dropped,
        # as few as the context allows (the training rows' truncation).
        start = next(k for k in range(0, len(chat), 2) if tokens(system + chat[k:]) == ids)
        assert start == 0 or len(tokens(system + chat[start - 2:])) + budget > context
    assert any(ids != tokens(system + history[: 2 * turn + 1]) for turn, ids in enumerate(inputs))


def test_third_party_envs_stop_at_the_turn_limit(tiny_tokenizer, tiny_llama_config):
    model = tiny_model(tiny_llama_config, tiny_tokenizer)
    (short,) = play_policy(model, tiny_tokenizer, Countdown, [0], max_new_tokens=2, max_turns=2,
                           env_kwargs={"start": 5})
    assert short.turns == 2 and not short.success and len(short.invalid) == 2


def test_the_callback_is_configured_from_yaml(tmp_path, tiny_llama_config, tiny_tokenizer, make_row, write_jsonl,
                                             monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    callback = {"class_path": "boost_lightning.evaluation.RolloutEvaluation",
                "init_args": {"env": f"{__name__}:Countdown", "env_kwargs": {"start": 2}, "num_episodes": 4}}
    config = {"trainer": {"accelerator": "cpu", "logger": False, "callbacks": [callback]},
              "model": {"policy": {"class_path": "boost_lightning.models.PolicyModel",
                                   "init_args": {"config": tiny_llama_config, "r": 4}}},
              "data": {"real": write_jsonl("real.jsonl", [make_row(0)]),
                       "validation": write_jsonl("validation.jsonl", [make_row(1)]),
                       "tokenizer": str(tmp_path / "tokenizer")}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    cli = cli_main(["--config", str(path)], run=False)
    (rollout,) = [c for c in cli.trainer.callbacks if isinstance(c, RolloutEvaluation)]
    assert (rollout.env, rollout.env_kwargs, rollout.num_episodes) == (f"{__name__}:Countdown", {"start": 2}, 4)
    # A wrong path fails when the config is read, not after the first training epoch.
    callback["init_args"]["env"] = f"{__name__}:Missing"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        cli_main(["--config", str(path)], run=False)


def test_the_old_import_path_and_task_argument_still_work():
    from boost_lightning.callbacks import RolloutEvaluation as FromCallbacks

    assert FromCallbacks is RolloutEvaluation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rollout = RolloutEvaluation(task="guess_number")
    assert rollout.env == rollout.task == "guess_number"
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    with pytest.raises(ValueError, match="give env only"):
        RolloutEvaluation(env="maze_like", task="maze")
