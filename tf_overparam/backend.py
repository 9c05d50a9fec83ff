"""The backend-specific calls (TensorFlow / JAX) of the library, with `hessian.py`'s Hessian-vector
products. Keep it tiny."""

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


def replicas_in_sync():
    """How many replicas sum their gradients in the current `tf.distribute` strategy (1 outside
    one, and on other backends, whose Keras distribution averages no per-replica gradients)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    return 1


def once_per_step(compute):
    """The result of `compute()`, computed once for all replicas: under a `tf.distribute`
    strategy of several replicas in sync, called in replica context, one `merge_call` runs it
    in cross-replica context (where a mirrored variable reads as its primary copy) and hands
    its result to every replica; elsewhere (no strategy, other backends) it is `compute()`.

    For work that reads only mirrored variables, the same on every replica. The replicas wait
    at the call for one another (one synchronisation), and one computes while the others wait;
    across workers (`MultiWorkerMirroredStrategy`) each worker computes once for its own
    replicas. `compute` must not synchronise (assigning a variable in cross-replica context does
    not)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.merge_call(lambda strategy: compute())
    return compute()


def current_value(variable):
    """The variable's value as a NumPy array, also while a function is being traced (TF reads it
    outside the graph); None where it has no concrete value (a JAX tracer)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.init_scope():
            return keras.ops.convert_to_numpy(variable.value)
    value = variable.value
    return keras.ops.convert_to_numpy(value) if is_concrete(value) else None


def float64_available():
    """Whether the backend computes in float64: JAX only with `jax_enable_x64` (without it a cast
    to float64 gives float32 and a warning)."""
    if keras.backend.backend() == "jax":
        import jax
        import numpy as np

        return jax.dtypes.canonicalize_dtype(np.float64) == np.float64  # x64 on
    return True


def accurate_float32_eigh():
    """Whether the backend's float32 `eigh` holds the small eigenvalues of a Gram matrix well
    enough for eq. 24 at depths 2 and 3: TensorFlow's does; JAX's on CPU (LAPACK through
    jaxlib) loses several times more on ill-conditioned kernels, so JAX takes the float64 eigh
    where it can (tests/library/test_preconditioning.py checks the directions' accuracy)."""
    return keras.backend.backend() != "jax"


def widest_float():
    """ "float64" where the backend computes in it, else "float32" (JAX without x64)."""
    return "float64" if float64_available() else "float32"
