"""Matrix helpers shared by the forms of the preconditioner: the compute dtype, the tall
orientation, and the one rank tolerance."""

import keras
import numpy as np
from keras import ops


def compute_dtype(tensor):
    """float64 for a float64 tensor, float32 for any other (float16 and bfloat16 included)."""
    return "float64" if keras.backend.standardize_dtype(tensor.dtype) == "float64" else "float32"


def transpose(x):
    """The matrix transpose of the last two axes."""
    return ops.swapaxes(x, -1, -2)


def oriented(matrix, dtype):
    """`matrix` cast to `dtype` and oriented tall (at least as many rows as columns), and whether
    it was transposed. eq. 24 commutes with transposition, so every form works on tall W."""
    matrix = ops.cast(matrix, dtype)
    wide = matrix.shape[-2] < matrix.shape[-1]
    return (transpose(matrix), True) if wide else (matrix, False)


def rank_tolerance(rows, cols, dtype):
    """Eigenvalues of a Gram matrix W^T W (or W W^T) of an (rows, cols) kernel at or below this
    fraction of the largest are taken as exact zeros.

    Two sources of rounding set it: the kernel's own, singular values below max(rows, cols) eps
    s_max (NumPy's `matrix_rank` tolerance), that is eigenvalues below (max(rows, cols) eps)^2
    lambda_max; and the Gram matrix's, about eps lambda_max (taken as 2 eps: a larger level would
    zero the true eigenvalues of a float32 kernel of condition number 1e3, 1e-6 lambda_max). A
    fractional power of an eigenvalue left at the rounding level would blow its noise up (to
    about eps^{1/4} relative at depth 8).

    For singular values the level is the square root of this.
    """
    eps = float(np.finfo(keras.backend.standardize_dtype(dtype)).eps)
    return max((max(rows, cols) * eps) ** 2, 2 * eps)
