"""The end-to-end update rule (eq. 24 of the write-up, eq. 10 of the paper) and its
preconditioner (eq. 26).

Gradient descent with step eta on a balanced depth-N chain moves the end-to-end matrix W as

    W <- (1 - eta lambda N) W - eta sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N},

G = dL_1/dW. The sum is `end_to_end_direction(W, G, N)`. It is invariant under transposition,
direction(W^T, G^T) = direction(W, G)^T, so Keras' (inputs, units) kernels are used as they
are. All functions take leading batch dimensions and run inside `tf.function`.
"""

import tensorflow as tf

from tf_overparam.layers import check_depth


def end_to_end_direction(kernel, grad, depth):
    """sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N} (eq. 24), from one SVD.

    With the SVD W = U diag(s) V^T the sum is U (M o (U^T G V)) V^T with
    M_{r,r'} = sum_j s_r^{2(j-1)/N} s_{r'}^{2(N-j)/N} (NOTES.md), where the singular values of
    the null spaces are 0 and 0^0 = 1. A kernel with a dimension of size 1 (a single output)
    takes the closed form of eq. 27 instead, which costs O(d) and no SVD. A kernel holding
    inf or NaN gives a NaN direction, so divergence shows as usual.

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W.
        grad: tensor of the same shape, the gradient G of the loss at W.
        depth: int >= 1, the depth N of the chain being emulated; depth 1 returns `grad`.

    Returns:
        The direction, shaped like `kernel`.
    """
    depth = check_depth(depth)
    kernel = tf.convert_to_tensor(kernel)
    grad = tf.convert_to_tensor(grad, dtype=kernel.dtype)
    if depth == 1:
        return grad
    finite = tf.reduce_all(tf.math.is_finite(kernel), axis=(-2, -1), keepdims=True)
    safe_kernel = tf.where(finite, kernel, tf.zeros_like(kernel))
    if kernel.shape[-2] == 1 or kernel.shape[-1] == 1:
        direction = _single_output_direction(safe_kernel, grad, depth)
    else:
        direction = _svd_direction(safe_kernel, grad, depth)
    return tf.where(finite, direction, tf.constant(float("nan"), kernel.dtype))


def _single_output_direction(w, g, depth):
    """Eq. 27: ||w||^{2-2/N} (g + (N-1) <g, w>/||w||^2 w), and 0 at w = 0."""
    squared_norm = tf.reduce_sum(tf.square(w), axis=(-2, -1), keepdims=True)
    inner = tf.reduce_sum(g * w, axis=(-2, -1), keepdims=True)
    radial = (depth - 1) * tf.math.divide_no_nan(inner, squared_norm)
    return tf.pow(squared_norm, (depth - 1) / depth) * (g + radial * w)


def _singular_value_powers(s, depth):
    """s^{2(j-1)/N} for j = 1..N, stacked on a new leading axis (0^0 = 1)."""
    exponents = tf.cast(tf.range(depth), s.dtype) * (2.0 / depth)
    return tf.pow(s[tf.newaxis], tf.reshape(exponents, [depth] + [1] * s.shape.rank))


def _without_rounding_noise(s, rows, cols):
    """Singular values below the rounding level (max(a, b) eps s_max, NumPy's rank tolerance)
    taken as exact zeros, as `_psd_power` does: a fractional power s^{2/N} would blow their
    rounding error up (to ~eps^{1/4} relative at depth 8)."""
    eps = tf.experimental.numpy.finfo(s.dtype.as_numpy_dtype).eps
    noise = max(rows, cols) * eps * tf.reduce_max(s, axis=-1, keepdims=True)
    return tf.where(s > noise, s, tf.zeros_like(s))


def _svd_direction(kernel, grad, depth):
    rows, cols = kernel.shape[-2], kernel.shape[-1]
    s, u, v = tf.linalg.svd(kernel, full_matrices=False)
    s = _without_rounding_noise(s, rows, cols)
    powers = _singular_value_powers(s, depth)  # powers[j-1] = s^{2(j-1)/N}
    weights = tf.reduce_sum(powers[:, ..., :, tf.newaxis] * powers[::-1, ..., tf.newaxis, :], axis=0)
    u_t_grad = tf.linalg.matmul(u, grad, adjoint_a=True)
    direction = tf.linalg.matmul(u, tf.linalg.matmul(weights * tf.linalg.matmul(u_t_grad, v), v, adjoint_b=True))
    top_power = powers[-1]  # s^{2(N-1)/N}: the weight where the other side's singular value is 0
    if rows > s.shape[-1]:  # the left null space of W
        left_rest = grad - tf.linalg.matmul(u, u_t_grad)
        direction += tf.linalg.matmul(tf.linalg.matmul(left_rest, v) * top_power[..., tf.newaxis, :], v, adjoint_b=True)
    if cols > s.shape[-1]:  # the right null space of W
        right_rest = grad - tf.linalg.matmul(tf.linalg.matmul(grad, v), v, adjoint_b=True)
        direction += tf.linalg.matmul(u * top_power[..., tf.newaxis, :], tf.linalg.matmul(u, right_rest, adjoint_a=True))
    return direction


def preconditioner_eigenvalues(kernel, depth):
    """Eigenvalues of the preconditioner P of eq. 26, arranged as an (..., a, b) tensor.

    Entry [r, r'] is sum_j s_r^{2(j-1)/N} s'_{r'}^{2(N-j)/N}, the eigenvalue of the eigenvector
    u_r v_{r'}^T, where s and s' are the singular values of the (a, b) kernel padded with zeros
    to lengths a and b.
    """
    depth = check_depth(depth)
    kernel = tf.convert_to_tensor(kernel)
    rows, cols = kernel.shape[-2], kernel.shape[-1]
    s = _without_rounding_noise(tf.linalg.svd(kernel, compute_uv=False), rows, cols)
    pad = [[0, 0]] * (s.shape.rank - 1)
    left = _singular_value_powers(tf.pad(s, pad + [[0, rows - s.shape[-1]]]), depth)
    right = _singular_value_powers(tf.pad(s, pad + [[0, cols - s.shape[-1]]]), depth)
    return tf.reduce_sum(left[:, ..., :, tf.newaxis] * right[::-1, ..., tf.newaxis, :], axis=0)


def _psd_power(matrix, exponent):
    """matrix^exponent for a symmetric PSD matrix, by eigendecomposition; ^0 is the identity.

    Eigenvalues below the round-off level (n eps max eigenvalue) are taken as exact zeros, since
    a fractional power would blow their rounding error up.
    """
    if exponent == 0:
        return tf.eye(matrix.shape[-1], dtype=matrix.dtype)
    eigenvalues, eigenvectors = tf.linalg.eigh(matrix)
    noise = matrix.shape[-1] * tf.experimental.numpy.finfo(matrix.dtype.as_numpy_dtype).eps
    noise *= tf.reduce_max(tf.abs(eigenvalues), axis=-1, keepdims=True)
    eigenvalues = tf.where(eigenvalues > noise, eigenvalues, tf.zeros_like(eigenvalues))
    scaled = eigenvectors * tf.pow(eigenvalues, exponent)[..., tf.newaxis, :]
    return tf.linalg.matmul(scaled, eigenvectors, adjoint_b=True)


def preconditioner_matrix(kernel, depth):
    """The explicit preconditioner P of eq. 26 for an (a, b) kernel, an (a b, a b) matrix.

    P = sum_j [W W^T]^{(j-1)/N} (kron) [W^T W]^{(N-j)/N}, so that with row-major vec (the
    order of `tf.reshape`), vec(end_to_end_direction(W, G, N)) = P vec(G). Built from
    eigendecompositions of W W^T and W^T W; meant for small kernels and for checking.
    """
    depth = check_depth(depth)
    kernel = tf.convert_to_tensor(kernel)
    if kernel.shape.rank != 2:
        raise ValueError(f"`kernel` must be 2-D for `preconditioner_matrix`, got shape {kernel.shape}.")
    rows, cols = kernel.shape
    left_gram = tf.linalg.matmul(kernel, kernel, adjoint_b=True)
    right_gram = tf.linalg.matmul(kernel, kernel, adjoint_a=True)
    total = tf.zeros((rows * cols, rows * cols), dtype=kernel.dtype)
    for j in range(1, depth + 1):
        left = _psd_power(left_gram, (j - 1) / depth)
        right = _psd_power(right_gram, (depth - j) / depth)
        total += tf.reshape(tf.einsum("ik,jl->ijkl", left, right), (rows * cols, rows * cols))
    return total
