"""Per-trajectory features for the weight head: what the head may know about a trajectory.

All features are detached from the policy: the head is trained only through the hypergradient, never by
backpropagating into the policy. Ground-truth quality labels in ``meta`` are never used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from boost_lightning.models.policy import TrajectoryOutput

#: Scalar features, in the order they are stacked. ``hidden`` (the pooled hidden state) comes first when enabled.
SCALAR_FEATURES = ("loss", "surprise", "reward", "source", "length", "turns")
ALL_FEATURES = ("hidden", *SCALAR_FEATURES)


def validate_feature_names(names: Sequence[str]) -> tuple[str, ...]:
    """Check feature names against :data:`ALL_FEATURES` and return them in canonical order."""
    unknown = sorted(set(names) - set(ALL_FEATURES))
    if unknown:
        raise ValueError(f"unknown head features {unknown}; choose from {list(ALL_FEATURES)}")
    if not names:
        raise ValueError("the weight head needs at least one feature")
    return tuple(n for n in ALL_FEATURES if n in names)


def scalar_features(out: TrajectoryOutput, batch: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Stack the enabled scalar features into [B, k] (float32, detached).

    ``loss`` is the agent-token NLL, ``surprise`` the observation-token NLL (environment replies the policy
    did not expect: shifted tasks and hallucinating simulators stand out there), ``length`` is log(1+tokens)
    and ``turns`` the number of agent turns.
    """
    columns = {
        "loss": lambda: out.loss.detach(),
        "surprise": lambda: out.surprise,
        "reward": lambda: batch["reward"],
        "source": lambda: batch["is_synthetic"],
        "length": lambda: torch.log1p(batch["length"].float()),
        "turns": lambda: batch["num_turns"].float(),
    }
    picked = [columns[n]().float() for n in names if n in columns]
    if not picked:
        return out.loss.new_zeros(out.loss.shape[0], 0)
    return torch.stack(picked, dim=1).detach()
