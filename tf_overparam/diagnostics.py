"""Diagnostics of a factor chain: balancedness, the end-to-end spectrum, the spectral norm and
the eq. 27 factor (the effective learning rate), and the sharpness (the largest eigenvalue of the
loss's Hessian). One home for each (docs/equations.md)."""

import dataclasses

import keras
import numpy as np
from keras import ops

from tf_overparam import backend, hessian
from tf_overparam.chain import chain_product
from tf_overparam.layers.base import OverparamLayer
from tf_overparam.validation import check_depth, check_positive_int


class NonFiniteError(ValueError):
    """The factors of a chain hold inf or NaN (training diverged)."""


@dataclasses.dataclass(frozen=True)
class Balancedness:
    """max_j ||F_{j+1} F_{j+1}^T - F_j^T F_j||_F, absolute and relative to the largest Gram norm.

    In the paper's layout this is max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F; 0 means the chain
    is balanced, the condition under which deep gradient descent follows eq. 24.
    """

    absolute: float
    relative: float


def chain_balancedness(factors):
    """Balancedness of a chain given as tensors (..., n_{j-1}, n_j); batch dims are kept.

    Returns:
        (absolute, relative) tensors of the batch shape; zero for a chain of one factor.
    """
    absolute = relative_scale = ops.zeros(ops.shape(factors[0])[:-2], dtype=factors[0].dtype)
    for inner, outer in zip(factors[:-1], factors[1:]):
        outer_gram = ops.matmul(outer, ops.swapaxes(outer, -1, -2))
        inner_gram = ops.matmul(ops.swapaxes(inner, -1, -2), inner)
        gap = ops.sqrt(ops.sum(ops.square(outer_gram - inner_gram), axis=(-2, -1)))
        scale = ops.maximum(
            ops.sqrt(ops.sum(ops.square(outer_gram), axis=(-2, -1))),
            ops.sqrt(ops.sum(ops.square(inner_gram), axis=(-2, -1))),
        )
        absolute = ops.maximum(absolute, gap)
        relative_scale = ops.maximum(relative_scale, scale)
    relative = ops.where(relative_scale > 0, absolute / ops.maximum(relative_scale, 1e-30), 0.0)
    return absolute, relative


def chain_factors(layer):
    """The factors of a overparameterized layer, or of a sequence of matrices, as float64 NumPy
    arrays; a `ValueError` for anything else, for non-matrix factors and for non-finite values."""
    if isinstance(layer, OverparamLayer):
        factors, what = list(layer.factors), f"layer {layer.name!r}"
    elif isinstance(layer, keras.layers.Layer):
        raise ValueError(
            f"`layer` must be a overparameterized layer (e.g. OverparamDense) or a list of factor "
            f"matrices; {layer.name!r} is a plain {type(layer).__name__} with no factor chain."
        )
    else:
        try:
            factors, what = list(layer), "the chain"
        except TypeError:
            raise ValueError(
                f"`layer` must be a overparameterized layer or a list of factor matrices, got {type(layer).__name__}."
            ) from None
    if not factors:
        raise ValueError("`layer` must hold at least one factor, got an empty chain.")
    arrays = [np.asarray(ops.convert_to_numpy(f), dtype=np.float64) for f in factors]
    shapes = [a.shape for a in arrays]
    if any(a.ndim != 2 for a in arrays):
        raise ValueError(
            f"The factors of {what} have shapes {shapes}: these diagnostics are defined for a chain "
            "of matrices (the channel chain), not for spatial kernels."
        )
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise NonFiniteError(f"The factors of {what} hold non-finite values (inf or NaN): training diverged.")
    return arrays


def balancedness(layer):
    """Balancedness of a overparameterized layer (or a list of factor arrays).

    Raises a `ValueError` for a layer without a factor chain (a plain `Dense`, say) and for
    non-finite factors.

    Example:

    >>> from tf_overparam import OverparamDense, initializers
    >>> layer = OverparamDense(1, depth=3, factor_initializer=initializers.Balanced(seed=0))
    >>> layer.build((None, 4))
    >>> balancedness(layer).relative < 1e-5
    True
    """
    factors = [ops.convert_to_tensor(f, dtype=backend.widest_float()) for f in chain_factors(layer)]
    absolute, relative = chain_balancedness(factors)
    return Balancedness(float(absolute), float(relative))


def end_to_end_singular_values(layer):
    """Singular values of the end-to-end kernel (as a matrix), descending, float64 NumPy."""
    kernel = chain_product(chain_factors(layer))
    return np.linalg.svd(np.asarray(ops.convert_to_numpy(kernel), dtype=np.float64), compute_uv=False)


def spectral_norm(kernel):
    """Largest singular value of a kernel viewed as a matrix (prod(shape[:-1]), shape[-1]).

    Taken from the largest eigenvalue of the smaller Gram matrix in float64: accurate for the
    largest singular value, and much cheaper than an SVD of a 3136 x 512 kernel.
    """
    kernel = np.asarray(ops.convert_to_numpy(kernel), dtype=np.float64)
    kernel = kernel.reshape(-1, kernel.shape[-1])
    if not np.all(np.isfinite(kernel)):
        raise ValueError("`kernel` holds non-finite values (inf or NaN).")
    gram = kernel.T @ kernel if kernel.shape[0] >= kernel.shape[1] else kernel @ kernel.T
    return float(np.sqrt(max(np.linalg.eigvalsh(gram)[-1], 0.0)))


def effective_learning_rate(learning_rate, spectral_norm, depth):
    """`learning_rate * ||W_e||_2 ** (2 - 2 / depth)` (eq. 27's factor).

    The factor by which a depth-N balanced chain scales the step of the end-to-end matrix
    along W_e itself: for one output the update is eta ||w||^{2-2/N} (g + (N-1) <g, w> w /
    ||w||^2); for several outputs ||W_e||_2^{2-2/N} is the preconditioner's eigenvalue / N on
    the top singular direction (eq. 26). Depth 1 gives `learning_rate`. It describes plain
    gradient descent; momentum and adaptive optimizers rescale steps further. Arrays
    broadcast (NumPy); scalars give a float.
    """
    depth = check_depth(depth)
    value = np.asarray(learning_rate, dtype=np.float64) * np.asarray(spectral_norm, dtype=np.float64) ** (
        2.0 - 2.0 / depth
    )
    return float(value) if value.ndim == 0 else value


def _sharpness_loss(model, loss):
    """The loss `sharpness` differentiates: None (the compiled objective) or a callable."""
    if loss is None:
        if getattr(model, "loss", None) is None:
            raise ValueError(
                "`loss` is None, which means the model's compiled loss, but the model was not compiled "
                "with one: compile it with a loss or pass `loss`."
            )
        return None
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ValueError(f"`loss` must be a Keras loss name or a callable, got unknown name {loss!r}.") from None
    if not callable(loss):
        raise ValueError(f"`loss` must be None, a Keras loss name or a callable, got {type(loss).__name__}.")
    return loss


def sharpness(model, x, y, loss=None, iterations=20, seed=0, return_details=False):
    """The largest eigenvalue of the Hessian of the loss on the batch (x, y) with respect to
    the model's trainable variables (all of them, as one vector).

    For full-batch gradient descent with rate eta, `eta * sharpness` is the quantity that
    crosses 2 where the iteration leaves the region it can stay in: on a quadratic GD diverges
    exactly when it exceeds 2, and on a deep model it rises while training until it meets 2
    ("edge of stability", Cohen et al., ICLR 2021). Momentum and adaptive optimizers move that
    threshold (heavy ball: 2 + 2 beta).

    Found by Lanczos on Hessian-vector products (`tf_overparam.hessian`; on TensorFlow and
    JAX): the largest algebraic eigenvalue, not the largest in magnitude (a negative curvature
    near a saddle is not reported). Each iteration costs about two gradient evaluations; once
    `iterations` reaches the number of parameters the value is exact up to rounding. The
    model is called with `training=False` (no dropout noise, no batch-statistic updates).

    Args:
        model: a built `keras.Model`.
        x, y: the batch, as `model.fit` takes it.
        loss: None for the compiled objective (the compiled loss plus the regularisation
            losses, the function `model.fit` minimises); else a Keras loss name or a callable
            `loss(y_true, y_pred)` returning a scalar or per-sample values (averaged); no
            regularisation losses are added then.
        iterations: positive int, the most Hessian-vector products (Lanczos steps).
        seed: int >= 0, the seed of the Gaussian start vector.
        return_details: bool; if True, return the `tf_overparam.hessian.SharpnessEstimate`
            (value, Ritz vector, measured residual ||H v - value v||, Lanczos steps) instead of
            the float; the residual costs one more Hessian-vector product.

    Returns:
        The largest eigenvalue as a float (NaN where the Hessian is not finite, e.g. after a
        divergence), or a `SharpnessEstimate` if `return_details`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.compile(loss="mse")
    >>> x = np.eye(3) * [[1.0], [2.0], [3.0]]  # the Hessian is (2/3) diag(1, 4, 9)
    >>> round(sharpness(model, x, np.zeros((3, 1))), 4)
    6.0
    """
    loss, iterations, seed = sharpness_arguments(model, x, y, loss, iterations, seed)
    product = hessian.hessian_vector_product(model, x, y, loss)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    estimate = hessian.top_eigenpair(product, shapes, iterations, seed, measure_residual=return_details)
    return estimate if return_details else estimate.value


def sharpness_arguments(model, x, y, loss, iterations, seed):
    """The checks of `sharpness`'s arguments (also `callbacks.SharpnessLogger`'s): returns
    (loss callable or None, iterations, seed), or raises a `ValueError` naming the argument."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not model.trainable_variables:
        raise ValueError(f"`model` {model.name!r} has no trainable variables (build it, e.g. call it on `x`, first).")
    loss = _sharpness_loss(model, loss)
    iterations = check_positive_int(iterations, "iterations")
    seed = check_positive_int(seed, "seed", minimum=0)
    for name, value in (("x", x), ("y", y)):
        if value is None or any(len(np.shape(leaf)) == 0 for leaf in keras.tree.flatten(value)):
            raise ValueError(f"`{name}` must be a batch of arrays with a leading batch axis, got {value!r}.")
    batch_sizes = {int(np.shape(leaf)[0]) for leaf in keras.tree.flatten(x) + keras.tree.flatten(y)}
    if len(batch_sizes) != 1:
        raise ValueError(f"`x` and `y` must hold the same number of samples, got sizes {sorted(batch_sizes)}.")
    return loss, iterations, seed
