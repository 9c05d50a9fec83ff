"""Tests for `tf_overparam.layers.OverparamConv2D` (tf_overparam/layers/conv.py).

Every forward pass is checked against `numpy_conv2d`, a NumPy convolution written here from
the definitions (loops over kernel taps, TensorFlow's 'same' padding rule), and every end-to-end
kernel against `numpy_compose`, the full 2-D convolution of kernels written as loops.
"""

import functools
import itertools

import numpy as np

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
