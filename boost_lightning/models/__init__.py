"""Models: the LoRA policy, the reweighting head and its features."""

from boost_lightning.models.policy import PolicyModel, TrajectoryOutput
from boost_lightning.models.weight_head import WeightHead, effective_sample_size, ess_floor

__all__ = ["PolicyModel", "TrajectoryOutput", "WeightHead", "effective_sample_size", "ess_floor"]
