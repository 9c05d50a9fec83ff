"""The preconditioner of eq. 11 of the paper (the write-up's eq. 26) written out: its explicit
(a b) x (a b) matrix and its eigenvalues. Meant for small kernels and for checking the fast forms.

With the full SVD W = U S V^T of an (a, b) kernel, P = sum_{j=1..N} [W W^T]^{(j-1)/N} (kron)
[W^T W]^{(N-j)/N} has the eigenvectors vec(u_r v_{r'}^T) with the eigenvalues
sum_j s_r^{2(j-1)/N} s'_{r'}^{2(N-j)/N}, s and s' the singular values padded with zeros to
lengths a and b (0^0 = 1).
"""

import keras
from keras import ops

from tf_overparam.preconditioning._matrices import rank_tolerance, transpose
from tf_overparam.validation import check_depth


def _check_kernel(kernel, matrix_only=False):
    kernel = ops.convert_to_tensor(kernel)
    if len(kernel.shape) < 2 or (matrix_only and len(kernel.shape) != 2):
        wanted = "2-D" if matrix_only else "at least 2-D"
        raise ValueError(f"`kernel` must be {wanted}, got shape {tuple(kernel.shape)}.")
    return kernel


def _singular_value_powers(s, depth):
    """s^{2(j-1)/N} for j = 1..N, stacked on a new leading axis (0^0 = 1)."""
    return ops.stack([ops.power(s, 2.0 * j / depth) for j in range(depth)])


def preconditioner_eigenvalues(kernel, depth):
    """Eigenvalues of the preconditioner P of eq. 11 of the paper, arranged as an (..., a, b)
    tensor.

    Entry [r, r'] is sum_j s_r^{2(j-1)/N} s'_{r'}^{2(N-j)/N}, the eigenvalue of the eigenvector
    u_r v_{r'}^T, where s and s' are the singular values of the (a, b) kernel (descending) padded
    with zeros to lengths a and b. Singular values at or below the square root of the rank
    tolerance (`rank_tolerance`, relative to the largest) count as zeros.

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W.
        depth: int >= 1, the depth N of the chain.
    """
    depth = check_depth(depth)
    kernel = _check_kernel(kernel)
    rows, cols = kernel.shape[-2], kernel.shape[-1]
    s = ops.svd(kernel, compute_uv=False)
    level = rank_tolerance(rows, cols, keras.backend.standardize_dtype(kernel.dtype)) ** 0.5
    s = ops.where(s > level * ops.max(s, axis=-1, keepdims=True), s, ops.zeros_like(s))
    pad = [[0, 0]] * (len(s.shape) - 1)
    left = _singular_value_powers(ops.pad(s, pad + [[0, rows - s.shape[-1]]]), depth)
    right = _singular_value_powers(ops.pad(s, pad + [[0, cols - s.shape[-1]]]), depth)
    return ops.sum(left[:, ..., :, None] * ops.flip(right, axis=0)[:, ..., None, :], axis=0)


def _psd_power(gram, exponent, tolerance):
    """gram^exponent of a symmetric PSD Gram matrix by eigendecomposition; ^0 is the identity,
    also on the null space. Eigenvalues at or below `tolerance` of the largest are zeros."""
    if exponent == 0:
        return ops.eye(gram.shape[-1], dtype=gram.dtype)
    eigenvalues, eigenvectors = ops.eigh(gram)
    noise = tolerance * ops.max(ops.abs(eigenvalues), axis=-1, keepdims=True)
    eigenvalues = ops.where(eigenvalues > noise, eigenvalues, ops.zeros_like(eigenvalues))
    return ops.matmul(eigenvectors * ops.power(eigenvalues, exponent)[..., None, :], transpose(eigenvectors))


def preconditioner_matrix(kernel, depth):
    """The explicit preconditioner P of eq. 11 of the paper for an (a, b) kernel, an (a b, a b)
    matrix.

    P = sum_j [W W^T]^{(j-1)/N} (kron) [W^T W]^{(N-j)/N}, so that with row-major vec (the order
    of `ops.reshape`), vec(end_to_end_direction(W, G, N)) = P vec(G). Built from
    eigendecompositions of W W^T and W^T W.

    Args:
        kernel: tensor (a, b), the end-to-end kernel W.
        depth: int >= 1, the depth N of the chain.
    """
    depth = check_depth(depth)
    kernel = _check_kernel(kernel, matrix_only=True)
    rows, cols = kernel.shape
    tolerance = rank_tolerance(rows, cols, keras.backend.standardize_dtype(kernel.dtype))
    left_gram = ops.matmul(kernel, transpose(kernel))
    right_gram = ops.matmul(transpose(kernel), kernel)
    total = ops.zeros((rows * cols, rows * cols), dtype=kernel.dtype)
    for j in range(1, depth + 1):
        left = _psd_power(left_gram, (j - 1) / depth, tolerance)
        right = _psd_power(right_gram, (depth - j) / depth, tolerance)
        total = total + ops.reshape(ops.einsum("ik,jl->ijkl", left, right), (rows * cols, rows * cols))
    return total
