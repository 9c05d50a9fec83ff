"""The arithmetic of 2-D convolutions that `OverparamConv2D` needs: argument pairs, output
sizes, TensorFlow's 'same' padding, and the kernel of two convolutions in a row."""

from keras import ops

from tf_overparam.validation import check_positive_int

__all__ = ["compose_kernels", "conv_output_size", "int_pair", "same_padding"]


def int_pair(value, name):
    """A pair of positive ints from an int or a sequence of two, or a `ValueError` naming `name`."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be a positive int or a pair of them, got {value!r}.")
        return tuple(check_positive_int(v, name) for v in value)
    try:
        value = check_positive_int(value, name)
    except ValueError:
        raise ValueError(f"`{name}` must be a positive int or a pair of them, got {value!r}.") from None
    return (value, value)


def conv_output_size(size, kernel, stride, dilation, padding):
    """Output length along one axis of a convolution (Keras/TF rule); `size` may be a tensor."""
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return (size - (kernel - 1) * dilation - 1) // stride + 1


def same_padding(size, kernel, stride, dilation):
    """(before, after) zero padding of TF's 'same' along one axis of known `size`:
    total = max((ceil(size / stride) - 1) stride + (kernel - 1) dilation + 1 - size, 0),
    before = total // 2, the odd one after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def compose_kernels(first, second):
    """The kernel of convolving with `first` then with `second` (stride 1, 'valid'), for
    channels_last kernels (h1, w1, c0, c1) and (h2, w2, c1, c2): the full 2-D convolution
    K[a + a', b + b'] = sum F1[a, b] @ F2[a', b'], of shape (h1 + h2 - 1, w1 + w2 - 1, c0, c2).

    Computed as one convolution: `first` as a batch of c0 images (h1, w1) with c1 channels,
    zero-padded by (h2 - 1, w2 - 1) on each side, cross-correlated with `second` flipped.
    """
    h2, w2 = second.shape[0], second.shape[1]
    images = ops.pad(ops.transpose(first, (2, 0, 1, 3)), ((0, 0), (h2 - 1, h2 - 1), (w2 - 1, w2 - 1), (0, 0)))
    composed = ops.conv(images, ops.flip(second, axis=(0, 1)), padding="valid")
    return ops.transpose(composed, (1, 2, 0, 3))
