"""Tests for `tf_overparam.layers.OverparamConv2D` (tf_overparam/layers/conv.py).

Every forward pass is checked against `numpy_conv2d`, a NumPy convolution written here from
the definitions (loops over kernel taps, TensorFlow's 'same' padding rule), and every end-to-end
kernel against `numpy_compose`, the full 2-D convolution of kernels written as loops.
"""

import functools
import itertools
import math

import keras
import numpy as np
import pytest

from tf_overparam.layers import OverparamConv2D

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
            patch = padded[:, a * dh: a * dh + (oh - 1) * sh + 1: sh, c * dw: c * dw + (ow - 1) * sw + 1: sw]
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
    np.testing.assert_array_equal(numpy_conv2d(x, kernel, strides=2, padding="same").ravel(),
                                  [0 + 10 + 200, 2 + 30 + 400, 4 + 50 + 0])
    # dilation 2, 'valid': taps 2 apart, x[i] + 10 x[i + 2] + 100 x[i + 4] on 6 samples.
    x = np.arange(1.0, 7).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(numpy_conv2d(x, kernel, dilation_rate=2).ravel(),
                                  [1 + 30 + 500, 2 + 40 + 600])


def test_numpy_composition_is_the_convolution_of_the_chain():
    # Two 'valid' stride-1 convolutions equal one with the composed kernel (associativity of the
    # sums over taps), checked on random data with the reference above.
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(2, 3, 4, 3))
    x = rng.normal(size=(2, 7, 6, 2))
    np.testing.assert_allclose(numpy_conv2d(numpy_conv2d(x, first), second),
                               numpy_conv2d(x, numpy_compose(first, second)), rtol=1e-12, atol=1e-12)


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
    cost rule picks one; the other is forced here through the threshold it compares against."""
    outputs = []
    for threshold in (math.inf, 0):
        if layer.kernel_sizes is None:
            layer._threshold = threshold
        else:
            layer._spatial_plan = (layer._spatial_plan[0], threshold)
        outputs.append(keras.ops.convert_to_numpy(layer(x)))
    return outputs


# --- forward pass and collapse ------------------------------------------------------------------


@pytest.mark.parametrize("strides, padding, dilation_rate", CHANNEL_CASES)
def test_channel_chain_is_the_reference_convolution_of_its_factor_product(float64, strides, padding, dilation_rate):
    rng = np.random.default_rng(strides + 3 * dilation_rate)
    x = rng.normal(size=(2, 11, 10, 3))
    for depth, hidden in [(2, None), (3, [5, 2]), (1, None)]:
        layer = _random_layer(filters=4, kernel_size=(3, 2), strides=strides, padding=padding,
                              dilation_rate=dilation_rate, depth=depth, hidden_filters=hidden, seed=depth)
        layer.build(x.shape)
        widths = [3 * 2 * 3, *([4] * (depth - 1) if hidden is None else hidden), 4]
        assert [tuple(f.shape) for f in layer.factors] == list(zip(widths[:-1], widths[1:]))
        expected = _numpy_layer(layer, x)
        for out in (keras.ops.convert_to_numpy(layer(x)), *_both_orders(layer, x)):
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=str((depth, hidden)))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), _numpy_kernel(layer), rtol=1e-12, atol=1e-14)


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
        layer = _random_layer(filters=4, kernel_size=kernel_size, strides=strides, padding=padding,
                              dilation_rate=dilation_rate, kernel_sizes=kernel_sizes, hidden_filters=hidden)
        layer.build(x.shape)
        expected = _numpy_layer(layer, x)
        for out in (keras.ops.convert_to_numpy(layer(x)), *_both_orders(layer, x)):
            np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12, err_msg=str(kernel_sizes))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), _numpy_kernel(layer), rtol=1e-12, atol=1e-14)


def _collapse_errors(layer, x):
    """max |difference| / max |output| of the layer against its folded Conv2D and against the
    NumPy reference, in float32, the cost rule picking the order."""
    out = keras.ops.convert_to_numpy(layer(x))
    folded = layer.to_conv2d()
    assert type(folded) is keras.layers.Conv2D
    return _relative_error(folded(x), out), _relative_error(out, _numpy_layer(layer, x))


@pytest.mark.parametrize("strides, padding, dilation_rate", CHANNEL_CASES)
def test_channel_chain_collapse_is_exact(strides, padding, dilation_rate):
    x = np.random.default_rng(1).normal(size=(3, 12, 11, 5)).astype("float32")
    layer = _random_layer(filters=6, kernel_size=3, strides=strides, padding=padding, dilation_rate=dilation_rate,
                          depth=3, activation="tanh")
    # tanh is applied to both; the reference applies it to the pre-activation.
    out = keras.ops.convert_to_numpy(layer(x))
    folded = layer.to_conv2d()
    assert folded.get_config()["activation"] == "tanh" and folded.strides == (strides, strides)
    assert _relative_error(folded(x), out) <= 1e-5
    assert _relative_error(out, np.tanh(_numpy_layer(layer, x))) <= 1e-5


@pytest.mark.parametrize("strides, padding", [(s, p) for s in (1, 2) for p in ("valid", "same")])
def test_spatial_chain_collapse_is_exact(strides, padding):
    x = np.random.default_rng(2).normal(size=(3, 13, 12, 5)).astype("float32")
    layer = _random_layer(filters=6, kernel_size=5, strides=strides, padding=padding, kernel_sizes=(3, 1, 3))
    to_folded, to_reference = _collapse_errors(layer, x)
    assert to_folded <= 1e-5 and to_reference <= 1e-5
