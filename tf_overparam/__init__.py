"""tf_overparam: implicit acceleration by overparameterization (Arora, Cohen & Hazan, ICML 2018)
for Keras 3 / TensorFlow.

- `OverparamDense`: a `Dense` whose kernel is a product of `depth` factors.
- `overparameterize` / `collapse`: convert whole models between the two.
- `EndToEndModel`: trains plain `Dense` layers by the end-to-end update rule (eq. 24).
- `initializers` (NearZero, Identity, Balanced), `losses.LpLoss`, `diagnostics`,
  `preconditioning`.
"""

from tf_overparam import callbacks, diagnostics, initializers, losses, preconditioning
from tf_overparam.layers import OverparamDense
from tf_overparam.losses import LpLoss
from tf_overparam.models import collapse, overparameterize
from tf_overparam.training import EndToEndModel

__version__ = "0.1.0"

__all__ = [
    "EndToEndModel",
    "LpLoss",
    "OverparamDense",
    "callbacks",
    "collapse",
    "diagnostics",
    "initializers",
    "losses",
    "overparameterize",
    "preconditioning",
]
