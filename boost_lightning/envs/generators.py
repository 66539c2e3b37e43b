"""Trajectory generators: expert demonstrations and a heterogeneous synthetic pool, as data-contract rows.

Every row is ``{"messages", "reward", "rewards", "source", "task_id", "meta"}``. ``reward`` and the replies in
``messages`` are what the generating simulator said (a hallucinating simulator claims success it did not earn); the
ground truth lives in ``meta`` only:

- ``generator``: ``expert`` | ``noisy-expert-<p>`` | ``hacked-sim`` | ``conflict-<variant>`` | ``benign-<variant>``
  | ``hallucinated-sim`` | ``lm-<name>``; ``failure`` its family (see :func:`synthetic_pool`).
- ``helpful``: the row demonstrates the real task (solved on the real dynamics in the expert's number of turns):
  the ground truth of the benchmark's ``oracle`` weighting, never available to a user.
- ``quality`` in [0, 1]: how good the row is as a demonstration of the *real* task,
  ``success x min(1, optimal_turns / turns)`` on the real dynamics (benign rows: on their own instances), and 0 for
  conflicting and hallucinated rows (they teach another task's moves, or moves conditioned on replies the real task
  never gives).
- ``success``: solved on the true dynamics of the task it was played on (the variant for shifted rows; for
  hallucinated and reward-hacked rows, the agent's actions replayed in the real environment). ``claimed_success``:
  what the trajectory's own replies say.
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
    TEST_SEED_START,
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
    "num_test": 64,
    "num_synthetic": 2000,
    "conflicting_fraction": 0.25,
    "benign_fraction": 0.15,
    "hacked_fraction": 0.15,
    "hallucinated_fraction": 0.15,
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
             failure: str = "none", helpful: bool = True, **extra: Any) -> dict[str, Any]:
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
            "failure": failure,
            "helpful": bool(helpful),
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


def test_rows(task: str, num: int = DEFAULT_SETTINGS["num_test"]) -> list[dict]:
    """``num`` real expert demonstrations on the test seeds (disjoint from validation and rollout evaluation)."""
    return expert_rows(task, range(TEST_SEED_START, TEST_SEED_START + num))


def noisy_expert_row(task: str, seed: int, noise: float, pool_seed: int = 0) -> dict:
    """An on-distribution trajectory of the expert that acts randomly with probability ``noise``."""
    rng = random.Random(f"noisy/{task}/{noise}/{pool_seed}/{seed}")
    ep = play(make_env(task), seed, noisy_expert_policy(noise, rng))
    quality = demonstration_quality(ep.success, ep.turns, ep.optimal_turns)
    return make_row(task, seed, ep, source="synthetic", generator=generator_name("noisy", noise), noise=noise,
                    failure="weak", success=ep.success, quality=quality, helpful=_helpful(ep.success, quality))


def _helpful(success: bool, quality: float) -> bool:
    # A row that demonstrates the real task as the real rows do: solved on the real dynamics in the expert's number
    # of turns. A detour is not harmless to imitate: a noisy expert that still wins teaches its random moves too.
    return bool(success) and quality >= 1.0 - 1e-9


def conflicting_row(task: str, seed: int, variant: str) -> dict:
    """Expert play of a conflicting variant (same surface, different correct action); high reward in its own task."""
    ep = play(task_spec(task).conflicting[variant](), seed, expert_policy)
    return make_row(task, seed, ep, source="synthetic", generator=generator_name("conflicting", variant),
                    variant=variant, failure="conflicting_shift", shifted=True, success=ep.success, quality=0.0,
                    helpful=False)


def benign_row(task: str, seed: int, variant: str) -> dict:
    """Expert play of a benign variant (more diverse instances or another valid strategy): still correct moves."""
    ep = play(task_spec(task).benign[variant](), seed, expert_policy)
    quality = demonstration_quality(ep.success, ep.turns, ep.optimal_turns)
    return make_row(task, seed, ep, source="synthetic", generator=generator_name("benign", variant),
                    variant=variant, failure="benign_shift", shifted=True, success=ep.success, quality=quality,
                    helpful=_helpful(ep.success, quality))


def hacked_row(task: str, seed: int, pool_seed: int = 0) -> dict:
    """A reward-hacked simulator: it declares success for play that fails on the real task.

    The agent follows the expert for a few turns, then makes a premature random move (an early guess, a wrong answer,
    a step that does not reach the goal) and the simulator answers with the task's success message and reward, as an
    over-optimistic LLM judge or simulator does. The row's own ``reward`` is the best in the pool: reward filters
    keep it. ``success`` is what the real environment made of the same actions.
    """
    rng = random.Random(f"hacked/{task}/{pool_seed}/{seed}")
    env = make_env(task)
    win = play(make_env(task), seed, expert_policy)  # the task's own success message and reward
    messages = env.reset(seed)
    optimal, instance = env.optimal_turns(), env.instance
    prefix = rng.randint(0, max(0, optimal - 2))
    rewards, actions, observations = [], [], []
    for turn in range(prefix + 1):
        action = env.expert_action() if turn < prefix else env.random_action(rng)
        observation, reward, done, _ = env.step(action)
        if turn == prefix or done:
            # Claimed: the simulator says this move won; ``env`` keeps what really happened.
            observation, reward = win.observations[-1], win.rewards[-1]
        messages += [{"role": "assistant", "content": action}, {"role": "user", "content": observation}]
        rewards.append(round(reward, 6))
        actions.append(action)
        observations.append(observation)
        if turn == prefix or done:
            break
    ep = Episode(messages, rewards, actions, observations, True, optimal, instance)
    # ``env`` is the real environment and took exactly these actions: its outcome is the honest one.
    quality = demonstration_quality(env.success, len(actions), optimal)
    return make_row(task, seed, ep, source="synthetic", generator=generator_name("hacked"),
                    failure="reward_hacked", success=env.success, quality=quality,
                    helpful=_helpful(env.success, quality))


def hallucinated_row(task: str, seed: int, rate: float = 0.2) -> dict:
    """The expert playing a simulator whose replies drift from the true dynamics (and trusting them)."""
    env = task_spec(task).hallucinating(rate=rate)
    ep = play(env, seed, expert_policy)
    real = replay(task, seed, ep.actions)
    return make_row(task, seed, ep, source="synthetic", generator=generator_name("hallucinated"),
                    failure="hallucination", hallucinated=True, success=real.success, quality=0.0,
                    hallucinated_turns=list(env.corrupted_turns), hallucination_rate=rate, helpful=False)


def generator_name(family: str, part: Any = None) -> str:
    """``meta.generator`` of a pool family's rows (``part``: the noise level or the variant)."""
    if family == "noisy":
        return f"noisy-expert-{float(part):g}"
    if family in ("conflicting", "benign"):
        return f"{'conflict' if family == 'conflicting' else 'benign'}-{part}"
    return {"hacked": "hacked-sim", "hallucinated": "hallucinated-sim"}[family]


def pool_generators(task: str, **settings: Any) -> list[str]:
    """The generators of the pool :func:`synthetic_pool` builds with ``settings`` (default settings otherwise)."""
    spec, s = task_spec(task), {**DEFAULT_SETTINGS, **settings}
    counts = pool_counts(s["num_synthetic"], s["noise_levels"], list(spec.conflicting), list(spec.benign),
                         s["conflicting_fraction"], s["benign_fraction"], s["hacked_fraction"],
                         s["hallucinated_fraction"])
    return [generator_name(family, part) for family, part in counts]


def pool_counts(num: int, noise_levels: Sequence[float], conflicting_variants: Sequence[str],
                benign_variants: Sequence[str], conflicting_fraction: float, benign_fraction: float,
                hacked_fraction: float, hallucinated_fraction: float) -> dict[tuple[str, Any], int]:
    """How many rows each generator contributes to a pool of ``num`` rows (exactly ``num`` in total).

    Returns:
        ``{("noisy", p): n, ("conflicting", variant): n, ("benign", variant): n, ("hacked", None): n,
        ("hallucinated", None): n}`` without zero counts; a family's variants share its rows equally and noisy
        experts share what the other families leave.
    """
    fractions = {"conflicting": conflicting_fraction, "benign": benign_fraction, "hacked": hacked_fraction,
                 "hallucinated": hallucinated_fraction}
    if any(not 0 <= f <= 1 for f in fractions.values()):
        raise ValueError(f"generator fractions must be in [0, 1], got {fractions}")
    if sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"generator fractions must sum to <= 1, got {fractions}")
    parts = {"conflicting": list(conflicting_variants), "benign": list(benign_variants), "hacked": [None],
             "hallucinated": [None]}
    totals = {family: round(num * f) if parts[family] else 0 for family, f in fractions.items()}
    overflow = sum(totals.values()) - num
    if overflow > 0:  # rounding up in every family can pass num by a row or two
        totals["hallucinated"] -= overflow
    totals = {"noisy": num - sum(totals.values()), **totals}
    parts["noisy"] = list(noise_levels)
    if totals["noisy"] and not noise_levels:
        raise ValueError("noise_levels is empty but the pool has room for noisy experts")
    counts: dict[tuple[str, Any], int] = {}
    for family, total in totals.items():
        for i, part in enumerate(parts[family]):
            counts[(family, part)] = total // len(parts[family]) + (i < total % len(parts[family]))
    return {k: v for k, v in counts.items() if v}


def synthetic_pool(task: str, num: int = DEFAULT_SETTINGS["num_synthetic"],
                   conflicting_fraction: float = DEFAULT_SETTINGS["conflicting_fraction"],
                   benign_fraction: float = DEFAULT_SETTINGS["benign_fraction"],
                   hacked_fraction: float = DEFAULT_SETTINGS["hacked_fraction"],
                   hallucinated_fraction: float = DEFAULT_SETTINGS["hallucinated_fraction"],
                   noise_levels: Sequence[float] = DEFAULT_SETTINGS["noise_levels"],
                   hallucination_rate: float = DEFAULT_SETTINGS["hallucination_rate"],
                   seed: int = DEFAULT_SETTINGS["seed"], on_row: Callable[[], None] | None = None) -> list[dict]:
    """A shuffled pool of synthetic rows from five generator families that fail the way generated data fails.

    Families (``meta.failure``; ``meta.generator`` names the generator):

    - ``weak`` (``noisy-expert-<p>``): weak agents, the expert acting at random with probability ``p``; honest
      rewards (rejection-sampled LLM agents).
    - ``reward_hacked`` (``hacked-sim``): a simulator that declares success for play that fails on the real task,
      so the row's own reward lies (over-optimistic LLM judges and simulators; reward hacking, Skalse et al.
      NeurIPS 2022).
    - ``conflicting_shift`` (``conflict-<variant>``): the same surface format with a different correct action
      (swapped action meanings, reversed feedback, another world), high reward in its own task.
    - ``benign_shift`` (``benign-<variant>``): more diverse instances or another valid strategy; correct moves.
    - ``hallucination`` (``hallucinated-sim``): an LLM playing the environment whose replies drift from the real
      dynamics (the expert trusts them).

    ``meta.helpful`` is the ground truth the benchmark's ``oracle`` reads: the row solves the real task on the real
    dynamics in the expert's number of turns; never available to a user.

    Args:
        task: Task name.
        num: Rows in the pool.
        conflicting_fraction: Share of conflicting-shift rows (split equally among the task's variants).
        benign_fraction: Share of benign-shift rows.
        hacked_fraction: Share of reward-hacked rows.
        hallucinated_fraction: Share of rows from the hallucinating simulator.
        noise_levels: Noisy-expert levels sharing the remaining rows equally.
        hallucination_rate: Per-turn probability of a made-up reply (one is always made up).
        seed: Pool seed: instance seeds are ``20000 + 1_000_000 * seed + i`` and the random actions depend on it.
        on_row: Called after each row (progress bars).

    Returns:
        ``num`` rows in a seeded random order.
    """
    spec = task_spec(task)
    counts = pool_counts(num, noise_levels, list(spec.conflicting), list(spec.benign), conflicting_fraction,
                         benign_fraction, hacked_fraction, hallucinated_fraction)
    rows = []
    instance_seed = SYNTHETIC_SEED_START + 1_000_000 * seed
    for (family, part), count in counts.items():
        for _ in range(count):
            if family == "noisy":
                rows.append(noisy_expert_row(task, instance_seed, float(part), pool_seed=seed))
            elif family == "conflicting":
                rows.append(conflicting_row(task, instance_seed, part))
            elif family == "benign":
                rows.append(benign_row(task, instance_seed, part))
            elif family == "hacked":
                rows.append(hacked_row(task, instance_seed, pool_seed=seed))
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
