"""Curvature of a model's loss: Hessian-vector products with respect to the trainable variables,
and the largest eigenvalue of the Hessian by Lanczos iteration (`diagnostics.sharpness` is the
public entry point and validates its arguments).

The Hessian-vector product is the one backend-specific part: on TensorFlow a gradient tape
nested in another (reverse over reverse), on JAX `jax.jvp` of `jax.grad` (forward over reverse)
of the loss as a function of the trainable values, through `compute_loss_and_updates` or
`stateless_call`. Either way the product is compiled once (`tf.function`, `jax.jit`) and reads
the variables' current values at every call, so that a callback can reuse it while training.

Lanczos, not power iteration: power iteration finds the eigenvalue of largest magnitude, which
for a non-convex loss (a chain near a saddle) may be a negative one, and converges at the rate of
the gap between the two largest. Lanczos with full reorthogonalisation gives the largest
(algebraic) eigenvalue, and is exact after as many steps as there are parameters.
"""

import dataclasses
import inspect
import weakref

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class SharpnessEstimate:
    """The largest eigenvalue of the loss's Hessian and how it was found.

    Attributes:
        value: the largest Ritz value, a float (NaN where the Hessian is not finite).
        vector: its Ritz vector, unit norm over all variables, as float64 NumPy arrays shaped
            like `model.trainable_variables`.
        residual: ||H v - value v|| for that vector, measured by one more product (or, where
            not asked for, the Lanczos recurrence's |beta_m s_m|, exact only without rounding):
            some eigenvalue of H lies within it of `value`.
        iterations: the Lanczos steps taken (fewer than asked for when the Krylov space is
            exhausted: the value is then exact up to rounding).
    """

    value: float
    vector: list
    residual: float
    iterations: int


def _call_kwargs(model):
    """`training=False` where the model's `call` takes it: curvature of the inference-mode
    function (no dropout noise, batch statistics not updated)."""
    return {"training": False} if "training" in inspect.signature(model.call).parameters else {}


def _mean(value):
    """The mean of a loss's values (per-sample values from a plain loss function), a scalar as is.
    A sum over the count, not `ops.mean`, which Keras computes in float32 for float64 inputs on JAX."""
    if len(value.shape) == 0:
        return value
    return keras.ops.sum(value) / keras.ops.cast(keras.ops.size(value), value.dtype)


# The compiled products, per model (weakly: a product refers to its model only weakly, so
# that the cache keeps no model alive) and per loss, variables and compiled loss: a callback or
# a loop of `sharpness` calls then traces once, where each trace costs many products.
_PRODUCTS = weakref.WeakKeyDictionary()


def _tensorflow_product(model_ref, loss):
    import tensorflow as tf

    variables = model_ref().trainable_variables
    kwargs = _call_kwargs(model_ref())
    zero = tf.UnconnectedGradients.ZERO

    def objective(x, y):
        model = model_ref()
        y_pred = model(x, **kwargs)
        return model.compute_loss(x=x, y=y, y_pred=y_pred) if loss is None else _mean(loss(y, y_pred))

    @tf.function(reduce_retracing=True)
    def product(x, y, vector):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = objective(x, y)
            grads = inner.gradient(value, variables, unconnected_gradients=zero)
            directional = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype)) for g, v in zip(grads, vector)])
        return outer.gradient(directional, variables, unconnected_gradients=zero)

    return product


def _jax_product(model_ref, loss):
    import jax

    kwargs = _call_kwargs(model_ref())

    def objective(trainable, non_trainable, metrics, x, y):
        model = model_ref()
        if loss is None:
            value, _ = model.compute_loss_and_updates(trainable, non_trainable, metrics, x, y, None, training=False)
            return value
        y_pred, _ = model.stateless_call(trainable, non_trainable, x, **kwargs)
        return _mean(loss(y, y_pred))

    @jax.jit
    def jitted(trainable, non_trainable, metrics, x, y, vector):
        gradient = jax.grad(lambda t: objective(t, non_trainable, metrics, x, y))
        return jax.jvp(gradient, (trainable,), (vector,))[1]

    def product(x, y, vector):
        model = model_ref()
        values = [[v.value for v in group] for group in (model.trainable_variables, model.non_trainable_variables)]
        metrics = [v.value for v in model.metrics_variables]
        return jitted(values[0], values[1], metrics, x, y, list(vector))

    return product


def _loss_key(loss):
    """Equal for losses that compute the same function: a Keras `Loss` by its class and config
    (a new `LpLoss(4)` per call still finds the product), any other callable by identity."""
    if isinstance(loss, keras.losses.Loss):
        return type(loss), repr(loss.get_config())
    return loss


def _compiled_product(model, loss):
    builders = {"tensorflow": _tensorflow_product, "jax": _jax_product}
    backend = keras.backend.backend()
    if backend not in builders:
        raise NotImplementedError(f"Hessian-vector products are implemented for TensorFlow and JAX, not {backend!r}.")
    # The compiled loss by identity: recompiling with another loss needs another trace.
    key = (_loss_key(loss), id(getattr(model, "loss", None)), tuple(id(v) for v in model.trainable_variables))
    try:
        cache = _PRODUCTS.setdefault(model, {})
        return cache[key]
    except TypeError:  # an unhashable loss: no cache
        return builders[backend](weakref.ref(model), loss)
    except KeyError:
        cache[key] = builders[backend](weakref.ref(model), loss)
        return cache[key]


def hessian_vector_product(model, x, y, loss=None):
    """A function v -> H v, H the Hessian of the loss at the model's current trainable values.

    Args:
        model: a built Keras model.
        x, y: the batch (arrays or backend tensors; nested structures as `model.fit` takes).
        loss: None for the compiled objective (`model.compute_loss`: the compiled loss plus the
            regularisation losses, as `model.fit` minimises), else a callable
            `loss(y_true, y_pred)` returning a scalar or per-sample values (averaged).

    Returns:
        A function of a list of arrays shaped like `model.trainable_variables` returning H v as
        float64 NumPy arrays in the same layout.
    """
    product = _compiled_product(model, loss)
    x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
    y = keras.tree.map_structure(keras.ops.convert_to_tensor, y)
    dtypes = [keras.backend.standardize_dtype(v.dtype) for v in model.trainable_variables]

    def apply(vector):
        vector = [keras.ops.convert_to_tensor(np.asarray(v), dtype=d) for v, d in zip(vector, dtypes)]
        return [np.asarray(keras.ops.convert_to_numpy(h), dtype=np.float64) for h in product(x, y, vector)]

    return apply


def top_eigenpair(matvec, shapes, iterations, seed=0, measure_residual=False):
    """The largest eigenvalue of a symmetric operator on arrays of `shapes`, by Lanczos with
    full reorthogonalisation from a Gaussian start drawn with `seed`.

    `matvec(list of arrays) -> list of arrays`. At most `iterations` products, and no more than
    the dimension (the Krylov space is then the whole space); one more with `measure_residual`.
    Returns a `SharpnessEstimate`.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    dimension = sum(sizes)
    splits = np.cumsum(sizes)[:-1]

    def apply(flat):
        parts = [p.reshape(s) for p, s in zip(np.split(flat, splits), shapes)]
        return np.concatenate([np.ravel(h) for h in matvec(parts)])

    start = np.random.default_rng(seed).standard_normal(dimension)
    basis = [start / np.linalg.norm(start)]
    alphas, betas = [], []
    beta = 0.0
    for step in range(min(iterations, dimension)):
        w = apply(basis[step])
        if not np.all(np.isfinite(w)):
            return SharpnessEstimate(float("nan"), [np.full(s, np.nan) for s in shapes], float("nan"), step + 1)
        alphas.append(float(basis[step] @ w))
        q = np.array(basis)
        for _ in range(2):  # twice is enough to keep the basis orthogonal to rounding (Parlett)
            w = w - q.T @ (q @ w)
        beta = float(np.linalg.norm(w))
        scale = max(max(abs(a) for a in alphas), max(betas, default=0.0))
        if step + 1 == min(iterations, dimension) or beta <= 1e-12 * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    ritz = np.array(basis[: len(alphas)]).T @ vectors[:, -1]
    residual = abs(beta * float(vectors[-1, -1]))
    if measure_residual:
        residual = float(np.linalg.norm(apply(ritz) - values[-1] * ritz))
    parts = [p.reshape(s) for p, s in zip(np.split(ritz, splits), shapes)]
    return SharpnessEstimate(float(values[-1]), parts, residual, len(alphas))
