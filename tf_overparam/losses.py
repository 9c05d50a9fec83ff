"""The l_p regression loss of the paper's Section 7, its value and its gradient (one home).

For a residual r = y_hat - y the loss is (1/p) |r|^p (docs/equations.md, "l_p loss") and its
derivative with respect to y_hat is sign(r) |r|^{p-1}. `LpLoss` (for `model.fit`) and the
full-batch engine (`experiments.engine.fullbatch`, which writes its gradient by hand) both use the
functions below.
"""

import keras
from keras import ops

from tf_overparam.validation import PACKAGE, check_finite_float_at_least


def abs_power(values, p, signed=False):
    """|values|^p, or sign(values) |values|^p if `signed`.

    An integer p is computed by repeated multiplication (cheaper than a power op, and exact
    at 0); any other p by `ops.power`.
    """
    if float(p) != int(p):
        result = ops.power(ops.abs(values), p)
        return result * ops.sign(values) if signed else result
    p = int(p)
    natural = (p % 2 == 1) == signed  # values^p is already the wanted value
    result, base = None, values if natural else ops.abs(values)
    while p:
        if p & 1:
            result = base if result is None else result * base
        p >>= 1
        if p:
            base = base * base
    result = ops.ones_like(values) if result is None else result
    return result if natural or not signed else result * ops.sign(values)


def lp_loss_values(residual, p):
    """(1/p) |residual|^p, element-wise."""
    return abs_power(residual, p) / p


def lp_loss_slope(residual, p):
    """d/d(residual) of (1/p) |residual|^p = sign(residual) |residual|^{p-1}, element-wise."""
    return abs_power(residual, p - 1, signed=True)


def check_p(p):
    """Returns `p` as a float >= 1, or raises a `ValueError` naming it (also for inf and NaN)."""
    return check_finite_float_at_least(p, "p", 1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class LpLoss(keras.losses.Loss):
    """l_p loss: (1/p) |y_pred - y_true|^p, averaged over the last axis and the batch.

    p = 2 is half the mean squared error; the paper's acceleration shows with p = 4.

    Args:
        p: finite float >= 1, the exponent.
        reduction, name, dtype: as for `keras.losses.Loss`.

    Example:

    >>> LpLoss(4)(keras.ops.zeros((2, 1)), keras.ops.ones((2, 1)) * 2.0)  # (1/4) * 2^4
    4.0
    """

    def __init__(self, p=2.0, reduction="sum_over_batch_size", name=None, dtype=None):
        p = check_p(p)
        super().__init__(name=name or f"l{p:g}_loss", reduction=reduction, dtype=dtype)
        self.p = p

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        values = lp_loss_values(y_pred - y_true, self.p)
        # A sum over the count, not `ops.mean`: Keras 3.15's JAX and torch `mean` compute a
        # float64 input in float32 (their result_type maps 64-bit types to 32-bit ones).
        return ops.sum(values, axis=-1) / ops.cast(ops.shape(values)[-1], values.dtype)

    def get_config(self):
        return {**super().get_config(), "p": self.p}
