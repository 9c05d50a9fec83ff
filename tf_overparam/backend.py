"""The only place with backend-specific calls (TensorFlow / JAX). Keep it tiny."""

import keras


def is_concrete(value):
    """Whether `value` holds actual numbers, i.e. it was computed eagerly and not traced inside
    a graph (TF `tf.function`, JAX `jit`/`eval_shape`), so it may be kept for later use."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(value, jax.core.Tracer)
    return True
