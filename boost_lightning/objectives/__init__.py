"""Per-trajectory objectives and the weighted reduction."""

from boost_lightning.objectives.reduce import weighted_loss
from boost_lightning.objectives.trajectory_losses import (
    advantage_weighted,
    behaviour_cloning,
    exponential_weights,
    filtered_bc,
    filtered_bc_mask,
    reward_weighted,
)

__all__ = [
    "advantage_weighted",
    "behaviour_cloning",
    "exponential_weights",
    "filtered_bc",
    "filtered_bc_mask",
    "reward_weighted",
    "weighted_loss",
]
