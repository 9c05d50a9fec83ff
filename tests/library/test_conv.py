"""Tests for `tf_overparam.layers.OverparamConv2D` (tf_overparam/layers/conv.py).

Every forward pass is checked against `numpy_conv2d`, a NumPy convolution written here from
the definitions (loops over kernel taps, TensorFlow's 'same' padding rule), and every end-to-end
kernel against `numpy_compose`, the full 2-D convolution of kernels written as loops.
"""

import functools
import itertools
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from unittest import mock

import keras
import numpy as np
import pytest
from _backend import layer_gradients  # tests/ is on sys.path (rootdir-relative import)
from _reference import reference_direction  # tests/ is on sys.path (rootdir-relative import)

import tf_overparam as to
from tests._layer_testing import run_keras_layer_test
from tf_overparam.layers import OverparamConv2D, registry
from tf_overparam.layers import conv as conv_module

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# --- independent NumPy references ---------------------------------------------------------------


def _pair(value):
    return (value, value) if np.isscalar(value) else tuple(value)


def _output_size_and_padding(size, kernel, stride, dilation, padding):
    """(output size, pad before, pad after) along one axis, as TensorFlow defines them.

    'same': out = ceil(in / stride), pad_total = max((out - 1) stride + (k - 1) dilation + 1 - in, 0),
    pad_before = pad_total // 2 (the extra row goes after). 'valid': no padding,
    out = floor((in - (k - 1) dilation - 1) / stride) + 1.
    """
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + effective - size, 0)
        return out, total // 2, total - total // 2
    return (size - effective) // stride + 1, 0, 0


def numpy_conv2d(x, kernel, bias=None, strides=1, padding="valid", dilation_rate=1):
    """Cross-correlation (Keras' Conv2D) of channels_last x (B, H, W, cin) with (kh, kw, cin, cout),
    in float64: y[b, i, j] = sum_{a, c} x_pad[b, i s + a d, j s + c d] @ kernel[a, c] + bias."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilation_rate)
    kh, kw = kernel.shape[:2]
    oh, top, bottom = _output_size_and_padding(x.shape[1], kh, sh, dh, padding)
    ow, left, right = _output_size_and_padding(x.shape[2], kw, sw, dw, padding)
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    y = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
    for a in range(kh):
        for c in range(kw):
            patch = padded[:, a * dh : a * dh + (oh - 1) * sh + 1 : sh, c * dw : c * dw + (ow - 1) * sw + 1 : sw]
            y += np.einsum("bhwi,io->bhwo", patch, kernel[a, c])
    return y if bias is None else y + np.asarray(bias, np.float64)


def numpy_compose(first, second):
    """The kernel of `second` applied after `first` (stride 1, 'valid'): the full 2-D convolution
    K[a + a', c + c'] += first[a, c] @ second[a', c'], of size (k1 + k2 - 1)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    (h1, w1), (h2, w2) = first.shape[:2], second.shape[:2]
    out = np.zeros((h1 + h2 - 1, w1 + w2 - 1, first.shape[2], second.shape[3]))
    for a, c, a2, c2 in itertools.product(range(h1), range(w1), range(h2), range(w2)):
        out[a + a2, c + c2] += first[a, c] @ second[a2, c2]
    return out


def numpy_chain_kernel(factors):
    """The end-to-end kernel of a chain of 4-D factors (input side first)."""
    return functools.reduce(numpy_compose, [np.asarray(f, np.float64) for f in factors])


def test_numpy_reference_matches_a_hand_computed_same_convolution():
    # 1-D signal [1, 2, 3, 4] (as 1 x 4), kernel [1, 10] (1 x 2), 'same', stride 1: pad_total = 1,
    # pad_before = 0, so the zero goes after: [1 + 20, 2 + 30, 3 + 40, 4 + 0].
    x = np.array([1.0, 2, 3, 4]).reshape(1, 1, 4, 1)
    kernel = np.array([1.0, 10]).reshape(1, 2, 1, 1)
    np.testing.assert_array_equal(numpy_conv2d(x, kernel, padding="same").ravel(), [21, 32, 43, 4])
    # stride 2 'same' on [1, ..., 5] with kernel [1, 10, 100]: out = 3, pad_total = 2, one zero
    # each side, windows [0 1 2], [2 3 4], [4 5 0].
    x = np.arange(1.0, 6).reshape(1, 1, 5, 1)
    kernel = np.array([1.0, 10, 100]).reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(
        numpy_conv2d(x, kernel, strides=2, padding="same").ravel(), [0 + 10 + 200, 2 + 30 + 400, 4 + 50 + 0]
    )
    # dilation 2, 'valid': taps 2 apart, x[i] + 10 x[i + 2] + 100 x[i + 4] on 6 samples.
    x = np.arange(1.0, 7).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(numpy_conv2d(x, kernel, dilation_rate=2).ravel(), [1 + 30 + 500, 2 + 40 + 600])


def test_numpy_composition_is_the_convolution_of_the_chain():
    # Two 'valid' stride-1 convolutions equal one with the composed kernel (associativity of the
    # sums over taps), checked on random data with the reference above.
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(2, 3, 4, 3))
    x = rng.normal(size=(2, 7, 6, 2))
    np.testing.assert_allclose(
        numpy_conv2d(numpy_conv2d(x, first), second),
        numpy_conv2d(x, numpy_compose(first, second)),
        rtol=1e-12,
        atol=1e-12,
    )


# --- helpers ------------------------------------------------------------------------------------


def _numpy_kernel(layer):
    """The layer's end-to-end kernel from its factors, in float64 NumPy (independent of the layer)."""
    factors = [np.asarray(keras.ops.convert_to_numpy(f), np.float64) for f in layer.factors]
    if layer.kernel_sizes is None:
        return functools.reduce(np.matmul, factors).reshape(*layer.kernel_size, -1, layer.filters)
    return numpy_chain_kernel(factors)


def _numpy_layer(layer, x):
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    return numpy_conv2d(x, _numpy_kernel(layer), bias, layer.strides, layer.padding, layer.dilation_rate)


def _relative_error(actual, expected):
    actual, expected = keras.ops.convert_to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _random_layer(seed=0, **kwargs):
    kwargs.setdefault("factor_initializer", keras.initializers.RandomNormal(stddev=0.5, seed=seed))
    kwargs.setdefault("bias_initializer", keras.initializers.RandomNormal(seed=seed + 100))
    return OverparamConv2D(**kwargs)


# (strides, padding, dilation_rate): the Done-when grid; Conv2D refuses strides 2 with dilation 2.
CHANNEL_CASES = [(s, p, d) for s in (1, 2) for p in ("valid", "same") for d in (1, 2) if not (s == 2 and d == 2)]
SPATIAL_CASES = [(s, p, d) for s in (1, 2) for p in ("valid", "same") for d in (1, 2) if not (s == 2 and d == 2)]


def _both_orders(layer, x):
    """The layer's outputs with the chain applied to the inputs and with the folded kernel: the
    cost rule picks one; each is forced here in turn by replacing the rule's chooser."""
    outputs = []
    for pick in (lambda count, threshold, chain, fold: chain(), lambda count, threshold, chain, fold: fold()):
        with mock.patch.object(conv_module, "cheaper_order", pick):
            outputs.append(keras.ops.convert_to_numpy(layer(x)))
    return outputs


# --- forward pass and collapse ------------------------------------------------------------------


@pytest.mark.parametrize("strides, padding, dilation_rate", CHANNEL_CASES)
def test_channel_chain_is_the_reference_convolution_of_its_factor_product(float64, strides, padding, dilation_rate):
    rng = np.random.default_rng(strides + 3 * dilation_rate)
    x = rng.normal(size=(2, 11, 10, 3))
    for depth, hidden in [(2, None), (3, [5, 2]), (1, None)]:
        layer = _random_layer(
            filters=4,
            kernel_size=(3, 2),
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            depth=depth,
            hidden_filters=hidden,
            seed=depth,
        )
        layer.build(x.shape)
        widths = [3 * 2 * 3, *([4] * (depth - 1) if hidden is None else hidden), 4]
        assert [tuple(f.shape) for f in layer.factors] == list(zip(widths[:-1], widths[1:]))
        expected = _numpy_layer(layer, x)
        for out in (keras.ops.convert_to_numpy(layer(x)), *_both_orders(layer, x)):
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=str((depth, hidden)))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.kernel), _numpy_kernel(layer), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("strides, padding, dilation_rate", SPATIAL_CASES)
def test_spatial_chain_is_the_reference_convolution_of_its_composed_kernel(float64, strides, padding, dilation_rate):
    rng = np.random.default_rng(strides + 3 * dilation_rate)
    # Odd and even heights/widths, so 'same' pads unevenly and strides leave a remainder.
    for kernel_sizes, kernel_size, hidden, shape in [
        ((3, 3), (5, 5), None, (2, 13, 12, 3)),
        (((3, 2), (2, 4), 1), (4, 5), [5, 2], (2, 12, 11, 3)),
        ((2, 2), 3, 6, (1, 9, 10, 3)),
    ]:
        x = rng.normal(size=shape)
        layer = _random_layer(
            filters=4,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            kernel_sizes=kernel_sizes,
            hidden_filters=hidden,
        )
        layer.build(x.shape)
        expected = _numpy_layer(layer, x)
        for out in (keras.ops.convert_to_numpy(layer(x)), *_both_orders(layer, x)):
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=str(kernel_sizes))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.kernel), _numpy_kernel(layer), rtol=1e-12, atol=1e-14
        )


def _collapse_errors(layer, x, activation=lambda z: z):
    """max |difference| / max |output| of the layer against its folded Conv2D and against the
    NumPy reference (with `activation` applied), in float32, for both orders of the products."""
    folded = keras.ops.convert_to_numpy(layer.to_conv2d()(x))
    reference = activation(_numpy_layer(layer, x))
    return [(_relative_error(out, folded), _relative_error(out, reference)) for out in _both_orders(layer, x)]


@pytest.mark.parametrize("strides, padding, dilation_rate", CHANNEL_CASES)
def test_channel_chain_collapse_is_exact(strides, padding, dilation_rate):
    x = np.random.default_rng(1).normal(size=(3, 12, 11, 5)).astype("float32")
    layer = _random_layer(
        filters=6,
        kernel_size=3,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        depth=3,
        activation="tanh",
    )
    layer(x)
    folded = layer.to_conv2d()
    assert type(folded) is keras.layers.Conv2D
    assert folded.get_config()["activation"] == "tanh" and folded.strides == (strides, strides)
    assert folded.dilation_rate == (dilation_rate, dilation_rate) and folded.padding == padding
    for to_folded, to_reference in _collapse_errors(layer, x, np.tanh):
        assert to_folded <= 1e-5 and to_reference <= 1e-5


@pytest.mark.parametrize("strides, padding", [(s, p) for s in (1, 2) for p in ("valid", "same")])
def test_spatial_chain_collapse_is_exact(strides, padding):
    x = np.random.default_rng(2).normal(size=(3, 13, 12, 5)).astype("float32")
    layer = _random_layer(filters=6, kernel_size=5, strides=strides, padding=padding, kernel_sizes=(3, 1, 3))
    layer(x)
    assert type(layer.to_conv2d()) is keras.layers.Conv2D and layer.to_conv2d().kernel_size == (5, 5)
    for to_folded, to_reference in _collapse_errors(layer, x):
        assert to_folded <= 1e-5 and to_reference <= 1e-5


def test_unknown_batch_in_a_graph_gives_the_reference(float64):
    # In `predict` the batch is None while tracing, so the order is chosen at run time.
    x = np.random.default_rng(3).normal(size=(5, 9, 9, 2))
    for kwargs in [dict(kernel_size=3, padding="same", strides=2), dict(kernel_size=5, kernel_sizes=(3, 3), strides=2)]:
        layer = _random_layer(filters=3, **kwargs)
        model = keras.Sequential([keras.Input((9, 9, 2)), layer])
        np.testing.assert_allclose(
            model.predict(x, batch_size=2, verbose=0),
            _numpy_layer(layer, x),
            rtol=1e-12,
            atol=1e-12,
            err_msg=str(kwargs),
        )


def test_unknown_spatial_size_uses_the_folded_kernel(float64):
    x = np.random.default_rng(4).normal(size=(2, 10, 7, 2))
    layer = _random_layer(filters=3, kernel_size=4, kernel_sizes=(2, 3), padding="same", strides=2)
    model = keras.Sequential([keras.Input((None, None, 2)), layer])
    np.testing.assert_allclose(model.predict(x, verbose=0), _numpy_layer(layer, x), rtol=1e-12, atol=1e-12)


def test_spatial_chain_called_on_grids_of_other_sizes_pads_for_each(float64):
    # Strided 'same' padding depends on the size modulo the stride: 8 pads (1, 2), 9 pads (2, 2).
    layer = _random_layer(filters=3, kernel_size=5, kernel_sizes=(3, 3), padding="same", strides=2)
    layer.build((None, 8, 8, 2))
    for size in (8, 9, 11):
        x = np.random.default_rng(size).normal(size=(2, size, size + 1, 2))
        for out in _both_orders(layer, x):
            np.testing.assert_allclose(out, _numpy_layer(layer, x), rtol=1e-12, atol=1e-12, err_msg=str(size))


def test_spatial_identity_initializer_gives_centred_delta_kernels():
    layer = OverparamConv2D(
        3, 5, padding="same", kernel_sizes=(3, 1, 3), factor_initializer=to.initializers.Identity(gain=0.5)
    )
    x = np.random.default_rng(5).normal(size=(2, 6, 7, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(layer(x))
    # Three delta factors compose to 0.5^3 times the identity at the centre of the 5x5 kernel,
    # so with 'same' padding the layer is x -> 0.125 x (bias 0).
    expected_kernel = np.zeros((5, 5, 3, 3))
    expected_kernel[2, 2] = 0.125 * np.eye(3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), expected_kernel, atol=1e-7)
    np.testing.assert_allclose(out, 0.125 * x, rtol=1e-6, atol=1e-7)
    # Rectangular channels: the delta carries the rectangular identity.
    factor = keras.ops.convert_to_numpy(
        OverparamConv2D(2, 3, kernel_sizes=(3,), factor_initializer="identity").draw_chain([(3, 3, 4, 2)])[0]
    )
    expected = np.zeros((3, 3, 4, 2))
    expected[1, 1] = np.eye(4, 2)
    np.testing.assert_array_equal(factor, expected)


# --- the channel chain is the paper's matrix chain ----------------------------------------------


def test_channel_chain_factor_gradients_are_eq_14_of_the_kernel_matrix_gradient(float64):
    # The gradient of a loss through the layer w.r.t. each factor equals eq. 14 (chain_gradients)
    # applied to the gradient of the same loss w.r.t. the reshaped kernel of a plain Conv2D.
    rng = np.random.default_rng(6)
    x, target = rng.normal(size=(4, 8, 7, 3)), rng.normal(size=(4, 4, 4, 5))
    layer = _random_layer(filters=5, kernel_size=3, strides=2, padding="same", depth=3, hidden_filters=[4, 6])
    layer.build(x.shape)
    plain = layer.to_conv2d()
    factor_grads = layer_gradients(layer, lambda out: keras.ops.sum((out - target) ** 2), x)[: len(layer.factors)]
    kernel_grad = np.reshape(layer_gradients(plain, lambda out: keras.ops.sum((out - target) ** 2), x)[0], (-1, 5))
    factors = [f.numpy() for f in layer.factors]
    # eq. 14 in Keras layout, written out: dL/dF_j = (F_1..F_{j-1})^T G (F_{j+1}..F_N)^T.
    for j, grad in enumerate(factor_grads):
        before = functools.reduce(np.matmul, factors[:j], np.eye(27))
        after = functools.reduce(np.matmul, factors[j + 1 :], np.eye(factors[j].shape[1]))
        np.testing.assert_allclose(grad, before.T @ kernel_grad @ after.T, rtol=1e-10, atol=1e-12)


def test_end_to_end_direction_of_a_conv_kernel_is_the_reference_on_the_reshaped_matrix(float64):
    rng = np.random.default_rng(7)
    kernel, grad = rng.normal(size=(3, 3, 4, 6)), rng.normal(size=(3, 3, 4, 6))
    matrix, grad_matrix = kernel.reshape(36, 6), grad.reshape(36, 6)
    for depth in (2, 3, 5):
        direction = to.preconditioning.end_to_end_direction(
            registry.kernel_matrix(kernel), registry.kernel_matrix(grad), depth
        )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(direction),
            reference_direction(matrix, grad_matrix, depth),
            rtol=1e-9,
            atol=1e-10,
        )


# --- regularizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_sizes", [None, (2, 2)])
def test_kernel_regularizer_is_on_the_folded_kernel_and_factor_regularizer_on_each_factor(float64, kernel_sizes):
    layer = _random_layer(
        filters=3,
        kernel_size=3,
        kernel_sizes=kernel_sizes,
        kernel_regularizer=keras.regularizers.L2(0.125),
        factor_regularizer=keras.regularizers.L1(0.0625),
    )
    model = keras.Sequential([keras.Input((6, 6, 2)), layer])
    factors = [keras.ops.convert_to_numpy(f) for f in layer.factors]
    expected = sorted([0.125 * np.sum(_numpy_kernel(layer) ** 2)] + [0.0625 * np.sum(np.abs(f)) for f in factors])
    actual = sorted(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


# --- Keras' layer test harness, saving ----------------------------------------------------------


@pytest.mark.parametrize(
    "init_kwargs, input_shape, output_shape, trainable, losses",
    [
        # channel chain, stride 2 'same', an end-to-end penalty
        (
            dict(
                filters=4,
                kernel_size=3,
                strides=2,
                padding="same",
                depth=3,
                hidden_filters=5,
                activation="relu",
                kernel_regularizer="l2",
            ),
            (2, 8, 7, 3),
            (2, 4, 4, 4),
            4,
            1,
        ),
        # spatial chain, rectangular kernels, dilation 2, delta initialisation, factor penalties
        (
            dict(
                filters=4,
                kernel_size=(4, 3),
                kernel_sizes=((3, 2), (2, 2)),
                dilation_rate=2,
                use_bias=False,
                factor_initializer="identity",
                factor_regularizer="l2",
            ),
            (2, 9, 8, 3),
            (2, 3, 4, 4),
            2,
            2,
        ),
    ],
)
def test_keras_layer_harness(init_kwargs, input_shape, output_shape, trainable, losses):
    # config round trip, build, symbolic and eager call, one-step fit, mixed precision
    run_keras_layer_test(
        OverparamConv2D,
        init_kwargs,
        input_shape=input_shape,
        expected_output_shape=output_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=0,
        expected_num_losses=losses,
        supports_masking=False,
    )


@pytest.mark.parametrize(
    "kwargs", [dict(kernel_size=3, depth=3, padding="same"), dict(kernel_size=5, kernel_sizes=(3, 3), strides=2)]
)
def test_keras_save_and_load_keeps_config_weights_and_outputs(tmp_path, kwargs):
    layer = _random_layer(filters=4, factor_regularizer="l2", **kwargs)
    model = keras.Sequential([keras.Input((9, 9, 2)), layer, keras.layers.Flatten(), keras.layers.Dense(1)])
    x = np.random.default_rng(9).normal(size=(3, 9, 9, 2)).astype("float32")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    reloaded = loaded.layers[0]
    assert type(reloaded) is OverparamConv2D
    assert reloaded.get_config() == layer.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)


# --- bad arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(data_format="channels_first"), "data_format"),
        (dict(groups=2), "groups"),
        (dict(padding="causal"), "padding"),
        (dict(strides=2, dilation_rate=2), "dilation_rate"),
        (dict(filters=0), "filters"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(strides=0), "strides"),
        (dict(hidden_filters=[2, 2]), "hidden_filters"),
        (dict(depth=0), "depth"),
        (dict(kernel_sizes=(3, 2)), "kernel_sizes"),  # folds to 4, not kernel_size 3
        (dict(kernel_sizes=()), "kernel_sizes"),
        (dict(kernel_sizes=(2, 0)), "kernel_sizes"),
        (dict(kernel_sizes=(2, 2), depth=3), "depth"),
        (dict(kernel_sizes=(2, 2), factor_initializer="balanced"), "factor_initializer"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OverparamConv2D(**{"filters": 2, "kernel_size": 3, **kwargs})


def test_matrix_chain_statements_are_refused_for_the_spatial_chain():
    layer = OverparamConv2D(2, 3, kernel_sizes=(2, 2))
    layer.build((None, 5, 5, 2))
    with pytest.raises(ValueError, match="matrices"):
        to.diagnostics.balancedness(layer)
    with pytest.raises(ValueError, match="built"):
        _ = OverparamConv2D(2, 3).kernel


# --- whole models -------------------------------------------------------------------------------


def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((10, 9, 2)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu", bias_initializer="glorot_uniform", name="c1"),
            keras.layers.Conv2D(5, 3, strides=2, name="c2"),
            keras.layers.DepthwiseConv2D(2, name="depthwise"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc"),
        ]
    )


def test_overparameterize_preserving_function_then_collapse_keeps_outputs(float64):
    model = _small_cnn()
    x = np.random.default_rng(10).normal(size=(4, 10, 9, 2))
    expected = keras.ops.convert_to_numpy(model(x))
    with pytest.warns(UserWarning, match="depthwise"):
        twin = to.overparameterize(
            model, depth=3, preserve_function=True, seed=0, layers=(keras.layers.Dense, keras.layers.Conv2D)
        )
    assert [type(layer).__name__ for layer in twin.layers] == [
        "OverparamConv2D",
        "OverparamConv2D",
        "DepthwiseConv2D",
        "Flatten",
        "OverparamDense",
    ]
    assert [name for name, _, _ in twin.conversion_report.converted] == ["c1", "c2", "fc"]
    assert [name for name, _, _ in twin.conversion_report.left] == ["depthwise"]
    c2 = twin.layers[1]
    assert c2.strides == (2, 2) and [tuple(f.shape) for f in c2.factors] == [(36, 5), (5, 5), (5, 5)]
    assert to.diagnostics.balancedness(c2).relative < 1e-10
    np.testing.assert_allclose(keras.ops.convert_to_numpy(twin(x)), expected, rtol=1e-10, atol=1e-12)
    back = to.collapse(twin)
    assert [type(layer) for layer in back.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back(x)), expected, rtol=1e-10, atol=1e-12)


def test_overparameterize_into_spatial_chains_through_layer_kwargs(float64):
    model = _small_cnn()
    x = np.random.default_rng(11).normal(size=(4, 10, 9, 2))

    def spatial(layer):
        return {"kernel_sizes": (2, 2), "hidden_filters": 7} if isinstance(layer, keras.layers.Conv2D) else {}

    with pytest.raises(ValueError, match="preserve_function"):
        to.overparameterize(model, preserve_function=True, layers=(keras.layers.Conv2D,), layer_kwargs=spatial)
    with pytest.warns(UserWarning, match="depthwise"):
        twin = to.overparameterize(
            model,
            layers=(keras.layers.Conv2D,),
            layer_kwargs=spatial,
            factor_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=1),
        )
    c1, c2 = twin.layers[:2]
    assert c1.kernel_sizes == ((2, 2), (2, 2)) and [tuple(f.shape) for f in c2.factors] == [(2, 2, 4, 7), (2, 2, 7, 5)]
    # Not preserving: the convolutions are new chains, the rest (biases too) is copied.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(c2.bias), keras.ops.convert_to_numpy(model.layers[1].bias))
    twin.compile(keras.optimizers.SGD(0.01), loss="mse")
    twin.fit(x, np.zeros((4, 3)), epochs=2, verbose=0)
    expected = keras.ops.convert_to_numpy(twin(x))
    # The folded model is the trained chain: the first convolution against the NumPy reference too.
    back = to.collapse(twin)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back(x)), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back.layers[0].kernel), _numpy_kernel(c1), rtol=1e-12)


@pytest.mark.tf_only("the experiments stay on TensorFlow")
def test_mnist_experiment_expands_the_convolutions_on_request():
    from experiments import mnist_cnn

    config, _ = mnist_cnn.parse_args(["--quick", "--overparameterize", "dense,conv"])
    assert config.overparameterize == ("dense", "conv")
    assert mnist_cnn.parse_args(["--quick"])[0].overparameterize == ("dense",)
    with pytest.raises(SystemExit) as error:
        mnist_cnn.parse_args(["--overparameterize", "dense,conv1d"])
    assert error.value.code == 2
    plain = mnist_cnn.build_cnn(config)
    with_conv = mnist_cnn.build_twin(plain, config)
    dense_only = mnist_cnn.build_twin(plain, mnist_cnn.Config.quick())
    # Each 5x5 convolution's (25 cin, cout) matrix becomes (25 cin, cout) @ (cout, cout):
    # conv1 (25, 32) gains 32 * 32 parameters, conv2 (800, 64) gains 64 * 64.
    assert with_conv.count_params() - dense_only.count_params() == 32 * 32 + 64 * 64
    assert [type(layer).__name__ for layer in with_conv.layers if hasattr(layer, "factors")] == [
        "OverparamConv2D",
        "OverparamConv2D",
        "OverparamDense",
        "OverparamDense",
    ]


def test_layer_module_has_no_tensorflow_import():
    source = pathlib.Path(conv_module.__file__).read_text()
    assert not re.search(r"^\s*(import tensorflow|from tensorflow)", source, re.MULTILINE)


def test_both_forms_fold_exactly_and_train_on_the_jax_backend():
    pytest.importorskip("jax")
    script = textwrap.dedent(
        """
        import sys
        sys.path[:0] = [".", "tests", "tests/library"]
        import numpy as np, keras
        from test_conv import _numpy_layer, _random_layer
        assert keras.backend.backend() == "jax"
        x = np.random.default_rng(0).normal(size=(4, 11, 10, 3)).astype("float32")
        for kwargs in [dict(kernel_size=3, depth=3, strides=2, padding="same"),
                       dict(kernel_size=5, kernel_sizes=(3, 3), strides=2, padding="same")]:
            layer = _random_layer(filters=4, **kwargs)
            out = np.asarray(layer(x))
            scale = np.abs(out).max()
            assert np.abs(np.asarray(layer.to_conv2d()(x)) - out).max() <= 1e-5 * scale
            assert np.abs(_numpy_layer(layer, x) - out).max() <= 1e-5 * scale
            model = keras.Sequential([keras.Input((11, 10, 3)), _random_layer(filters=2, **kwargs)])
            model.compile(keras.optimizers.SGD(0.01), "mse")
            history = model.fit(x, np.zeros((4, 6, 5, 2)), epochs=3, verbose=0)
            assert history.history["loss"][-1] < history.history["loss"][0], history.history
        print("ok")
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
