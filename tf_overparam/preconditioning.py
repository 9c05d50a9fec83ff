"""The end-to-end update rule (eq. 24 of docs/equations.md, eq. 10 of the paper) and its
preconditioner (eq. 26), in `keras.ops`.

Gradient descent with step eta on a balanced depth-N chain moves the end-to-end matrix W as

    W <- (1 - eta lambda N) W - eta sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N},

G = dL_1/dW. The sum is `end_to_end_direction(W, G, N)` = P(W) G, with P(W) the preconditioner
of eq. 26. It is invariant under transposition, direction(W^T, G^T) = direction(W, G)^T, so
Keras' (inputs, units) kernels are used as they are. All functions take leading batch
dimensions and trace inside compiled functions.

How it is computed. P(W) is built once (`compute_preconditioner`) and applied to G
(`apply_preconditioner`). Orient W so that it has at least as many rows as columns (a >= b,
transposing otherwise) and take the eigendecomposition of the small Gram matrix
W^T W = V diag(lambda) V^T (b x b) instead of an SVD of W. With B = W V (whose columns are
s_r u_r, so U is never formed and W's left null space needs no basis):

    P(W) G = G V diag(t) V^T + B (M o (B^T G V)) V^T,
    t_r = lambda_r^{(N-1)/N},   M = sum_{j=2..N} m_j c_j^T,
    m_{j,r} = lambda_r^{(j-1)/N - 1},   c_{j,r} = lambda_r^{(N-j)/N},

where the j = 1 term G [W^T W]^{(N-1)/N} is the first part (it is the one reaching W's left
null space, [W W^T]^0 = I there) and the j >= 2 terms, U S^{2(j-1)/N} U^T G V S^{2(N-j)/N} V^T
with U = B S^{-1}, the second. On the null space of W^T W, 0^0 = 1 (the j = N term keeps
G's component there) and m_j is 0 at zero eigenvalues. M is kept as its N - 1 rank-one terms
(`cross_weights`, (N - 1, 2, b)). At depth 2 it is m 1^T, and since V V^T = I the second part
is B diag(m) B^T G: the direction costs three matmuls of G's size (B^T G, B (...), G R) and one
b x b (R = V diag(t) V^T). At depth >= 3 it costs four of G's size (G V, B^T (G V), B (...),
(...) V^T), or three and three b x b ones when W is more than `DIRECT_FORM_ASPECT` times taller
than wide. Building P costs one Gram matmul, one b x b eigh and B = W V.
`end_to_end_direction` of a kernel more than 2.5 times taller than wide skips B: G Q1 + W Q2
with b x b matrices Q1 = V diag(t) V^T and Q2 (at depth 2, V diag(m) V^T (W^T G)). A kernel with
one column (or one row) takes the closed form of eq. 27 instead: lambda is ||w||^2, V = 1, and
the formula reads ||w||^{2-2/N} (g + (N-1) <g, w>/||w||^2 w).

Depth 2 without the eigh. At N = 2 the direction is G A^{1/2} + W A^{-1/2} (W^T G) with
A = W^T W ([W W^T]^{1/2} = W A^{-1/2} W^T): only the two square roots of A are needed, and a
coupled Newton-Schulz iteration gives both with matmuls alone (`_square_roots`). It converges
fast only when A is well conditioned, so a 16-step Lanczos estimate of A's extreme eigenvalues
(`_lanczos_extremes`) predicts the steps first, and beyond `NEWTON_SCHULZ_MAX_STEPS` (or on a
kernel the iteration does not settle) the eigendecomposition above is used. This matters because
TensorFlow's CPU eigh is single-threaded: for a 512 x 512 Gram matrix it costs about 5.6 matmuls
of a 3136 x 512 `W^T G` on 2 cores, so no arrangement of the products around it brings the exact
direction under about 10 such matmuls (benchmarks/run.py, `floor_direction`), while a converging
iteration (6 steps of three 512 x 512 matmuls for a Gaussian kernel) costs about 7.5. Kernels
with fewer than `NEWTON_SCHULZ_MIN_COLUMNS` columns keep the eigh, which is cheap there.

Precision, chosen by measurement (benchmarks/run.py and tests/test_preconditioning.py): float64
kernels are computed in float64 (1e-12 of the NumPy reference). A float32 kernel forms its Gram
matrix in float32; the Gram squares the condition number, and the eigenvalues it loses are the
small ones, whose fractional powers weigh most at large depth. At depths 2 and 3 the eigh runs in
float32; from depth 4 on in float64, which costs one float64 eigh of the b x b Gram only.
Measured on a 3136 x 512 kernel of condition number 1e3 against a float64 SVD evaluation, relative
Frobenius error: 3.3e-5, 4.0e-5 (depths 2, 3; float32 eigh), 2.1e-5, 8.7e-5 (depths 4, 8; float64
eigh, where a float32 eigh measured 8.4e-5 and 2.5e-4, too close to issue 10's 1e-4 at depth 4).
float16/bfloat16 kernels are computed in float32. On JAX the float32 eigh is less accurate
(`backend.accurate_float32_eigh`), so a float32 kernel's Gram is eigendecomposed in float64 at
every depth, which needs `jax.config.update("jax_enable_x64", True)`; without it JAX computes
in float32 only, and the same kernels measured 1.2e-4, 2.3e-4, 5.6e-4, 2.3e-3 at depths 2, 3, 4, 8
(against 4e-5 to 1.6e-4 with it).

Amortised use (Shampoo-style): keep the `Preconditioner` of a kernel W_r for k steps and apply it
to each new gradient, D_t = P(W_r) G_t; a step in between costs the matmuls with G only.
`tf_overparam.optimizers.EndToEnd(refresh_every=k)` does that.
"""

import collections

import keras
import numpy as np
from keras import ops

from tf_overparam import backend
from tf_overparam.chain import check_depth

Preconditioner = collections.namedtuple(
    "Preconditioner", ["projected_kernel", "basis", "direct_weights", "cross_weights"]
)
Preconditioner.__doc__ = """P(W) of eq. 26 in factored form, for W oriented tall (a >= b; W^T when wider than tall).

Fields (leading batch dimensions allowed): `projected_kernel` B = W V (a, b); `basis` V (b, b), the
eigenvectors of W^T W; `direct_weights` t (1, b); `cross_weights` (N - 1, 2, b), the pairs
(m_j, c_j) whose outer products sum to M (see the module docstring; N - 1 = 1 marks depth 2). t is NaN where the kernel held inf or NaN, so the direction is NaN there."""

# At these depths and above a float32 kernel's Gram matrix is eigendecomposed in float64 (see the
# module docstring for the measurement).
FLOAT64_EIGH_FROM_DEPTH = 4


def _compute_dtype(kernel):
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    return "float64" if dtype == "float64" else "float32"


def _is_wide(shape):
    return shape[-2] < shape[-1]


def _transpose(x):
    return ops.swapaxes(x, -1, -2)


def _rounding_level(rows, cols, dtype):
    """Eigenvalues of W^T W below this fraction of the largest are taken as exact zeros.

    The kernel's own rounding: singular values below max(a, b) eps s_max (NumPy's rank
    tolerance), that is lambda below (max(a, b) eps)^2 lambda_max; and the Gram matrix's
    rounding, about eps lambda_max (2 eps here: measured, a higher level zeroes real eigenvalues
    of a float32 kernel of condition number 1e3, 1e-6 lambda_max). A fractional power would blow
    the noise up (to ~eps^{1/4} relative at depth 8)."""
    eps = float(np.finfo(dtype).eps)
    return max((max(rows, cols) * eps) ** 2, 2 * eps)


def _weights(eigenvalues, depth):
    """t = lambda^{(N-1)/N} (..., 1, b) and the pairs (m_j, c_j) (..., N - 1, 2, b) of the module
    docstring (0^0 = 1)."""
    positive = eigenvalues > 0
    safe = ops.where(positive, eigenvalues, ops.ones_like(eigenvalues))
    pairs = [
        ops.stack(
            [
                ops.where(positive, ops.power(safe, (j - 1) / depth - 1), ops.zeros_like(eigenvalues)),
                ops.power(eigenvalues, (depth - j) / depth),  # 0^0 = 1: the j = N term
            ],
            axis=-2,
        )
        for j in range(2, depth + 1)
    ]
    cross = (
        ops.stack(pairs, axis=-3)
        if pairs
        else ops.zeros(ops.shape(eigenvalues)[:-1] + (0, 2, eigenvalues.shape[-1]), eigenvalues.dtype)
    )
    return ops.power(eigenvalues, (depth - 1) / depth)[..., None, :], cross


def _cross_matrix(cross):
    """M = sum_j m_j c_j^T (..., b, b) from the pairs (..., N - 1, 2, b)."""
    return ops.sum(cross[..., :, 0, :, None] * cross[..., :, 1, None, :], axis=-3)


def _eigen_matrix(basis, weights):
    """V diag(weights) V^T (..., b, b), `weights` (..., 1, b): R = V diag(t) V^T and, at depth 2,
    C = V diag(m) V^T."""
    return ops.matmul(basis * weights, _transpose(basis))


def _is_depth_two(cross):
    """Whether the pairs hold one term, m 1^T: the preconditioner of a depth-2 chain."""
    return cross.shape[-3] == 1


def _spectrum(kernel, depth, gram=None):
    """(W, V, t, pairs (m_j, c_j)) of the module docstring for `kernel` oriented tall, in the
    compute dtype; t is NaN where the kernel is not finite. `gram`: W^T W if already formed."""
    depth = check_depth(depth)
    kernel = ops.convert_to_tensor(kernel)
    dtype = _compute_dtype(kernel)
    kernel = ops.cast(kernel, dtype)
    if _is_wide(kernel.shape):
        kernel = _transpose(kernel)
    rows, cols = kernel.shape[-2], kernel.shape[-1]
    # A kernel holding inf or NaN has a non-finite Gram diagonal, as has one whose W^T W
    # overflows: the Gram alone tells (no pass over the kernel), and is zeroed for the eigh.
    if cols == 1:  # eq. 27: lambda = ||w||^2, V = 1, no decomposition
        eigenvalues = ops.sum(ops.square(kernel), axis=(-2, -1))[..., None]
        finite = ops.isfinite(eigenvalues[..., 0])
        eigenvalues = ops.where(finite[..., None], eigenvalues, ops.zeros_like(eigenvalues))
        basis = ops.ones(ops.shape(kernel)[:-2] + (1, 1), dtype)
    else:
        wide_eigh = dtype == "float64" or depth >= FLOAT64_EIGH_FROM_DEPTH or not backend.accurate_float32_eigh()
        eigh_dtype = "float64" if wide_eigh and backend.float64_available() else "float32"
        gram = ops.cast(ops.matmul(_transpose(kernel), kernel) if gram is None else gram, eigh_dtype)
        finite = ops.all(ops.isfinite(gram), axis=(-2, -1))
        gram = ops.where(finite[..., None, None], gram, ops.zeros_like(gram))
        eigenvalues, basis = ops.eigh(gram)
        noise = _rounding_level(rows, cols, dtype) * ops.max(eigenvalues, axis=-1, keepdims=True)
        eigenvalues = ops.where(eigenvalues > noise, eigenvalues, ops.zeros_like(eigenvalues))
        basis = ops.cast(basis, dtype)
    direct, cross = (ops.cast(x, dtype) for x in _weights(eigenvalues, depth))
    direct = ops.where(finite[..., None, None], direct, ops.full_like(direct, float("nan")))
    return kernel, basis, direct, cross


def compute_preconditioner(kernel, depth):
    """P(W) of eq. 26 for `kernel` (..., a, b), as a `Preconditioner` (see the module docstring).

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W.
        depth: int >= 1, the depth N of the chain being emulated.
    """
    return _preconditioner(kernel, depth)


def _preconditioner(kernel, depth, gram=None):
    """`compute_preconditioner`, given W^T W (W oriented tall) if already formed."""
    kernel, basis, direct, cross = _spectrum(kernel, depth, gram)
    return Preconditioner(ops.matmul(kernel, basis), basis, direct, cross)


# A kernel this many times taller than wide (oriented) takes the direct form in
# `end_to_end_direction`: three matmuls of G's size and five b x b ones, against five of G's size
# (B = W V and `apply_preconditioner`'s four); 5 b^3 < 2 a b^2 when a > 2.5 b (at depth 2: three
# b x b against one of G's size and one b x b, better from a > 2 b). Past it
# `apply_preconditioner` at depth >= 3 also regroups its products, to three of G's size and three
# b x b ones.
DIRECT_FORM_ASPECT = 2.5


def _oriented(grad, dtype):
    """`grad` cast to `dtype` and oriented tall, and whether it was transposed."""
    g = ops.cast(grad, dtype)
    return (_transpose(g), True) if _is_wide(g.shape) else (g, False)


def apply_preconditioner(preconditioner, grad):
    """P(W) G: the direction of eq. 24 for the gradient `grad` (..., a, b) of the kernel that
    `preconditioner` was computed from (or, amortised, of a later kernel). At depth 2 three
    matmuls of G's size and one b x b; deeper, four of G's size, or three and three b x b ones
    for a kernel more than `DIRECT_FORM_ASPECT` times taller than wide. The result has `grad`'s
    shape and dtype."""
    grad = ops.convert_to_tensor(grad)
    projected, basis, direct, cross = preconditioner
    g, wide = _oriented(grad, projected.dtype)
    if _is_depth_two(cross):
        # G V diag(t) V^T + B diag(m) B^T G, as M o Y = diag(m) Y and V V^T = I.
        direction = ops.matmul(g, _eigen_matrix(basis, direct)) + ops.matmul(
            projected, cross[..., 0, 0, :, None] * ops.matmul(_transpose(projected), g)
        )
    elif projected.shape[-2] > DIRECT_FORM_ASPECT * projected.shape[-1]:
        # Much taller than wide: G (V diag(t) V^T) + B ((M o (B^T G V)) V^T), three matmuls of G's
        # size and three b x b ones, against the four of G's size below.
        inner = _cross_matrix(cross) * ops.matmul(ops.matmul(_transpose(projected), g), basis)
        direction = ops.matmul(g, _eigen_matrix(basis, direct)) + ops.matmul(
            projected, ops.matmul(inner, _transpose(basis))
        )
    else:
        g_basis = ops.matmul(g, basis)
        inner = _cross_matrix(cross) * ops.matmul(_transpose(projected), g_basis)
        direction = ops.matmul(g_basis * direct + ops.matmul(projected, inner), _transpose(basis))
    return ops.cast(_transpose(direction) if wide else direction, grad.dtype)


def end_to_end_direction(kernel, grad, depth):
    """sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N} (eq. 24), from the Gram eigendecomposition.

    The singular values of the null spaces are 0 and 0^0 = 1. A kernel with a dimension of size
    1 (a single output) takes the closed form of eq. 27. At depth 2 a kernel with at least
    `NEWTON_SCHULZ_MIN_COLUMNS` columns and rows takes the Newton-Schulz square roots of W^T W
    where they converge (module docstring), the eigendecomposition otherwise. A kernel holding
    inf or NaN (or so large that W^T W overflows) gives a NaN direction, so divergence shows as
    usual. See the module
    docstring for the algorithm and the precision per depth. A kernel much taller than wide
    (`DIRECT_FORM_ASPECT`) is computed as G Q1 + W Q2 with the b x b matrices Q1 = V diag(t) V^T
    and Q2 = V (M o (V^T (W^T G) V)) V^T (at depth 2, V diag(m) V^T (W^T G)), the same sum
    without forming B = W V.

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W.
        grad: tensor of the same shape, the gradient G of the loss at W.
        depth: int >= 1, the depth N of the chain being emulated; depth 1 returns `grad`.

    Returns:
        The direction, shaped like `kernel`, in `grad`'s dtype.
    """
    depth = check_depth(depth)
    grad = ops.convert_to_tensor(grad)
    if depth == 1:
        return grad
    kernel = ops.convert_to_tensor(kernel)
    if min(kernel.shape[-2:]) == 1:
        return _single_output_direction(kernel, grad, depth)
    if depth == 2 and min(kernel.shape[-2:]) >= NEWTON_SCHULZ_MIN_COLUMNS:
        return _depth_two_direction(kernel, grad)
    return _eigh_direction(kernel, grad, depth)


def _eigh_direction(kernel, grad, depth, gram=None):
    """The direction from the Gram eigendecomposition (`compute_preconditioner`), or, for a
    kernel more than `DIRECT_FORM_ASPECT` times taller than wide, the direct form G Q1 + W Q2.
    `gram`: W^T W (W oriented tall) if already formed."""
    if max(kernel.shape[-2:]) <= DIRECT_FORM_ASPECT * min(kernel.shape[-2:]):
        return apply_preconditioner(_preconditioner(kernel, depth, gram), grad)
    w, basis, direct, cross = _spectrum(kernel, depth, gram)
    g, wide = _oriented(grad, w.dtype)
    w_g = ops.matmul(_transpose(w), g)  # independent of the eigh: may run beside it
    if _is_depth_two(cross):  # Q2 = V diag(m) V^T (W^T G)
        left = ops.matmul(_eigen_matrix(basis, cross[..., 0, 0, None, :]), w_g)
    else:
        basis_t = _transpose(basis)
        left = ops.matmul(
            ops.matmul(basis, _cross_matrix(cross) * ops.matmul(ops.matmul(basis_t, w_g), basis)), basis_t
        )
    direction = ops.matmul(g, _eigen_matrix(basis, direct)) + ops.matmul(w, left)
    return ops.cast(_transpose(direction) if wide else direction, grad.dtype)


# The coupled Newton-Schulz iteration of `_square_roots` (see `_depth_two_direction`).
LANCZOS_STEPS = 16  # Lanczos steps for the extreme eigenvalues of the Gram matrix
# Predicted steps beyond this: the eigh instead. At 3136 x 512 on 2 CPU cores a step costs about
# half a `W^T G` matmul and the eigh path about 10, so 8 steps still save about 1.5.
NEWTON_SCHULZ_MAX_STEPS = 8
NEWTON_SCHULZ_SPARE_STEPS = 3  # allowed past the prediction (the Frobenius test, an optimistic estimate)
# Smaller b: the Lanczos estimate's ~160 small ops weigh against the eigh (one run, 2 CPU cores,
# time against the eigh path: b = 128, a declined kernel 1.29x, a converging one 0.89x; b = 256,
# 1.09x and 0.80x; b = 512, 1.04x-1.07x and 0.73x).
NEWTON_SCHULZ_MIN_COLUMNS = 256


def _newton_schulz_map(x):
    """An eigenvalue x of X = Z Y after one step: x (3 - x)^2 / 4 (fixed point 1)."""
    return x * (3.0 - x) ** 2 / 4.0


def _slowest_allowed(steps, tolerance):
    """The smallest eigenvalue x_0 of A / s that reaches 1 - x <= tolerance within `steps`
    Newton-Schulz steps (bisection on the scalar map, increasing on (0, 1))."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        x = middle
        for _ in range(steps):
            x = _newton_schulz_map(x)
        low, high = (middle, high) if 1.0 - x > tolerance else (low, middle)
    return high


def _lanczos_extremes(matrix, steps):
    """(smallest, largest) Ritz values of the symmetric `matrix` (..., b, b) after `steps` Lanczos
    steps from the vector of ones, each (..., 1, 1): inside the spectrum, so the smallest is at
    least lambda_min and the largest at most lambda_max, both sharp at the ends of a spectrum
    (measured after 16 steps on 512 x 512 Gram matrices: within 1% of lambda_max, and 1.3x
    lambda_min at cond(A) = 100, 3.1x at cond(A) = 900). No reorthogonalisation: a lost orthogonality repeats Ritz values but keeps the
    extreme ones. A breakdown (an invariant subspace) leaves zero vectors, hence Ritz values 0."""
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
    alphas, betas = ops.concatenate(alphas, axis=-1), ops.concatenate(betas[:-1], axis=-1)  # (..., m), (..., m - 1)
    off = ops.pad(betas, [[0, 0]] * (len(betas.shape) - 1) + [[0, 1]])
    eye = ops.eye(steps, dtype=dtype)
    upper = ops.eye(steps, k=1, dtype=dtype)
    tridiagonal = alphas[..., None, :] * eye + off[..., :, None] * upper + off[..., None, :] * ops.transpose(upper)
    tridiagonal = ops.where(ops.isfinite(tridiagonal), tridiagonal, ops.zeros_like(tridiagonal))
    ritz = ops.eigh(tridiagonal)[0]
    return ritz[..., :1, None], ritz[..., -1:, None]


def _newton_schulz_step(root, inverse_root, eye):
    """One step: (Y T, T Z, X) with X = Z Y and T = (3 I - X) / 2."""
    product = ops.matmul(inverse_root, root)
    half = 1.5 * eye - 0.5 * product
    return ops.matmul(root, half), ops.matmul(half, inverse_root), product


def _square_roots(gram):
    """(Y, Z, converged): A^{1/2} and A^{-1/2} of the symmetric b x b matrices `gram` (..., b, b)
    by the coupled Newton-Schulz iteration, matmuls only.

    With s the largest Ritz value of A (`_lanczos_extremes`), Y_0 = A / s and Z_0 = I, each step
    takes X = Z_k Y_k, T = (3 I - X) / 2 and Y_{k+1} = Y_k T, Z_{k+1} = T Z_k: three b x b
    matmuls. Y_k -> (A/s)^{1/2} and Z_k -> (A/s)^{-1/2} for every eigenvalue of A/s in (0, 3);
    an eigenvalue x of X moves to x (3 - x)^2 / 4, so 1 - x = e becomes about 3 e^2 / 4 near 1,
    while a small one grows only 9/4-fold a step. The smallest Ritz value (an upper estimate of
    lambda_min) predicts the steps: beyond `NEWTON_SCHULZ_MAX_STEPS` (an ill-conditioned or
    singular A: in float32 a smallest eigenvalue of A/s below about 0.015, cond(A) beyond about
    70, cond(W) beyond about 8) the iteration does not start. It stops when the Frobenius norm of
    I - X, measured before a step, is at most sqrt(eps) of the dtype (the step then leaves about
    eps), and gives up `NEWTON_SCHULZ_SPARE_STEPS` past the limit or on a non-finite residual (a
    zero or non-finite A). With leading batch dimensions every matrix must converge.
    """
    dtype = keras.backend.standardize_dtype(gram.dtype)
    eye = ops.eye(gram.shape[-1], dtype=dtype)
    tolerance = float(np.sqrt(np.finfo(dtype).eps))
    # A non-finite A (or one whose Ritz values overflow) is zeroed first: TensorFlow's eigh of the
    # tridiagonal matrix raises on NaN. Zero gives Ritz values 0, so the iteration declines.
    finite = ops.all(ops.isfinite(gram), axis=(-2, -1), keepdims=True)
    gram = ops.where(finite, gram, ops.zeros_like(gram))
    smallest, scale = _lanczos_extremes(gram, LANCZOS_STEPS)
    hopeful = ops.all(ops.logical_and(finite, smallest >= _slowest_allowed(NEWTON_SCHULZ_MAX_STEPS, tolerance) * scale))

    def step(k, root, inverse_root, residual):
        root, inverse_root, product = _newton_schulz_step(root, inverse_root, eye)
        return k + 1, root, inverse_root, ops.sqrt(ops.max(ops.sum(ops.square(eye - product), axis=(-2, -1))))

    def going(k, root, inverse_root, residual):
        return ops.logical_and(residual > tolerance, k < NEWTON_SCHULZ_MAX_STEPS + NEWTON_SCHULZ_SPARE_STEPS)

    infinite = ops.convert_to_tensor(np.inf, dtype)
    start = (
        ops.convert_to_tensor(0),
        gram / scale,
        ops.broadcast_to(eye, ops.shape(gram)),
        ops.where(hopeful, infinite, -infinite),
    )
    _, root, inverse_root, residual = ops.while_loop(going, step, start)
    root_scale = ops.sqrt(scale)
    return root * root_scale, inverse_root / root_scale, ops.logical_and(hopeful, residual <= tolerance)


def _depth_two_direction(kernel, grad):
    """Eq. 24 at depth 2 for a kernel with both sides above 1: G A^{1/2} + W A^{-1/2} (W^T G),
    A = W^T W (W oriented tall), since [W W^T]^{1/2} = W A^{-1/2} W^T.

    The roots come from `_square_roots` (Newton-Schulz, matmuls only) when it converges, which it
    does for a full-rank kernel with cond(W) up to about 8 in float32 (about 5 in float64, whose
    tighter tolerance needs more steps); otherwise (an ill-conditioned, rank-deficient, zero or
    non-finite kernel) from the eigendecomposition (`_eigh_direction`, given the Gram matrix).
    Measured on a 3136 x 512 Gaussian kernel (cond(W) about 2.4; README, Performance): 6 steps
    in float32 and 7 in float64, relative error 5.4e-7 (the eigh path 2.3e-5) and 2.6e-15, at
    7.5 `W^T G` matmuls against 10.4 for the eigh path's floor.
    """
    dtype = _compute_dtype(kernel)
    w, _ = _oriented(kernel, dtype)
    g, wide = _oriented(grad, dtype)
    gram = ops.matmul(_transpose(w), w)
    root, inverse_root, converged = _square_roots(gram)

    def iterated():
        direction = ops.matmul(g, root) + ops.matmul(w, ops.matmul(inverse_root, ops.matmul(_transpose(w), g)))
        return ops.cast(_transpose(direction) if wide else direction, grad.dtype)

    return ops.cond(converged, iterated, lambda: _eigh_direction(kernel, grad, 2, gram))


def _single_output_direction(kernel, grad, depth):
    """Eq. 27 for a kernel with a side of size 1: ||w||^{2-2/N} (g + (N-1) <g, w> / ||w||^2 w),
    and 0 at w = 0, NaN where w is not finite. Element-wise products and two sums, no
    decomposition: this is the full-batch engine's inner loop for a single output."""
    dtype = _compute_dtype(kernel)
    w, g = ops.cast(kernel, dtype), ops.cast(grad, dtype)
    finite = ops.all(ops.isfinite(w), axis=(-2, -1), keepdims=True)
    w = ops.where(finite, w, ops.zeros_like(w))
    squared_norm = ops.sum(ops.square(w), axis=(-2, -1), keepdims=True)
    positive = squared_norm > 0
    safe_norm = ops.where(positive, squared_norm, ops.ones_like(squared_norm))
    radial = ops.where(positive, (depth - 1) * ops.sum(g * w, axis=(-2, -1), keepdims=True) / safe_norm, 0.0)
    direction = ops.power(squared_norm, (depth - 1) / depth) * (g + radial * w)
    direction = ops.where(finite, direction, ops.full_like(direction, float("nan")))
    return ops.cast(direction, grad.dtype)


def _singular_value_powers(s, depth):
    """s^{2(j-1)/N} for j = 1..N, stacked on a new leading axis (0^0 = 1)."""
    return ops.stack([ops.power(s, 2.0 * j / depth) for j in range(depth)])


def preconditioner_eigenvalues(kernel, depth):
    """Eigenvalues of the preconditioner P of eq. 26, arranged as an (..., a, b) tensor.

    Entry [r, r'] is sum_j s_r^{2(j-1)/N} s'_{r'}^{2(N-j)/N}, the eigenvalue of the eigenvector
    u_r v_{r'}^T, where s and s' are the singular values of the (a, b) kernel (descending) padded
    with zeros to lengths a and b. Singular values below max(a, b) eps s_max count as zeros.
    """
    depth = check_depth(depth)
    kernel = ops.convert_to_tensor(kernel)
    rows, cols = kernel.shape[-2], kernel.shape[-1]
    s = ops.svd(kernel, compute_uv=False)
    eps = np.finfo(keras.backend.standardize_dtype(kernel.dtype)).eps
    s = ops.where(s > max(rows, cols) * eps * ops.max(s, axis=-1, keepdims=True), s, ops.zeros_like(s))
    pad = [[0, 0]] * (len(s.shape) - 1)
    left = _singular_value_powers(ops.pad(s, pad + [[0, rows - s.shape[-1]]]), depth)
    right = _singular_value_powers(ops.pad(s, pad + [[0, cols - s.shape[-1]]]), depth)
    return ops.sum(left[:, ..., :, None] * ops.flip(right, axis=0)[:, ..., None, :], axis=0)


def _psd_power(matrix, exponent):
    """matrix^exponent for a symmetric PSD matrix, by eigendecomposition; ^0 is the identity.

    Eigenvalues below the round-off level (n eps max eigenvalue) are taken as exact zeros, since
    a fractional power would blow their rounding error up.
    """
    if exponent == 0:
        return ops.eye(matrix.shape[-1], dtype=matrix.dtype)
    eigenvalues, eigenvectors = ops.eigh(matrix)
    noise = matrix.shape[-1] * np.finfo(keras.backend.standardize_dtype(matrix.dtype)).eps
    noise = noise * ops.max(ops.abs(eigenvalues), axis=-1, keepdims=True)
    eigenvalues = ops.where(eigenvalues > noise, eigenvalues, ops.zeros_like(eigenvalues))
    scaled = eigenvectors * ops.power(eigenvalues, exponent)[..., None, :]
    return ops.matmul(scaled, _transpose(eigenvectors))


def preconditioner_matrix(kernel, depth):
    """The explicit preconditioner P of eq. 26 for an (a, b) kernel, an (a b, a b) matrix.

    P = sum_j [W W^T]^{(j-1)/N} (kron) [W^T W]^{(N-j)/N}, so that with row-major vec (the
    order of `ops.reshape`), vec(end_to_end_direction(W, G, N)) = P vec(G). Built from
    eigendecompositions of W W^T and W^T W; meant for small kernels and for checking.
    """
    depth = check_depth(depth)
    kernel = ops.convert_to_tensor(kernel)
    if len(kernel.shape) != 2:
        raise ValueError(f"`kernel` must be 2-D for `preconditioner_matrix`, got shape {kernel.shape}.")
    rows, cols = kernel.shape
    left_gram = ops.matmul(kernel, _transpose(kernel))
    right_gram = ops.matmul(_transpose(kernel), kernel)
    total = ops.zeros((rows * cols, rows * cols), dtype=kernel.dtype)
    for j in range(1, depth + 1):
        left = _psd_power(left_gram, (j - 1) / depth)
        right = _psd_power(right_gram, (depth - j) / depth)
        total = total + ops.reshape(ops.einsum("ik,jl->ijkl", left, right), (rows * cols, rows * cols))
    return total
