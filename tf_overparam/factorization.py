"""Compatibility module: the chain core moved to `tf_overparam.chain` in 0.2.0."""

from tf_overparam.chain import balanced_factors, chain_gradients, chain_product  # noqa: F401

__all__ = ["balanced_factors", "chain_gradients", "chain_product"]
