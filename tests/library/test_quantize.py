"""`keras.Model.quantize` on a model with chained layers: one warning that says to collapse first;
the collapsed model quantizes like any Keras model."""

import warnings

import keras
import numpy as np

import tf_overparam as to
from tf_overparam.layers import base


def _model():
    init = keras.initializers.RandomNormal(stddev=0.5, seed=1)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, kernel_initializer=init),
            to.OverparamDense(3, factor_initializer=init),
            to.OverparamDense(2, depth=3, factor_initializer=init),
        ]
    )


def _chain_warnings(caught):
    return [w for w in caught if "Overparameterized layers" in str(w.message)]


def test_quantize_warns_once_to_collapse_first_and_leaves_the_chains_in_float():
    model = _model()
    factors = [keras.ops.convert_to_numpy(f) for layer in model.layers[1:] for f in layer.factors]
    base._quantize_warned = False  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("int8")
        _model().quantize("int8")
    found = _chain_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in caught]  # two chained layers, two models: one warning
    assert "tf_overparam.collapse(model)" in str(found[0].message)
    assert keras.backend.standardize_dtype(model.layers[0].kernel.dtype) == "int8"  # the Dense was quantized
    for before, factor in zip(factors, (f for layer in model.layers[1:] for f in layer.factors)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(factor), before)


def test_the_collapsed_model_quantizes_and_stays_close_to_the_float_function():
    model = _model()
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    collapsed = to.collapse(model)
    base._quantize_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collapsed.quantize("int8")
    assert not _chain_warnings(caught)
    assert all(keras.backend.standardize_dtype(layer.kernel.dtype) == "int8" for layer in collapsed.layers)
    # Per-channel int8 weights (and int8 activations) hold about 2 decimal digits.
    outputs = collapsed.predict(x, verbose=0)
    assert np.max(np.abs(outputs - expected)) <= 0.05 * np.max(np.abs(expected))
    assert np.max(np.abs(outputs - expected)) > 0  # it is quantized, not the float model
