"""Trajectory weightings: BOOST's learned head and the baselines, one interface (:class:`Weighting`).

Choose one in a config by ``class_path`` (``boost_lightning.weightings.ReturnFilter`` with ``init_args``) or by its
short name (``weighting: return_filter``), see :data:`WEIGHTINGS`.
"""

from __future__ import annotations

from boost_lightning.registry import build
from boost_lightning.weightings.base import ROW_COLUMNS, Weighting, row_columns
from boost_lightning.weightings.density_ratio import DensityRatio
from boost_lightning.weightings.fixed import (
    L2RW,
    AdvantageSoftmax,
    RealOnly,
    ReturnFilter,
    ReturnSoftmax,
    SyntheticOnly,
    Uniform,
    top_fraction_mask,
)
from boost_lightning.weightings.from_file import FixedWeights
from boost_lightning.weightings.group import Group
from boost_lightning.weightings.learned import Learned
from boost_lightning.weightings.oracle import Oracle

#: Short name → class (built with its defaults).
WEIGHTINGS: dict[str, type[Weighting]] = {
    "learned": Learned,
    "uniform": Uniform,
    "real_only": RealOnly,
    "synthetic_only": SyntheticOnly,
    "return_filter": ReturnFilter,
    "return_softmax": ReturnSoftmax,
    "advantage_softmax": AdvantageSoftmax,
    "l2rw": L2RW,
    "density_ratio": DensityRatio,
    "group": Group,
    "oracle": Oracle,
}


def build_weighting(spec: Weighting | str) -> Weighting:
    """A :class:`Weighting` as is, or a short name of :data:`WEIGHTINGS` built with its defaults."""
    return build(spec, WEIGHTINGS, Weighting, "weighting")


__all__ = ["L2RW", "ROW_COLUMNS", "WEIGHTINGS", "AdvantageSoftmax", "DensityRatio", "FixedWeights", "Group", "Learned",
           "Oracle", "RealOnly", "ReturnFilter", "ReturnSoftmax", "SyntheticOnly", "Uniform", "Weighting",
           "build_weighting", "row_columns", "top_fraction_mask"]
