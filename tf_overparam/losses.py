"""The l_p regression loss of the paper's Section 7."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tf_overparam")
class LpLoss(keras.losses.Loss):
    """l_p loss: (1/p) |y_pred - y_true|^p, averaged over the last axis and the batch.

    p = 2 is half the mean squared error; the paper's acceleration shows with p = 4.

    Args:
        p: float >= 1, the exponent.
        reduction, name, dtype: as for `keras.losses.Loss`.

    Example:

    >>> LpLoss(4)(keras.ops.zeros((2, 1)), keras.ops.ones((2, 1)) * 2.0)  # (1/4) * 2^4
    4.0
    """

    def __init__(self, p=2.0, reduction="sum_over_batch_size", name=None, dtype=None):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
            raise ValueError(f"`p` must be a number >= 1, got {p!r}.")
        super().__init__(name=name or f"l{p:g}_loss", reduction=reduction, dtype=dtype)
        self.p = float(p)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        return ops.mean(ops.power(ops.abs(y_pred - y_true), self.p), axis=-1) / self.p

    def get_config(self):
        return {**super().get_config(), "p": self.p}
