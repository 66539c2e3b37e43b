"""Bilevel machinery: hypergradients of the validation loss with respect to trajectory weights."""

from boost_lightning.bilevel.hypergradient import Hypergradient, exact_hypergradient, first_order_hypergradient

__all__ = ["Hypergradient", "exact_hypergradient", "first_order_hypergradient"]
