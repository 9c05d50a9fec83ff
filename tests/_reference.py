"""Independent NumPy evaluations of the paper's formulas, shared by the tests."""

import numpy as np


def _clean_eigh(matrix):
    """The eigendecomposition of a symmetric PSD matrix, eigenvalues below 1e-10 of the largest
    set to exact zeros (the test kernels are built so that every true non-zero squared singular
    value is far above that)."""
    values, vectors = np.linalg.eigh(matrix)
    return np.where(values > 1e-10 * max(values.max(), 0.0), values, 0.0), vectors


def _power(eigh, exponent):
    """matrix^exponent from its `_clean_eigh`; ^0 is the identity, also on the null space."""
    values, vectors = eigh
    if exponent == 0:
        return np.eye(len(values))
    return (vectors * values**exponent) @ vectors.T


def psd_power(matrix, exponent):
    """matrix^exponent of a symmetric PSD matrix; ^0 is the identity, also on the null space."""
    return _power(_clean_eigh(matrix), exponent)


def reference_direction(w, g, depth):
    """sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N} (eq. 10 of the paper, the write-up's eq. 24)
    by eigendecompositions (0^0 = 1)."""
    left, right = _clean_eigh(w @ w.T), _clean_eigh(w.T @ w)
    return sum(_power(left, (j - 1) / depth) @ g @ _power(right, (depth - j) / depth) for j in range(1, depth + 1))


def reference_eigenvalues(w, depth):
    """The eigenvalues of eq. 11's preconditioner, lambda[r, r'] = sum_j s_r^{2(j-1)/N}
    s'_{r'}^{2(N-j)/N}, s and s' the singular values padded with zeros to W's two sides."""
    a, b = w.shape
    s = np.linalg.svd(w, compute_uv=False)
    s = np.where(s > 1e-10 * max(s.max(), 0.0), s, 0.0)
    left, right = np.zeros(a), np.zeros(b)
    left[: len(s)], right[: len(s)] = s, s
    # NumPy's 0.0 ** 0 is 1.
    return sum(
        left[:, None] ** (2 * (j - 1) / depth) * right[None, :] ** (2 * (depth - j) / depth)
        for j in range(1, depth + 1)
    )


def reference_square_roots(matrix):
    """(A^{1/2}, A^{-1/2}) of a symmetric positive definite matrix, by NumPy's eigh."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T
