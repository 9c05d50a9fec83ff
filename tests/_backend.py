"""Gradients for the tests on any Keras backend (tf.GradientTape, jax.grad, torch.autograd).

The library needs no such helper: Keras' trainers take the gradients. The tests compare
gradients against hand derivations, so they take them here, once for every backend.
"""

import keras
import numpy as np


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
