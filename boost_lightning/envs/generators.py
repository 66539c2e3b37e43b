"""Trajectory generators: expert demonstrations and a heterogeneous synthetic pool, as data-contract rows.

Every row is ``{"messages", "reward", "rewards", "source", "task_id", "meta"}``. ``reward`` and the replies in
``messages`` are what the generating simulator said (a hallucinating simulator claims success it did not earn); the
ground truth lives in ``meta`` only:

- ``generator``: ``expert`` | ``noisy-expert-<p>`` | ``shifted-<variant>`` | ``hallucinated-sim`` | ``lm-<name>``.
- ``quality`` in [0, 1]: how good the row is as a demonstration of the *real* task,
  ``success x min(1, optimal_turns / turns)`` on the real dynamics, and 0 for shifted and hallucinated rows (they
  teach another task's moves, or moves conditioned on replies the real task never gives).
- ``success``: solved on the true dynamics of the task it was played on (the shifted task for shifted rows; for
  hallucinated rows, the agent's actions replayed in the real environment). ``claimed_success``: what the
  trajectory's own replies say.
- ``optimal_turns``: turns the expert needs on that instance; ``turns``: assistant turns in the row.
- ``shifted``, ``hallucinated`` (bools), ``hallucinated_turns`` (0-based turns whose reply was made up), ``noise``
  (probability of a random action), ``variant``, ``seed``, ``instance`` (the secret / start and goal), ``task``.

``task_id`` is ``<task>-<seed>`` for every generator, so it gives nothing away.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from boost_lightning.envs.base import (
    REAL_SEED_START,
    SYNTHETIC_SEED_START,
    VALIDATION_SEED_START,
    Env,
    Message,
    make_env,
    task_spec,
)

Policy = Callable[[Env], str]

# The synthesizer's settings (the keyword arguments of ``synthesize.build_splits``) and their defaults: the one place
# they are written. The generators below, the synthesize command line and the embedded-data cache all read them here.
DEFAULT_SETTINGS: Mapping[str, Any] = MappingProxyType({
    "num_real": 64,
    "num_validation": 64,
    "num_synthetic": 2000,
    "shifted_fraction": 0.3,
    "hallucinated_fraction": 0.1,
    "noise_levels": (0.1, 0.3, 0.6),
    "hallucination_rate": 0.2,
    "seed": 0,
})


@dataclass
class Episode:
    """One played episode: the chat transcript and what happened."""

    messages: list[Message]
    rewards: list[float]
    actions: list[str]
    observations: list[str]
    success: bool
    optimal_turns: int
    instance: dict[str, Any]

    @property
    def turns(self) -> int:
        return len(self.actions)


def play(env: Env, seed: int, policy: Policy) -> Episode:
    """Play ``policy`` on instance ``seed`` of ``env`` until the episode ends.

    Args:
        env: The environment (reset here).
        seed: Instance seed.
        policy: Maps the environment (its agent-visible belief) to the next agent text.

    Returns:
        The episode, ending with the final observation as a user message.
    """
    messages = env.reset(seed)
    optimal, instance = env.optimal_turns(), env.instance
    rewards, actions, observations = [], [], []
    done = False
    while not done:
        action = policy(env)
        observation, reward, done, _ = env.step(action)
        messages += [{"role": "assistant", "content": action}, {"role": "user", "content": observation}]
        rewards.append(round(reward, 6))
        actions.append(action)
        observations.append(observation)
    return Episode(messages, rewards, actions, observations, env.success, optimal, instance)


def expert_policy(env: Env) -> str:
    """The task's planner: BFS, bisection or information-greedy questions."""
    return env.expert_action()


def noisy_expert_policy(noise: float, rng: random.Random) -> Policy:
    """The expert, except that with probability ``noise`` it takes a random well-formed action."""

    def policy(env: Env) -> str:
        return env.random_action(rng) if rng.random() < noise else env.expert_action()

    return policy


def demonstration_quality(success: bool, turns: int, optimal_turns: int) -> float:
    """``success x min(1, optimal_turns / turns)``: 1 for an optimal solve, lower for detours, 0 for a failure."""
    return float(success) * min(1.0, optimal_turns / max(turns, 1))


def replay(task: str, seed: int, actions: Sequence[str], **env_kwargs: Any) -> Episode:
    """Replay recorded agent actions in the real environment, stopping when they run out or the real episode ends.

    Args:
        task: Task name.
        seed: Instance seed the actions were played on.
        actions: Agent texts, in order.
        **env_kwargs: Constructor arguments of the real environment.

    Returns:
        The real environment's side of the same actions.
    """
    env = make_env(task, **env_kwargs)
    messages = env.reset(seed)
    optimal, instance = env.optimal_turns(), env.instance
    rewards, taken, observations = [], [], []
    for action in actions:
        observation, reward, done, _ = env.step(action)
        messages += [{"role": "assistant", "content": action}, {"role": "user", "content": observation}]
        rewards.append(round(reward, 6))
        taken.append(action)
        observations.append(observation)
        if done:
            break
    return Episode(messages, rewards, taken, observations, env.success, optimal, instance)


def make_row(task: str, seed: int, episode: Episode, *, source: str, generator: str, quality: float, success: bool,
             shifted: bool = False, hallucinated: bool = False, noise: float = 0.0, variant: str = "real",
             **extra: Any) -> dict[str, Any]:
    """Assemble a data-contract row from an episode; ground truth goes to ``meta``."""
    return {
        "messages": episode.messages,
        "reward": round(sum(episode.rewards), 6),
        "rewards": episode.rewards,
        "source": source,
        "task_id": f"{task}-{seed}",
        "meta": {
            "generator": generator,
            "quality": round(quality, 6),
            "success": bool(success),
            "claimed_success": bool(episode.success),
            "optimal_turns": episode.optimal_turns,
            "turns": episode.turns,
            "shifted": shifted,
            "hallucinated": hallucinated,
            "noise": noise,
            "variant": variant,
            "seed": seed,
            "task": task,
            "instance": episode.instance,
            **extra,
        },
    }


def expert_rows(task: str, seeds: Sequence[int], source: str = "real", max_turns: int | None = None) -> list[dict]:
    """Expert demonstrations on the real task for ``seeds``.

    Args:
        task: Task name.
        seeds: Instance seeds (``range(0, n)`` for real data, ``range(5000, 5000 + n)`` for validation).
        source: ``"real"`` or ``"synthetic"``.
        max_turns: Override of the task's turn limit.

    Returns:
        One row per seed, generator ``expert``.
    """
    env = make_env(task, max_turns=max_turns)
    rows = []
    for seed in seeds:
        ep = play(env, seed, expert_policy)
        rows.append(make_row(task, seed, ep, source=source, generator="expert", success=ep.success,
                             quality=demonstration_quality(ep.success, ep.turns, ep.optimal_turns)))
    return rows


def real_rows(task: str, num: int = DEFAULT_SETTINGS["num_real"]) -> list[dict]:
    """``num`` real expert demonstrations on the first train seeds."""
    return expert_rows(task, range(REAL_SEED_START, REAL_SEED_START + num))


def validation_rows(task: str, num: int = DEFAULT_SETTINGS["num_validation"]) -> list[dict]:
    """``num`` real expert demonstrations on the validation seeds (disjoint from the real ones)."""
    return expert_rows(task, range(VALIDATION_SEED_START, VALIDATION_SEED_START + num))


def noisy_expert_row(task: str, seed: int, noise: float, pool_seed: int = 0) -> dict:
    """An on-distribution trajectory of the expert that acts randomly with probability ``noise``."""
    rng = random.Random(f"noisy/{task}/{noise}/{pool_seed}/{seed}")
    ep = play(make_env(task), seed, noisy_expert_policy(noise, rng))
    return make_row(task, seed, ep, source="synthetic", generator=f"noisy-expert-{noise:g}", noise=noise,
                    success=ep.success, quality=demonstration_quality(ep.success, ep.turns, ep.optimal_turns))


def shifted_row(task: str, seed: int, variant: str) -> dict:
    """An expert trajectory of a plausible but different task distribution (``variant`` of the task's spec)."""
    ep = play(task_spec(task).shifted[variant](), seed, expert_policy)
    return make_row(task, seed, ep, source="synthetic", generator=f"shifted-{variant}", variant=variant,
                    shifted=True, success=ep.success, quality=0.0)


def hallucinated_row(task: str, seed: int, rate: float = 0.2) -> dict:
    """The expert playing a simulator whose replies drift from the true dynamics (and trusting them)."""
    env = task_spec(task).hallucinating(rate=rate)
    ep = play(env, seed, expert_policy)
    real = replay(task, seed, ep.actions)
    return make_row(task, seed, ep, source="synthetic", generator="hallucinated-sim", hallucinated=True,
                    success=real.success, quality=0.0, hallucinated_turns=list(env.corrupted_turns),
                    hallucination_rate=rate)


def pool_counts(num: int, noise_levels: Sequence[float], shifted_variants: Sequence[str], shifted_fraction: float,
                hallucinated_fraction: float) -> dict[tuple[str, Any], int]:
    """How many rows each generator contributes to a pool of ``num`` rows (exactly ``num`` in total).

    Returns:
        ``{("noisy", p): n, ("shifted", variant): n, ("hallucinated", None): n}``; noisy experts share the rest
        equally.
    """
    if not (0 <= shifted_fraction <= 1 and 0 <= hallucinated_fraction <= 1):
        raise ValueError("shifted_fraction and hallucinated_fraction must be in [0, 1]")
    if shifted_fraction + hallucinated_fraction > 1 + 1e-9:
        raise ValueError("shifted_fraction + hallucinated_fraction must be <= 1")
    n_shifted = round(num * shifted_fraction)
    n_hallucinated = min(round(num * hallucinated_fraction), num - n_shifted)
    n_noisy = num - n_shifted - n_hallucinated
    if n_noisy and not noise_levels:
        raise ValueError("noise_levels is empty but the pool has room for noisy experts")
    counts: dict[tuple[str, Any], int] = {}
    for key, total, parts in (("noisy", n_noisy, list(noise_levels)), ("shifted", n_shifted, list(shifted_variants))):
        for i, part in enumerate(parts):
            counts[(key, part)] = total // len(parts) + (i < total % len(parts))
    counts[("hallucinated", None)] = n_hallucinated
    return {k: v for k, v in counts.items() if v}


def synthetic_pool(task: str, num: int = DEFAULT_SETTINGS["num_synthetic"],
                   shifted_fraction: float = DEFAULT_SETTINGS["shifted_fraction"],
                   hallucinated_fraction: float = DEFAULT_SETTINGS["hallucinated_fraction"],
                   noise_levels: Sequence[float] = DEFAULT_SETTINGS["noise_levels"],
                   hallucination_rate: float = DEFAULT_SETTINGS["hallucination_rate"],
                   seed: int = DEFAULT_SETTINGS["seed"], on_row: Callable[[], None] | None = None) -> list[dict]:
    """A shuffled pool of synthetic rows from noisy experts, task-shifted experts and a hallucinating simulator.

    Args:
        task: Task name.
        num: Rows in the pool.
        shifted_fraction: Share of task-shifted rows (split equally among the task's shifted variants).
        hallucinated_fraction: Share of rows from the hallucinating simulator.
        noise_levels: Noisy-expert levels sharing the remaining rows equally.
        hallucination_rate: Per-turn probability of a made-up reply (one is always made up).
        seed: Pool seed: instance seeds are ``20000 + 1_000_000 * seed + i`` and the random actions depend on it.
        on_row: Called after each row (progress bars).

    Returns:
        ``num`` rows in a seeded random order.
    """
    spec = task_spec(task)
    counts = pool_counts(num, noise_levels, list(spec.shifted), shifted_fraction, hallucinated_fraction)
    rows = []
    instance_seed = SYNTHETIC_SEED_START + 1_000_000 * seed
    for (kind, part), count in counts.items():
        for _ in range(count):
            if kind == "noisy":
                rows.append(noisy_expert_row(task, instance_seed, float(part), pool_seed=seed))
            elif kind == "shifted":
                rows.append(shifted_row(task, instance_seed, part))
            else:
                rows.append(hallucinated_row(task, instance_seed, hallucination_rate))
            instance_seed += 1
            if on_row is not None:
                on_row()
    random.Random(f"pool-order/{task}/{seed}").shuffle(rows)
    return rows


def lm_rows(model: Any, tokenizer: Any, task: str, num: int, seed: int = 0, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 32, batch_size: int = 16, name: str | None = None) -> list[dict]:
    """Synthetic rows from any HF causal LM playing the real task by sampling, labelled by the real outcome.

    Args:
        model: A causal LM with ``.generate`` (PEFT-wrapped too).
        tokenizer: Its tokenizer, with a chat template.
        task: Task name.
        num: Episodes to play.
        seed: Instance seeds are ``20000 + 1_000_000 * seed + 500_000 + i``; also seeds the sampling.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        max_new_tokens: Generation budget per agent turn.
        batch_size: Episodes generated in parallel.
        name: Generator suffix (default: the model's name or path).

    Returns:
        One row per episode, generator ``lm-<name>``.
    """
    from boost_lightning.envs.rollout import play_policy

    name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "policy").rstrip("/")
    name = name.rsplit("/", 1)[-1]
    seeds = [SYNTHETIC_SEED_START + 1_000_000 * seed + 500_000 + i for i in range(num)]
    played = play_policy(model, tokenizer, task, seeds, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=True, temperature=temperature, top_p=top_p, sample_seed=seed)
    rows = []
    for ep in played:
        episode = Episode(ep.messages, ep.rewards, ep.actions, ep.observations, ep.success, ep.optimal_turns,
                          ep.instance)
        rows.append(make_row(task, ep.seed, episode, source="synthetic", generator=f"lm-{name}", success=ep.success,
                             quality=demonstration_quality(ep.success, ep.turns, ep.optimal_turns),
                             sampled=True, temperature=temperature))
    return rows
