"""tf_overparam: implicit acceleration by overparameterization (Arora, Cohen & Hazan, ICML 2018)
for Keras 3 / TensorFlow.

- `OverparamDense`, `OverparamConv2D`: a `Dense` / `Conv2D` whose kernel is a product of
  `depth` factors; `layers` holds
  the base class of such chained-kernel layers and the plain -> overparam registry.
- `overparameterize` / `collapse`: convert whole models between the two.
- `chain`: the chain core (validators, the product eq. 10, the factor gradients eq. 14,
  the balanced factorisation); equations are numbered as in docs/equations.md.
- `optimizers.EndToEnd`: any Keras optimizer, with the selected kernels moved by the end-to-end
  update rule (eq. 24); `EndToEndModel`: a model that compiles its optimizer through it.
- `initializers` (NearZero, Identity, Balanced), `losses.LpLoss`, `diagnostics`,
  `preconditioning`.
"""

import importlib

from tf_overparam import chain, diagnostics, initializers, layers, losses, optimizers, preconditioning
from tf_overparam.layers import OverparamConv2D, OverparamDense
from tf_overparam.losses import LpLoss
from tf_overparam.models import collapse, overparameterize
from tf_overparam.training import EndToEndModel

__version__ = "0.2.0"

# Imported on first use, on every backend: it writes through tf.summary, which needs TensorFlow;
# the rest of the library needs Keras, NumPy and the backend alone.
_LAZY = {"callbacks": ("tf_overparam.callbacks", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tf_overparam' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = [
    "EndToEndModel",
    "LpLoss",
    "OverparamConv2D",
    "OverparamDense",
    "callbacks",
    "chain",
    "collapse",
    "diagnostics",
    "initializers",
    "layers",
    "losses",
    "optimizers",
    "overparameterize",
    "preconditioning",
]
