"""Deprecated import path: the chain core lives in `tf_overparam.chain`."""

from tf_overparam import chain
from tf_overparam._deprecation import deprecated_names

__getattr__ = deprecated_names(
    __name__,
    {
        name: (f"tf_overparam.chain.{name}", getattr(chain, name))
        for name in ("balanced_factors", "chain_gradients", "chain_product")
    },
)
