"""Play an HF causal LM on an embedded task with batched generation (plain torch / transformers).

Several episodes advance together: every round, each active episode's chat so far goes through the chat template
(with the generation prompt), the prompts are left-padded into one batch, ``generate`` writes one agent turn per
episode (stopping at the end-of-turn token), and each environment answers. Finished episodes leave the batch and
waiting ones take their place.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from boost_lightning.envs.base import EVAL_SEED_START, Message, make_env


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
    truncated: bool = False  # ended because the prompt no longer fit the model's context

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
    """

    success_rate: float
    mean_return: float
    mean_turns: float
    transcripts: list[list[Message]]
    successes: list[bool] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


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


def play_policy(model: Any, tokenizer: Any, task: str, seeds: list[int] | range, *, max_new_tokens: int = 32,
                batch_size: int = 16, max_turns: int | None = None, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, sample_seed: int = 0,
                env_kwargs: dict[str, Any] | None = None) -> list[PlayedEpisode]:
    """Play ``model`` on the instances ``seeds`` of ``task``, several episodes per ``generate`` call.

    Args:
        model: HF causal LM with ``.generate`` (a PEFT model too). Put in eval mode here, its mode restored after.
        tokenizer: Its tokenizer; must have a chat template.
        task: Task name.
        seeds: Instance seeds, one episode each.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated together.
        max_turns: Override of the task's turn limit.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        sample_seed: Seeds the sampling (the global RNG state is left untouched).
        env_kwargs: Extra constructor arguments of the environment.

    Returns:
        The episodes, in the order of ``seeds``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("rollouts need a tokenizer with a chat template (apply_chat_template)")
    seeds = list(seeds)
    episodes: list[PlayedEpisode | None] = [None] * len(seeds)
    envs = {}
    pending = deque(range(len(seeds)))
    active: list[int] = []
    stop_ids = _stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    limit = _context_limit(model)
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
                    env = make_env(task, max_turns=max_turns, **(env_kwargs or {}))
                    messages = env.reset(seeds[i])
                    episodes[i] = PlayedEpisode(seeds[i], messages, optimal_turns=env.optimal_turns(),
                                                instance=env.instance)
                    envs[i] = env
                    active.append(i)
                prompts = [tokenizer.apply_chat_template(episodes[i].messages, tokenize=False,
                                                         add_generation_prompt=True) for i in active]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                if limit is not None and enc["input_ids"].shape[1] + max_new_tokens > limit:
                    lengths = enc["attention_mask"].sum(1).tolist()
                    fits = [n + max_new_tokens <= limit for n in lengths]
                    for i, ok in zip(active, fits):
                        if not ok:
                            episodes[i].truncated = True
                            del envs[i]
                    active = [i for i, ok in zip(active, fits) if ok]
                    if not active:
                        continue
                    prompts = [p for p, ok in zip(prompts, fits) if ok]
                    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
                still_active = []
                for i, ids in zip(active, new_tokens):
                    cut = next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))
                    text = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
                    observation, reward, done, _ = envs[i].step(text)
                    ep = episodes[i]
                    ep.messages += [{"role": "assistant", "content": text}, {"role": "user", "content": observation}]
                    ep.rewards.append(float(reward))
                    ep.actions.append(text)
                    ep.observations.append(observation)
                    ep.success = envs[i].success
                    if done:
                        del envs[i]
                    else:
                        still_active.append(i)
                active = still_active
    finally:
        model.train(was_training)
    return [ep for ep in episodes if ep is not None]


def evaluate_policy(model: Any, tokenizer: Any, task: str, num_episodes: int = 32, seed: int = EVAL_SEED_START,
                    max_new_tokens: int = 32, batch_size: int = 16, max_turns: int | None = None) -> RolloutResult:
    """Play the policy greedily on held-out real instances of ``task`` and score it.

    Args:
        model: HF causal LM with ``.generate`` (a PEFT model too); its training mode is restored afterwards.
        tokenizer: Its tokenizer; must have a chat template.
        task: Task name (``maze``, ``guess_number``, ``twenty_questions``).
        num_episodes: Episodes, on instance seeds ``seed, seed + 1, ...``.
        seed: First instance seed; the default 10000 starts the held-out range, disjoint from real and validation.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated together.
        max_turns: Override of the task's turn limit.

    Returns:
        Success rate, mean return, mean turns and the transcripts.
    """
    played = play_policy(model, tokenizer, task, range(seed, seed + num_episodes), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, max_turns=max_turns)
    n = max(len(played), 1)
    return RolloutResult(
        success_rate=sum(ep.success for ep in played) / n,
        mean_return=sum(ep.total_reward for ep in played) / n,
        mean_turns=sum(ep.turns for ep in played) / n,
        transcripts=[ep.messages for ep in played],
        successes=[ep.success for ep in played],
        returns=[ep.total_reward for ep in played],
        turns=[ep.turns for ep in played],
        seeds=[ep.seed for ep in played],
    )
