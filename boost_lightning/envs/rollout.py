"""Play an HF causal LM on an environment with batched generation (plain torch / transformers).

The environment is an embedded task name or a factory of any environment that speaks chat
(:class:`~boost_lightning.envs.base.EnvProtocol`; :func:`env_factory` also resolves import paths). Several episodes
advance together: every round, each active episode's chat so far goes through the chat template (with the generation
prompt), the prompts are left-padded into one batch, ``generate`` writes one agent turn per episode (stopping at the
end-of-turn token), and each environment answers. Finished episodes leave the batch and waiting ones take their place.

A prompt that no longer fits the context (prompt + ``max_new_tokens`` > the model's ``max_position_embeddings``, or
``max_length``) is truncated the way training rows are (:class:`~boost_lightning.data.trajectory.TrajectoryEncoder`):
whole earliest exchanges go, the leading system messages stay. The transcript keeps every message; only what the
model reads is cut. An episode ends early only when even the system messages and the latest observation do not fit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from boost_lightning.data.trajectory import TrajectoryEncoder
from boost_lightning.envs.base import EVAL_SEED_START, TASKS, Env, EnvFactory, EnvProtocol, Message, make_env

#: Turn limit of a third-party environment's episodes when none is given (embedded tasks have their own).
DEFAULT_MAX_TURNS = 100


def env_factory(env: str | Callable[..., Any], env_kwargs: Mapping[str, Any] | None = None,
                max_turns: int | None = None) -> EnvFactory:
    """A factory of fresh environments from a task name, an import path or a callable.

    Args:
        env: An embedded task name (``maze``, ``guess_number``, ``twenty_questions``); an import path
            ``package.module:factory`` (the part after the colon may be dotted, ``module:Class.create``) or
            ``package.module.Factory``; or a callable. The factory is a class or function that returns a new
            environment (:class:`~boost_lightning.envs.base.EnvProtocol`) each time it is called.
        env_kwargs: Keyword arguments given to the factory on every call (to the task's environment for a task name).
        max_turns: Turn limit, passed to an embedded task's environment; third-party factories do not receive it
            (the rollout enforces it instead).

    Returns:
        A callable without arguments that builds one environment.

    Raises:
        ValueError: ``env`` is neither a task name nor an importable callable.
    """
    kwargs = dict(env_kwargs or {})
    if isinstance(env, str):
        if env in TASKS:
            return functools.partial(make_env, env, max_turns=max_turns, **kwargs)
        env = _import_object(env)
    if not callable(env):
        raise ValueError(f"an environment factory must be callable, got {type(env).__name__} {env!r}")
    return functools.partial(env, **kwargs) if kwargs else env


def _import_object(path: str) -> Any:
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"unknown environment {path!r}: expected one of {', '.join(TASKS)}, "
                         "'package.module:factory' or 'package.module.Factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"environment {path!r}: cannot import module {module_name!r} ({error})") from error
    for name in attribute.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"environment {path!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} "
                             f"has no attribute {name!r}")
        obj = getattr(obj, name)
    return obj


def is_invalid(env: EnvProtocol, info: Mapping[str, Any]) -> bool:
    """Whether the agent's reply could not be parsed as an action.

    ``info["invalid"]`` when the environment sets it; for the embedded tasks (:class:`Env`), an unparseable reply
    is one whose ``info["action"]`` is ``None`` (a parsed but illegal move, such as walking into a wall, is valid).
    Other environments without ``invalid`` never count an invalid reply.
    """
    if "invalid" in info:
        return bool(info["invalid"])
    return isinstance(env, Env) and info.get("action") is None


@dataclass
class PlayedEpisode:
    """One episode played by a model."""

    seed: int
    messages: list[Message]
    rewards: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    success: bool = False
    optimal_turns: int = 0
    instance: dict[str, Any] = field(default_factory=dict)
    invalid: list[bool] = field(default_factory=list)  # per agent turn: the reply could not be parsed
    truncated_prompts: int = 0  # agent turns whose prompt lost its earliest exchanges to fit the context
    truncated: bool = False  # ended early: even the system messages and the latest observation no longer fit

    @property
    def turns(self) -> int:
        return len(self.actions)

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))


@dataclass
class RolloutResult:
    """Outcome of :func:`evaluate_policy`.

    Attributes:
        success_rate: Share of episodes solved.
        mean_return: Mean episode return.
        mean_turns: Mean agent turns per episode.
        transcripts: Each episode's chat messages (system, observations, agent turns, final observation).
        successes: Per-episode success, in seed order.
        returns: Per-episode return.
        turns: Per-episode agent turns.
        seeds: The instance seeds played.
        invalid_action_rate: Share of all agent turns whose reply could not be parsed (:func:`is_invalid`).
        truncated_prompts: Prompts, over all turns of all episodes, that lost earliest exchanges to fit the context.
    """

    success_rate: float
    mean_return: float
    mean_turns: float
    transcripts: list[list[Message]]
    successes: list[bool] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    invalid_action_rate: float = 0.0
    truncated_prompts: int = 0


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    ids.append(im_end)
    return list(dict.fromkeys(i for i in ids if i is not None))


def _context_limit(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


@contextlib.contextmanager
def _left_padding(tokenizer: Any):
    """Left padding (generation appends on the right) and a pad token, restoring the tokenizer afterwards."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


class _PromptFitter:
    """Renders an episode's prompt and, when it exceeds ``budget`` tokens, truncates it like a training row."""

    def __init__(self, tokenizer: Any, budget: int | None) -> None:
        self.tokenizer, self.budget = tokenizer, budget
        self._encoder: TrajectoryEncoder | None = None
        self._encoder_failed = False

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[Message], generation_prompt: bool = True) -> str:
        """The chat-templated prompt of ``messages`` (with the generation prompt unless told otherwise)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encoder_or_none(self) -> TrajectoryEncoder | None:
        if self._encoder is None and not self._encoder_failed:
            try:
                self._encoder = TrajectoryEncoder(self.tokenizer)
            except ValueError:  # a slow tokenizer: no offsets, so no truncation by exchanges
                self._encoder_failed = True
        return self._encoder

    def fit(self, messages: list[Message]) -> tuple[str | None, bool]:
        """``(prompt, truncated)``; the prompt is ``None`` when even the shortest truncation does not fit."""
        prompt = self.render(messages)
        if self.budget is None:
            return prompt, False
        length = self._length(prompt)
        if length <= self.budget:
            return prompt, False
        encoder = self._encoder_or_none()
        if encoder is None or self.budget <= 0:
            return None, False
        system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        # The encoder measures rows without the generation prompt: leave room for it, and tighten by the measured
        # overshoot when tokens merge differently across the cut.
        max_length = self.budget - max(0, length - self._length(self.render(messages, generation_prompt=False)))
        while max_length > 0:
            encoder.max_length = max_length
            (encoded,) = encoder.encode_batch([messages])
            if encoded is None:
                # Every exchange with an agent turn went: only the latest observations remain.
                start = max((i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"), default=system)
            else:
                kept = encoded.turn_ids[encoded.turn_ids >= system]
                start = int(kept.min()) if len(kept) else system
            prompt = self.render(messages[:system] + messages[max(start, system):])
            length = self._length(prompt)
            if length <= self.budget:
                return prompt, True
            if encoded is None:
                return None, False
            max_length -= length - self.budget
        return None, False


def play_policy(model: Any, tokenizer: Any, env: str | Callable[..., Any], seeds: list[int] | range, *,
                max_new_tokens: int = 32, batch_size: int = 16, max_turns: int | None = None, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, sample_seed: int = 0,
                env_kwargs: dict[str, Any] | None = None, max_length: int | None = None) -> list[PlayedEpisode]:
    """Play ``model`` on the instances ``seeds`` of an environment, several episodes per ``generate`` call.

    Args:
        model: HF causal LM with ``.generate`` (a PEFT model too). Put in eval mode here, its mode restored after.
        tokenizer: Its tokenizer; must have a chat template (and be fast for prompts to be truncated).
        env: An embedded task name, an import path or a factory of fresh environments (see :func:`env_factory`).
        seeds: Instance seeds, one episode each.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated together.
        max_turns: Turn limit per episode; ``None``: an embedded task's own, :data:`DEFAULT_MAX_TURNS` for other
            environments.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        sample_seed: Seeds the sampling (the global RNG state is left untouched).
        env_kwargs: Keyword arguments of the environment factory (of the task's environment for a task name).
        max_length: Longest prompt plus ``max_new_tokens``, in tokens; ``None``: the model's
            ``max_position_embeddings`` (the smaller of the two when both are known). Longer prompts lose their
            earliest exchanges, as training rows do.

    Returns:
        The episodes, in the order of ``seeds``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("rollouts need a tokenizer with a chat template (apply_chat_template)")
    make = env_factory(env, env_kwargs, max_turns)
    embedded = isinstance(env, str) and env in TASKS
    turn_limit = max_turns if max_turns is not None else (None if embedded else DEFAULT_MAX_TURNS)
    seeds = list(seeds)
    episodes: list[PlayedEpisode | None] = [None] * len(seeds)
    envs: dict[int, EnvProtocol] = {}
    pending = deque(range(len(seeds)))
    active: list[int] = []
    stop_ids = _stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    limits = [n for n in (_context_limit(model), max_length) if n is not None]
    fitter = _PromptFitter(tokenizer, min(limits) - max_new_tokens if limits else None)
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "eos_token_id": stop_ids, "pad_token_id": pad_id}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        # Override sampling defaults a checkpoint's generation config may carry, which would make greedy warn.
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)

    was_training = model.training
    model.eval()
    # Sampling must not disturb the caller's RNG streams (training continues after an evaluation).
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices), _left_padding(tokenizer):
            torch.manual_seed(sample_seed)
            while pending or active:
                while pending and len(active) < batch_size:
                    i = pending.popleft()
                    environment = make()
                    messages = environment.reset(seeds[i])
                    optimal = getattr(environment, "optimal_turns", None)
                    episodes[i] = PlayedEpisode(seeds[i], list(messages),
                                                optimal_turns=int(optimal()) if callable(optimal) else 0,
                                                instance=dict(getattr(environment, "instance", None) or {}))
                    envs[i] = environment
                    active.append(i)
                prompts = [fitter.render(episodes[i].messages) for i in active]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                lengths = enc["attention_mask"].sum(1).tolist()
                if fitter.budget is not None and max(lengths) > fitter.budget:
                    # Rare: only the prompts that outgrew the context are truncated, then the batch is re-encoded.
                    rendered, prompts, fitting = prompts, [], []
                    for i, prompt, length in zip(active, rendered, lengths):
                        cut = False
                        if length > fitter.budget:
                            prompt, cut = fitter.fit(episodes[i].messages)
                        if prompt is None:
                            episodes[i].truncated = True
                            del envs[i]
                            continue
                        episodes[i].truncated_prompts += cut
                        prompts.append(prompt)
                        fitting.append(i)
                    active = fitting
                    if not active:
                        continue
                    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
                still_active = []
                for i, ids in zip(active, new_tokens):
                    cut = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
                    text = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
                    observation, reward, done, info = envs[i].step(text)
                    ep = episodes[i]
                    ep.messages += [{"role": "assistant", "content": text}, {"role": "user", "content": observation}]
                    ep.rewards.append(float(reward))
                    ep.actions.append(text)
                    ep.observations.append(observation)
                    ep.invalid.append(is_invalid(envs[i], info or {}))
                    ep.success = bool(getattr(envs[i], "success", False))
                    if done or (turn_limit is not None and ep.turns >= turn_limit):
                        del envs[i]
                    else:
                        still_active.append(i)
                active = still_active
    finally:
        model.train(was_training)
    return [ep for ep in episodes if ep is not None]


def evaluate_policy(model: Any, tokenizer: Any, env: str | Callable[..., Any], num_episodes: int = 32,
                    seed: int = EVAL_SEED_START, max_new_tokens: int = 32, batch_size: int = 16,
                    max_turns: int | None = None, *, env_kwargs: dict[str, Any] | None = None,
                    max_length: int | None = None) -> RolloutResult:
    """Play the policy greedily on held-out instances of an environment and score it.

    Args:
        model: HF causal LM with ``.generate`` (a PEFT model too); its training mode is restored afterwards.
        tokenizer: Its tokenizer; must have a chat template.
        env: An embedded task name (``maze``, ``guess_number``, ``twenty_questions``), an import path
            ``package.module:factory`` or a factory of fresh environments (see :func:`env_factory`).
        num_episodes: Episodes, on instance seeds ``seed, seed + 1, ...``.
        seed: First instance seed; the default 10000 starts the embedded tasks' held-out range, disjoint from real
            and validation.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated together.
        max_turns: Turn limit per episode (see :func:`play_policy`).
        env_kwargs: Keyword arguments of the environment factory.
        max_length: Longest prompt plus ``max_new_tokens`` (see :func:`play_policy`).

    Returns:
        Success rate, mean return, mean turns, invalid-action rate, truncated prompts and the transcripts.
    """
    played = play_policy(model, tokenizer, env, range(seed, seed + num_episodes), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, max_turns=max_turns, env_kwargs=env_kwargs, max_length=max_length)
    n = max(len(played), 1)
    actions = sum(ep.turns for ep in played)
    return RolloutResult(
        success_rate=sum(ep.success for ep in played) / n,
        mean_return=sum(ep.total_reward for ep in played) / n,
        mean_turns=sum(ep.turns for ep in played) / n,
        transcripts=[ep.messages for ep in played],
        successes=[ep.success for ep in played],
        returns=[ep.total_reward for ep in played],
        turns=[ep.turns for ep in played],
        seeds=[ep.seed for ep in played],
        invalid_action_rate=sum(sum(ep.invalid) for ep in played) / max(actions, 1),
        truncated_prompts=sum(ep.truncated_prompts for ep in played),
    )
