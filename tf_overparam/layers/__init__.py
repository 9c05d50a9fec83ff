"""Overparameterized layers: a base class, `OverparamDense`, `OverparamConv2D`, and the plain -> overparam registry."""

from tf_overparam import chain
from tf_overparam._deprecation import deprecated_names
from tf_overparam.layers import registry
from tf_overparam.layers.base import OverparamLayer
from tf_overparam.layers.conv import OverparamConv2D
from tf_overparam.layers.dense import OverparamDense, dense_config, overparam_config

# Deprecated names: the chain's validators are `tf_overparam.chain`'s; the base class had the
# second word for the one idea of a layer whose kernel is a product of factors.
__getattr__ = deprecated_names(
    __name__,
    {
        **{
            name: (f"tf_overparam.chain.{name}", getattr(chain, name))
            for name in ("check_depth", "resolve_hidden_units")
        },
        "ChainedKernelLayer": ("tf_overparam.layers.OverparamLayer", OverparamLayer),
    },
)

__all__ = ["OverparamLayer", "OverparamConv2D", "OverparamDense", "dense_config", "overparam_config", "registry"]
