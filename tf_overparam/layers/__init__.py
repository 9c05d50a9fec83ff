"""Chained-kernel layers: a base class, `OverparamDense`, `OverparamConv2D`, and the plain -> overparam registry."""

from tf_overparam.chain import check_depth, resolve_hidden_units  # noqa: F401  (0.1.0 import path)
from tf_overparam.layers import registry
from tf_overparam.layers.base import ChainedKernelLayer
from tf_overparam.layers.conv import OverparamConv2D
from tf_overparam.layers.dense import OverparamDense, dense_config, overparam_config

__all__ = ["ChainedKernelLayer", "OverparamConv2D", "OverparamDense", "dense_config", "overparam_config", "registry"]
