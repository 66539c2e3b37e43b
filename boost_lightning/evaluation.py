"""Rollout evaluation during training: play the policy on an embedded task or on your own environment.

:class:`RolloutEvaluation` is a Lightning callback; the rollouts themselves are plain torch
(:mod:`boost_lightning.envs.rollout`). An environment is an embedded task name or the import path of a factory of
objects that follow :class:`~boost_lightning.envs.base.EnvProtocol` (``reset(seed)``, ``step(text)``, ``success``).
From a YAML config::

    trainer:
      callbacks:
        - class_path: boost_lightning.evaluation.RolloutEvaluation
          init_args:
            env: my_package.envs:MySimulator
            env_kwargs: {difficulty: 2}
            num_episodes: 16
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from boost_lightning.envs.rollout import RolloutResult, env_factory, evaluate_policy
from boost_lightning.loggers import tensorboard_experiment


class RolloutEvaluation(Callback):
    """Play the current policy greedily on held-out environment instances and log how it does.

    Every ``every_n_val_epochs`` validation epochs, ``num_episodes`` instances (seeds ``seed, seed + 1, ...``) are
    played with batched generation (chat template, stop at end of turn), and logged at the module's ``inner_steps``:
    ``rollout/success_rate``, ``rollout/return`` (mean episode return), ``rollout/turns`` (mean agent turns),
    ``rollout/invalid_action_rate`` (share of agent turns whose reply could not be parsed: ``info["invalid"]`` of
    the environment's ``step``, or an embedded task's ``info["action"] is None``) and ``rollout/truncated_prompts``
    (prompts that lost their earliest exchanges to fit the context, as training rows do). The first
    ``num_transcripts`` transcripts go to TensorBoard as text (``rollout/transcript_<i>``).

    Args:
        env: An embedded task name (``maze``, ``guess_number``, ``twenty_questions``) or the import path of an
            environment factory, ``package.module:factory`` or ``package.module.Factory``: a class or function that
            returns a fresh environment with ``reset(seed) -> messages``, ``step(text) -> (observation, reward, done,
            info)`` and ``success`` (see ``boost_lightning.envs.base.EnvProtocol``). From Python, a factory callable
            works too.
        env_kwargs: Keyword arguments given to the factory for every episode (to the task's environment for a task
            name).
        every_n_val_epochs: Evaluation interval in validation epochs.
        num_episodes: Held-out instances played.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated in parallel.
        num_transcripts: Transcripts written as TensorBoard text.
        seed: First instance seed (10000 starts the embedded tasks' held-out range).
        max_turns: Turn limit per episode; ``None``: an embedded task's own limit, 100 for other environments.
        max_length: Longest prompt plus ``max_new_tokens``, in tokens; ``None``: the policy's context
            (``max_position_embeddings``). Set it to ``data.max_length`` to show the policy no more than it trained on.
        task: Deprecated alias of ``env`` (an embedded task name).
    """

    def __init__(self, env: str | Callable[..., Any] = "maze", env_kwargs: dict[str, Any] | None = None,
                 every_n_val_epochs: int = 1, num_episodes: int = 32, max_new_tokens: int = 24, batch_size: int = 32,
                 num_transcripts: int = 2, seed: int = 10_000, max_turns: int | None = None,
                 max_length: int | None = None, task: str | None = None) -> None:
        if task is not None:
            if env not in ("maze", task):
                raise ValueError(f"RolloutEvaluation got env={env!r} and task={task!r}: give env only")
            warnings.warn("RolloutEvaluation(task=...) is deprecated: use env=...", DeprecationWarning, stacklevel=2)
            env = task
        self.env, self.env_kwargs = env, dict(env_kwargs or {})
        self.every_n_val_epochs, self.num_episodes = every_n_val_epochs, num_episodes
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.num_transcripts, self.seed = num_transcripts, seed
        self.max_turns, self.max_length = max_turns, max_length
        # Resolved now, so that a wrong import path fails when the config is read, not after the first epoch.
        env_factory(env, self.env_kwargs, max_turns)
        self._val_epochs = 0
        self.last_result: RolloutResult | None = None

    @property
    def task(self) -> str | Callable[..., Any]:
        """Deprecated alias of ``env``."""
        return self.env

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs != 0 or not trainer.is_global_zero:
            return
        result = evaluate_policy(pl_module.policy.model, trainer.datamodule.tokenizer, self.env,
                                 num_episodes=self.num_episodes, seed=self.seed, max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size, max_turns=self.max_turns, max_length=self.max_length,
                                 env_kwargs=self.env_kwargs)
        self.last_result = result
        pl_module.log_dict({"rollout/success_rate": result.success_rate, "rollout/return": result.mean_return,
                            "rollout/turns": result.mean_turns,
                            "rollout/invalid_action_rate": result.invalid_action_rate,
                            "rollout/truncated_prompts": float(result.truncated_prompts)}, rank_zero_only=True)
        experiment = tensorboard_experiment(trainer)
        if experiment is not None:
            for i, transcript in enumerate(result.transcripts[: self.num_transcripts]):
                text = "\n\n".join(f"**{m['role']}**: {m['content']}" for m in transcript)
                experiment.add_text(f"rollout/transcript_{i}", text, pl_module.inner_steps)
