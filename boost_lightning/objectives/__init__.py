"""Per-trajectory objectives and the weighted reduction."""

from boost_lightning.objectives.reduce import weighted_loss
from boost_lightning.objectives.trajectory_losses import (
    AWR,
    BC,
    OBJECTIVES,
    RWR,
    Objective,
    TopReturnBC,
    build_objective,
)

__all__ = ["AWR", "BC", "OBJECTIVES", "RWR", "Objective", "TopReturnBC", "build_objective", "weighted_loss"]
