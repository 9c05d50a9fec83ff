"""Optimizer update rules of the full-batch engine, and the one seeding function.

The rules follow Keras' own (`SGD`, `Adagrad`, `Adadelta`, `Adam`) with Keras' default
hyper-parameters, so that a grid point of `experiments.engine.fullbatch` reproduces `model.fit`
(tested). They act on stacked tensors of any shape; `rate` broadcasts against them.
(Not `optimizers.py`: that name is the `EndToEnd` optimizer's.)
"""

from keras import ops

OPTIMIZERS = ("gd", "adagrad", "adadelta", "adam")
EPSILON = 1e-7  # Keras' default epsilon of Adagrad, Adadelta and Adam
ADAGRAD_INITIAL_ACCUMULATOR = 0.1
ADADELTA_RHO = 0.95
ADAM_BETA_1, ADAM_BETA_2 = 0.9, 0.999


def initial_slots(optimizer, value):
    """The optimizer's initial slot values for a variable holding `value` (a tuple of tensors)."""
    if optimizer == "gd":
        return ()
    if optimizer == "adagrad":
        # Keras rounds the initial accumulator to float32 also for a float64 variable.
        initial = ops.cast(ops.cast(ADAGRAD_INITIAL_ACCUMULATOR, "float32"), value.dtype)
        return (ops.zeros_like(value) + initial,)
    if optimizer in ("adadelta", "adam"):
        return (ops.zeros_like(value), ops.zeros_like(value))
    raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")


def apply_update(optimizer, value, gradient, slots, count, rate):
    """One update of `value` by `optimizer`'s rule (Keras' rule and defaults).

    Args:
        optimizer: one of `OPTIMIZERS`.
        value, gradient: tensors of the same shape.
        slots: the optimizer's slot values (`initial_slots` at the first step).
        count: the number of steps taken before this one (an integer scalar tensor).
        rate: the learning rate, a scalar or a tensor broadcasting against `value`.

    Returns:
        (new value, new slots).
    """
    if optimizer == "gd":
        return value - rate * gradient, slots
    if optimizer == "adagrad":
        (accumulator,) = slots
        accumulator = accumulator + ops.square(gradient)
        return value - rate * gradient / ops.sqrt(accumulator + EPSILON), (accumulator,)
    if optimizer == "adadelta":
        grad_sq, delta_sq = slots
        rho = ADADELTA_RHO
        grad_sq = rho * grad_sq + (1 - rho) * ops.square(gradient)
        delta = ops.sqrt(delta_sq + EPSILON) / ops.sqrt(grad_sq + EPSILON) * gradient
        return value - rate * delta, (grad_sq, rho * delta_sq + (1 - rho) * ops.square(delta))
    if optimizer == "adam":
        first, second = slots
        first = first + (gradient - first) * (1 - ADAM_BETA_1)
        second = second + (ops.square(gradient) - second) * (1 - ADAM_BETA_2)
        step = ops.cast(count + 1, value.dtype)
        beta_1, beta_2 = ops.cast(ADAM_BETA_1, value.dtype), ops.cast(ADAM_BETA_2, value.dtype)
        alpha = rate * ops.sqrt(1 - ops.power(beta_2, step)) / (1 - ops.power(beta_1, step))
        return value - alpha * first / (ops.sqrt(second) + EPSILON), (first, second)
    raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")
