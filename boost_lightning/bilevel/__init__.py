"""Bilevel machinery: hypergradients of the validation loss with respect to trajectory weights, the inner optimizer's
geometry, the schedule of both levels and the PAC-Bayes trade-off scalars."""

from boost_lightning.bilevel.hypergradient import (
    Hypergradient,
    HypergradientOptions,
    exact_hypergradient,
    first_order_hypergradient,
    gradient_norms,
)
from boost_lightning.bilevel.policy import policy_hypergradient, row_alignment, validation_direction
from boost_lightning.bilevel.preconditioner import adam_preconditioner
from boost_lightning.bilevel.schedule import BilevelSchedule, Cycle
from boost_lightning.bilevel.tradeoff import Tradeoff, tradeoff, weighted_mmd

__all__ = ["BilevelSchedule", "Cycle", "Hypergradient", "HypergradientOptions", "Tradeoff", "adam_preconditioner",
           "exact_hypergradient", "first_order_hypergradient", "gradient_norms", "policy_hypergradient",
           "row_alignment", "tradeoff", "validation_direction", "weighted_mmd"]
