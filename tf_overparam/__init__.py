"""tf_overparam: implicit acceleration by overparameterization (Arora, Cohen & Hazan, ICML 2018)
for Keras 3, on TensorFlow or JAX.

- `OverparamDense`, `OverparamConv2D`: a `Dense` / `Conv2D` whose kernel is a product of
  `depth` factors; `layers` holds the base class of such overparameterized layers and the
  plain -> overparam registry.
- `conversion`: `overparameterize` / `collapse` convert whole models between the two.
- `chain`: the chain core (the product eq. 10, the factor gradients eq. 14, the balanced
  factorisation); equations are numbered as in docs/equations.md.
- `validation`: the argument validators of the public entry points, one per kind.
- `optimizers.EndToEnd`: any Keras optimizer, with the selected kernels moved by the end-to-end
  update rule (eq. 10 of the paper, known here as eq. 24); `models.EndToEndModel`: a model that
  compiles its optimizer through it. `linear_maps`: each kernel read as its layer's linear map
  (the matrix the rule preconditions); `kernel_groups`: kernels of one matrix shape in one
  batched call. `preconditioning`: the rule's preconditioner (eigh, Newton-Schulz, references).
- `initializers` (NearZero, Identity, Balanced), `losses.LpLoss`, `diagnostics` (with
  `sharpness`, the largest Hessian eigenvalue, through `hessian`'s Hessian-vector products).
"""

import importlib

from tf_overparam import (
    chain,
    conversion,
    diagnostics,
    hessian,
    initializers,
    kernel_groups,
    layers,
    linear_maps,
    losses,
    models,
    optimizers,
    preconditioning,
    validation,
)
from tf_overparam.conversion import ConversionReport, collapse, overparameterize
from tf_overparam.layers import OverparamConv2D, OverparamDense
from tf_overparam.losses import LpLoss
from tf_overparam.models import EndToEndModel

__version__ = "0.3.0"

# Imported on first use, on every backend: it writes through tf.summary, which needs TensorFlow;
# the rest of the library needs Keras, NumPy and the backend alone.
# `training` and `factorization` are deprecated import paths (they warn when a name is used).
_LAZY = {
    "callbacks": ("tf_overparam.callbacks", None),
    "factorization": ("tf_overparam.factorization", None),
    "training": ("tf_overparam.training", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tf_overparam' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)


__all__ = [
    "ConversionReport",
    "EndToEndModel",
    "LpLoss",
    "OverparamConv2D",
    "OverparamDense",
    "callbacks",
    "chain",
    "collapse",
    "conversion",
    "diagnostics",
    "hessian",
    "initializers",
    "kernel_groups",
    "layers",
    "linear_maps",
    "losses",
    "models",
    "optimizers",
    "overparameterize",
    "preconditioning",
    "validation",
]
