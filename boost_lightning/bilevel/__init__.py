"""Bilevel machinery: hypergradients of the validation loss with respect to trajectory weights."""

from boost_lightning.bilevel.hypergradient import Hypergradient, exact_hypergradient, first_order_hypergradient
from boost_lightning.bilevel.tradeoff import Tradeoff, tradeoff, weighted_mmd

__all__ = ["Hypergradient", "Tradeoff", "exact_hypergradient", "first_order_hypergradient", "tradeoff", "weighted_mmd"]
