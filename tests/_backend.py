"""The tests' backend helpers: gradients on any Keras backend (tf.GradientTape, jax.grad,
torch.autograd), and the float64 tolerance of checks that pass through Keras' own ops.

The library needs no gradient helper: Keras' trainers take the gradients. The tests compare
gradients against hand derivations, so they take them here, once for every backend.
"""

import keras
import numpy as np

# Keras 3.15 computes some ops of float64 inputs (`mean`, `tanh`, `norm`, ...) in float32 on
# every backend but TensorFlow: its result_type maps 64-bit types to 32-bit ones there
# (keras-team/keras#23223). A float64 check whose value passes through such a Keras op (Keras'
# own losses and metrics, a tanh layer) holds only to float32 rounding on those backends: ten
# float32 roundings, relative. The library's own maths avoids those ops and stays float64.
KERAS_FLOAT32_RTOL = 10 * float(np.finfo(np.float32).eps)


def keras_float64_rtol(rtol):
    """`rtol` on TensorFlow; float32 rounding (`KERAS_FLOAT32_RTOL`) where Keras demotes float64."""
    return rtol if keras.backend.backend() == "tensorflow" else max(rtol, KERAS_FLOAT32_RTOL)


def assert_allclose_through_keras(actual, expected, rtol, atol=0.0, **kwargs):
    """`np.testing.assert_allclose` on TensorFlow; where Keras demotes float64, to float32
    rounding of the array's scale (rounding errors scale with the largest entries, not each one)."""
    if keras.backend.backend() != "tensorflow":
        rtol = max(rtol, KERAS_FLOAT32_RTOL)
        atol = max(atol, KERAS_FLOAT32_RTOL * float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, **kwargs)


def gradients(fn, *args):
    """The gradients of the scalar `fn(*args)` with respect to each of `args`, as NumPy arrays.

    `args` are arrays (NumPy or backend tensors); `fn` computes with `keras.ops`, or with a
    layer's `stateless_call` to differentiate through a layer's weights.
    """
    backend = keras.backend.backend()
    args = [keras.ops.convert_to_tensor(a) for a in args]
    if backend == "jax":
        import jax

        grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        grads = tape.gradient(value, args)
    elif backend == "torch":
        import torch

        args = [a.detach().requires_grad_(True) for a in args]
        grads = torch.autograd.grad(fn(*args), args)
    else:
        raise NotImplementedError(f"no gradients for the {backend!r} backend in the tests")
    return [np.asarray(keras.ops.convert_to_numpy(g)) for g in grads]


def layer_gradients(layer, loss_fn, inputs):
    """The gradients of `loss_fn(layer(inputs))` with respect to `layer.trainable_variables`."""

    def fn(*trainable):
        outputs, _ = layer.stateless_call(list(trainable), [v.value for v in layer.non_trainable_variables], inputs)
        return loss_fn(outputs)

    return gradients(fn, *[v.value for v in layer.trainable_variables])


def compiled(fn):
    """`fn` compiled as the backend compiles a train step (tf.function, jax.jit); torch: as is."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn
