"""Independent NumPy evaluations of the paper's formulas, shared by the tests."""

import numpy as np


def psd_power(matrix, exponent):
    """matrix^exponent of a symmetric PSD matrix; ^0 is the identity, also on the null space.

    Eigenvalues below 1e-10 of the largest are exact zeros (the test kernels are built so that
    every true non-zero squared singular value is far above that)."""
    if exponent == 0:
        return np.eye(len(matrix))
    values, vectors = np.linalg.eigh(matrix)
    values = np.where(values > 1e-10 * max(values.max(), 0.0), values, 0.0)
    return (vectors * values**exponent) @ vectors.T


def reference_direction(w, g, depth):
    """sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N} (eq. 24) by eigendecompositions (0^0 = 1)."""
    left, right = w @ w.T, w.T @ w
    return sum(
        psd_power(left, (j - 1) / depth) @ g @ psd_power(right, (depth - j) / depth) for j in range(1, depth + 1)
    )
