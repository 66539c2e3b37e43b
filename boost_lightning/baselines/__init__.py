"""Baseline weightings, selected by ``BoostModule(weighting=...)``."""

from boost_lightning.baselines.weighting import (
    FIXED_WEIGHTINGS,
    WEIGHTINGS,
    RunningBaseline,
    fixed_weights,
    l2rw_weights,
    top_fraction_mask,
)

__all__ = ["FIXED_WEIGHTINGS", "WEIGHTINGS", "RunningBaseline", "fixed_weights", "l2rw_weights", "top_fraction_mask"]
