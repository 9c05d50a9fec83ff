"""A^{1/2} and A^{-1/2} of symmetric positive definite matrices by matmuls alone: the coupled
Newton-Schulz iteration, started only where a Lanczos estimate of A's extreme eigenvalues
predicts that it converges within a given number of steps.

Depth 2 needs only these two roots of A = W^T W (eq. 10 of the paper at N = 2 is
G A^{1/2} + W A^{-1/2} W^T G), and a few b x b products cost less than an eigh where the eigh is
slow (TensorFlow's CPU eigh runs on one thread).

References:
    N. J. Higham, *Functions of Matrices: Theory and Computation*, SIAM 2008, chapter 6: the
    coupled Newton-Schulz iteration for the square root and the inverse square root, and its
    convergence for eigenvalues of the scaled matrix in (0, 3).
    G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed., Johns Hopkins 2013,
    section 10.1: the Lanczos tridiagonalisation, whose Ritz values lie inside the spectrum and
    approach its ends first.
    The inverse p-th roots of Shampoo (`matrix_inverse_pth_root` in google-research's
    scalable_shampoo) come from a coupled Newton iteration too, returned with their error;
    optax's `contrib.newton_schulz` (Muon) iterates on matmuls alone with its tuning values as
    arguments. Both shaped this module's interface.
"""

import numbers
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from tf_overparam.chain import check_positive_int

LANCZOS_STEPS = 16  # Lanczos steps for the extreme eigenvalue estimate
# At most this many predicted steps, else the iteration declines: beyond it the eigh is cheaper
# than the b x b products (three per step) at the kernel sizes where the iteration is used.
MAX_STEPS = 8
# Allowed past the prediction before giving up: the Frobenius test is stricter than the spectral
# one the prediction assumes, and the smallest Ritz value is an optimistic (upper) estimate.
SPARE_STEPS = 3


class SquareRoots(NamedTuple):
    """What `newton_schulz_square_roots` returns.

    Fields: `root` A^{1/2} and `inverse_root` A^{-1/2} (..., b, b), meaningful only where
    `converged`; `converged` a boolean scalar, true when every matrix of the batch converged;
    `steps` an int32 scalar, the steps taken (0 when the iteration declined to start);
    `residual` a scalar, the largest Frobenius norm of I - Z Y over the batch before the last
    step (inf when it declined).
    """

    root: object
    inverse_root: object
    converged: object
    steps: object
    residual: object


def _newton_schulz_map(x):
    """An eigenvalue x of X = Z Y after one step: x (3 - x)^2 / 4 (fixed point 1)."""
    return x * (3.0 - x) ** 2 / 4.0


def slowest_converging_ratio(steps, tolerance):
    """The smallest lambda_min / lambda_max that the iteration brings to within `tolerance` of
    convergence (1 - x <= tolerance for every eigenvalue x of Z Y) in `steps` steps: bisection on
    the scalar map x -> x (3 - x)^2 / 4, increasing on (0, 1)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        x = middle
        for _ in range(steps):
            x = _newton_schulz_map(x)
        low, high = (middle, high) if 1.0 - x > tolerance else (low, middle)
    return high


def _check_square(matrix):
    matrix = ops.convert_to_tensor(matrix)
    if len(matrix.shape) < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"`matrix` must be square, shaped (..., b, b), got {tuple(matrix.shape)}.")
    return matrix


def lanczos_extremes(matrix, steps=LANCZOS_STEPS):
    """(smallest, largest) Ritz values of the symmetric `matrix` (..., b, b) after `steps`
    Lanczos steps from the vector of ones, each shaped (..., 1, 1).

    Ritz values lie inside the spectrum: the smallest is at least lambda_min and the largest at
    most lambda_max, and both approach the ends of the spectrum first (Golub and Van Loan,
    section 10.1). No reorthogonalisation: lost orthogonality repeats Ritz values but keeps the
    extreme ones. A breakdown (an invariant subspace, e.g. A = c I) leaves zero vectors, hence
    Ritz values 0.

    Args:
        matrix: tensor (..., b, b), symmetric.
        steps: int >= 1, the Lanczos steps (the size of the tridiagonal matrix).
    """
    return _lanczos_extremes(_check_square(matrix), check_positive_int(steps, "steps"))


def _lanczos_extremes(matrix, steps):
    dtype = matrix.dtype
    tiny = float(np.finfo(keras.backend.standardize_dtype(dtype)).tiny)
    vector = ops.ones(ops.shape(matrix)[:-1] + (1,), dtype) / float(np.sqrt(matrix.shape[-1]))
    previous, beta = ops.zeros_like(vector), ops.zeros(ops.shape(matrix)[:-2] + (1, 1), dtype)
    alphas, betas = [], []
    for _ in range(steps):
        work = ops.matmul(matrix, vector) - beta * previous
        alpha = ops.sum(vector * work, axis=(-2, -1), keepdims=True)
        work = work - alpha * vector
        beta = ops.sqrt(ops.sum(ops.square(work), axis=(-2, -1), keepdims=True))
        alphas.append(alpha[..., 0])
        betas.append(beta[..., 0])
        previous, vector = vector, work / (beta + tiny)  # 0 / tiny = 0 at a breakdown
    alphas, betas = ops.concatenate(alphas, axis=-1), ops.concatenate(betas[:-1], axis=-1)
    off = ops.pad(betas, [[0, 0]] * (len(betas.shape) - 1) + [[0, 1]])
    eye = ops.eye(steps, dtype=dtype)
    upper = ops.eye(steps, k=1, dtype=dtype)
    tridiagonal = alphas[..., None, :] * eye + off[..., :, None] * upper + off[..., None, :] * ops.transpose(upper)
    # TensorFlow's eigh raises on NaN; a non-finite entry gives Ritz values 0 (a decline) instead.
    tridiagonal = ops.where(ops.isfinite(tridiagonal), tridiagonal, ops.zeros_like(tridiagonal))
    ritz = ops.eigh(tridiagonal)[0]
    return ritz[..., :1, None], ritz[..., -1:, None]


def _step(root, inverse_root, eye):
    """One step: (Y T, T Z, X) with X = Z Y and T = (3 I - X) / 2."""
    product = ops.matmul(inverse_root, root)
    half = 1.5 * eye - 0.5 * product
    return ops.matmul(root, half), ops.matmul(half, inverse_root), product


def newton_schulz_square_roots(
    matrix,
    max_steps=MAX_STEPS,
    spare_steps=SPARE_STEPS,
    tolerance=None,
    lanczos_steps=LANCZOS_STEPS,
    decline_below=None,
):
    """A^{1/2} and A^{-1/2} of the symmetric positive definite matrices `matrix` (..., b, b) by
    the coupled Newton-Schulz iteration, matmuls only (Higham 2008, chapter 6).

    With s the largest Ritz value of A (`lanczos_extremes`), Y_0 = A / s and Z_0 = I, each step
    takes X = Z_k Y_k, T = (3 I - X) / 2, Y_{k+1} = Y_k T and Z_{k+1} = T Z_k: three b x b
    products. Y_k -> (A/s)^{1/2} and Z_k -> (A/s)^{-1/2} for every eigenvalue of A/s in (0, 3).
    An eigenvalue x of X moves to x (3 - x)^2 / 4, so 1 - x = e becomes about 3 e^2 / 4 near 1,
    while a small one grows only 9/4-fold a step: the smallest Ritz value (an upper estimate of
    lambda_min) predicts the steps. Where that ratio is below `decline_below` (an ill-conditioned,
    singular, zero or non-finite A) the iteration does not start. It stops when the Frobenius
    norm of I - X, measured before a step, is at most `tolerance` (the step then leaves about
    tolerance^2), and gives up `spare_steps` past `max_steps` or on a non-finite residual.

    Args:
        matrix: tensor (..., b, b), symmetric; a stack of matrices of one shape is iterated
            together and converges only if every one does.
        max_steps: int >= 1, the most steps the prediction may ask for.
        spare_steps: int >= 0, the steps allowed past `max_steps`.
        tolerance: float, the Frobenius norm of I - Z Y at which to stop; None means the square
            root of the dtype's machine epsilon.
        lanczos_steps: int >= 1, the Lanczos steps of the estimate.
        decline_below: float in (0, 1), the smallest ratio of the extreme Ritz values at which
            the iteration starts; None means `slowest_converging_ratio(max_steps, tolerance)`.

    Returns:
        A `SquareRoots` (root, inverse_root, converged, steps, residual).
    """
    for name, value in [("tolerance", tolerance), ("decline_below", decline_below)]:
        if value is not None and (not isinstance(value, numbers.Real) or not 0 <= value < 1):
            raise ValueError(f"`{name}` must be None or a float in [0, 1), got {value!r}.")
    return square_roots(
        _check_square(matrix),
        check_positive_int(max_steps, "max_steps"),
        check_positive_int(spare_steps, "spare_steps", minimum=0),
        tolerance,
        check_positive_int(lanczos_steps, "lanczos_steps"),
        decline_below,
    )


def square_roots(
    matrix,
    max_steps=MAX_STEPS,
    spare_steps=SPARE_STEPS,
    tolerance=None,
    lanczos_steps=LANCZOS_STEPS,
    decline_below=None,
):
    """`newton_schulz_square_roots` without the argument checks, for callers that pass checked values."""
    iteration = start_iteration(matrix, max_steps, tolerance, lanczos_steps, decline_below)
    return finish_iteration(advance_iteration(iteration, max_steps + spare_steps, max_steps, spare_steps, tolerance))


class Iteration(NamedTuple):
    """The coupled Newton-Schulz iteration between two of its steps, so that it can run a few
    steps at a time (`start_iteration`, `advance_iteration`, `finish_iteration`; `square_roots`
    runs the three at once). Callers pass checked values.

    Fields: `root` Y_k and `inverse_root` Z_k (..., b, b), the iterates for A / scale; `scale`
    (..., 1, 1), the largest Ritz value of A (1 where it is not positive); `residual` a scalar,
    the largest Frobenius norm of I - Z Y over the batch before the last step (inf before the
    first, -inf when the iteration declined to start); `steps` an int32 scalar, the steps taken.
    """

    root: object
    inverse_root: object
    scale: object
    residual: object
    steps: object


def _tolerance(dtype, tolerance):
    return float(np.sqrt(np.finfo(dtype).eps)) if tolerance is None else float(tolerance)


def start_iteration(matrix, max_steps=MAX_STEPS, tolerance=None, lanczos_steps=LANCZOS_STEPS, decline_below=None):
    """The `Iteration` before its first step: Y_0 = A / s, Z_0 = I, s the largest Ritz value of
    `matrix` A, or a declined one (residual -inf) where the smallest Ritz value predicts more than
    `max_steps` steps (arguments as for `newton_schulz_square_roots`)."""
    dtype = keras.backend.standardize_dtype(matrix.dtype)
    tolerance = _tolerance(dtype, tolerance)
    if decline_below is None:
        decline_below = slowest_converging_ratio(max_steps, tolerance)
    # A non-finite A (or one whose Ritz values overflow) is zeroed first: Ritz values 0, a decline.
    finite = ops.all(ops.isfinite(matrix), axis=(-2, -1), keepdims=True)
    matrix = ops.where(finite, matrix, ops.zeros_like(matrix))
    smallest, scale = _lanczos_extremes(matrix, lanczos_steps)
    hopeful = ops.all(ops.logical_and(finite, smallest >= decline_below * scale))
    safe_scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    infinite = ops.convert_to_tensor(np.inf, dtype)
    return Iteration(
        matrix / safe_scale,
        ops.broadcast_to(ops.eye(matrix.shape[-1], dtype=dtype), ops.shape(matrix)),
        safe_scale,
        ops.where(hopeful, infinite, -infinite),  # -inf: no step starts
        ops.convert_to_tensor(0, "int32"),
    )


def advance_iteration(iteration, steps, max_steps=MAX_STEPS, spare_steps=SPARE_STEPS, tolerance=None):
    """`iteration` after at most `steps` more steps (an int, or an int32 scalar tensor): fewer
    where the residual before a step is at most `tolerance` or not finite, where the iteration
    declined, or where `max_steps + spare_steps` steps have been taken in all."""
    root, inverse_root, scale, residual, taken = iteration
    dtype = keras.backend.standardize_dtype(root.dtype)
    eye = ops.eye(root.shape[-1], dtype=dtype)
    tolerance = _tolerance(dtype, tolerance)
    stop = ops.minimum(taken + steps, max_steps + spare_steps)

    def step(k, root, inverse_root, residual):
        root, inverse_root, product = _step(root, inverse_root, eye)
        return k + 1, root, inverse_root, ops.sqrt(ops.max(ops.sum(ops.square(eye - product), axis=(-2, -1))))

    def going(k, root, inverse_root, residual):
        return ops.logical_and(residual > tolerance, k < stop)

    taken, root, inverse_root, residual = ops.while_loop(going, step, (taken, root, inverse_root, residual))
    return Iteration(root, inverse_root, scale, residual, taken)


def finish_iteration(iteration, tolerance=None):
    """The `SquareRoots` of `iteration` as it stands: converged where its last residual is at most
    `tolerance`."""
    root, inverse_root, scale, residual, steps = iteration
    tolerance = _tolerance(keras.backend.standardize_dtype(root.dtype), tolerance)
    infinite = ops.convert_to_tensor(np.inf, residual.dtype)
    hopeful = ops.not_equal(residual, -infinite)  # NaN (a diverged iteration) included
    root_scale = ops.sqrt(scale)
    converged = ops.logical_and(hopeful, residual <= tolerance)
    residual = ops.where(hopeful, residual, infinite)
    return SquareRoots(root * root_scale, inverse_root / root_scale, converged, steps, residual)
