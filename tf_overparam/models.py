"""Whole-model conversion: every `Dense` to an `OverparamDense` (`overparameterize`) and back
(`collapse`)."""

import keras
import numpy as np

from tf_overparam import initializers as chain_initializers
from tf_overparam.factorization import balanced_factors
from tf_overparam.layers import (
    OverparamDense,
    check_depth,
    dense_config,
    overparam_config,
    resolve_hidden_units,
)


def overparameterize(
    model, depth=2, hidden_units=None, preserve_function=False, factor_initializer="near_zero", seed=None
):
    """A copy of a Sequential or Functional model with every `Dense` made an `OverparamDense`.

    All other weights (convolutions, biases, ...) are copied. Each new chain is drawn from
    `factor_initializer`, or, with `preserve_function=True`, is a balanced factorisation of the
    old kernel, so that the new model computes exactly the same function (up to float
    rounding) and starts balanced.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        depth: int >= 1, the chain depth of every converted layer.
        hidden_units: None (each layer's `units`), an int, or a list of depth - 1 ints.
        preserve_function: bool; factor the existing kernels instead of drawing new ones.
        factor_initializer: chain initializer used when `preserve_function` is False.
        seed: int or None, seeds the hidden-space rotations of the balanced factorisation.

    Returns:
        A new, uncompiled `keras.Model`.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> deep = overparameterize(model, depth=2, preserve_function=True)
    >>> type(deep.layers[0]).__name__
    'OverparamDense'
    """
    depth = check_depth(depth)
    factor_initializer = chain_initializers.get(factor_initializer)

    def convert(layer):
        if type(layer) is keras.layers.Dense:
            resolve_hidden_units(hidden_units, depth, layer.units)
            return OverparamDense.from_config(
                overparam_config(layer.get_config(), depth, hidden_units, factor_initializer)
            )
        return layer.__class__.from_config(layer.get_config())

    def copy(old, new):
        if not isinstance(new, OverparamDense):
            new.set_weights(old.get_weights())
            return
        if preserve_function:
            widths = [int(f.shape[1]) for f in new.factors[:-1]]
            kernel = keras.ops.convert_to_numpy(old.kernel)
            if widths and min(widths) < np.linalg.matrix_rank(kernel):
                raise ValueError(
                    f"`hidden_units` {widths} of layer {old.name!r} are narrower than the rank "
                    f"{np.linalg.matrix_rank(kernel)} of its kernel, so `preserve_function=True` "
                    "cannot hold it; use wider hidden layers."
                )
            for variable, value in zip(new.factors, balanced_factors(kernel, widths, rotation_seed=seed)):
                variable.assign(value.astype(variable.dtype))
        if old.use_bias:
            new.bias.assign(keras.ops.copy(old.bias))  # a copy: JAX's fit donates (frees) the old buffer

    return _convert_model(model, convert, copy)


def collapse(model):
    """A copy of a model with every `OverparamDense` folded into a plain `Dense`.

    The `Dense` kernel is the end-to-end kernel, so the function is unchanged (up to float
    rounding) and the parameter count drops to that of the original architecture.

    Args:
        model: a built Sequential or Functional `keras.Model`.

    Returns:
        A new, uncompiled `keras.Model`.
    """

    def convert(layer):
        if isinstance(layer, OverparamDense):
            return keras.layers.Dense.from_config(dense_config(layer.get_config()))
        return layer.__class__.from_config(layer.get_config())

    def copy(old, new):
        if isinstance(old, OverparamDense):
            new.set_weights(old.to_dense().get_weights())
        else:
            new.set_weights(old.get_weights())

    return _convert_model(model, convert, copy)


def _convert_model(model, convert, copy):
    if not isinstance(model, keras.Model) or not (
        isinstance(model, keras.Sequential) or hasattr(model, "_nodes_by_depth")
    ):
        raise ValueError(
            f"`model` must be a Sequential or Functional keras.Model, got {type(model).__name__}; "
            "for a subclassed model, replace its Dense layers by OverparamDense directly."
        )
    if not model.built:
        raise ValueError("`model` must be built (call it on data or give it an Input) before conversion.")
    new_model = keras.models.clone_model(model, clone_function=convert, recursive=True)
    _copy_weights(model, new_model, copy)
    return new_model


def _copy_weights(old_model, new_model, copy):
    for old, new in zip(old_model.layers, new_model.layers):
        if isinstance(old, keras.Model) and not isinstance(old, OverparamDense):
            _copy_weights(old, new, copy)
        elif old.weights:
            copy(old, new)
