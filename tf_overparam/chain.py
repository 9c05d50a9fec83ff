"""The chain core: chain shapes, the end-to-end product (eq. 10), the factor
gradients (eq. 14) and the balanced factorisation. No Keras layer lives here; every other
module imports these from here (numbering: docs/equations.md).

Keras stores a dense kernel as (inputs, units), the transpose of the paper's W. A chain of
factors F_1, ..., F_N in Keras layout (F_j of shape (n_{j-1}, n_j), input side first) has the
end-to-end kernel F_1 F_2 ... F_N = (W_N ... W_1)^T, and the paper's balancedness condition
W_{j+1}^T W_{j+1} = W_j W_j^T (docs/equations.md, "Balancedness") reads F_{j+1} F_{j+1}^T = F_j^T F_j.
"""

import numpy as np
from keras import ops

# The validators live in `tf_overparam.validation`; importable from here as well.
from tf_overparam.validation import check_depth, check_hidden_widths, check_positive_int

__all__ = [
    "apply_chain",
    "RandomRotation",
    "balanced_chain",
    "balanced_factors",
    "balanced_factors_from_svd",
    "chain_gradients",
    "chain_product",
    "chain_product_flops",
    "chain_shapes",
    "chain_widths",
    "check_depth",
    "check_positive_int",
    "inputs_first_threshold",
    "numerical_rank",
    "resolve_hidden_units",
]


def resolve_hidden_units(hidden_units, depth, units, name="hidden_units"):
    """The list of depth - 1 hidden widths; `None` means `units` for every hidden layer.

    Args:
        hidden_units: None, a positive int (every hidden width) or a sequence of depth - 1
            positive ints.
        depth: int >= 1, the number of factors.
        units: the width used when `hidden_units` is None.
        name: the argument's name in error messages (e.g. "hidden_filters").
    """
    return check_hidden_widths(hidden_units, check_depth(depth), units, name)


def chain_widths(inputs, hidden_units, units):
    """The widths n_0, ..., n_N of a chain: inputs, the hidden widths, units."""
    return [int(inputs), *[int(h) for h in hidden_units], int(units)]


def chain_shapes(inputs, hidden_units, units):
    """The factor shapes (n_{j-1}, n_j) of a chain, input side first."""
    widths = chain_widths(inputs, hidden_units, units)
    return list(zip(widths[:-1], widths[1:]))


def chain_product_flops(widths):
    """Multiply-adds of `chain_product` for a chain of these widths (in the order it uses)."""
    if len(widths) <= 2:
        return 0
    if widths[-1] <= widths[0]:
        return sum(widths[j - 1] * widths[j] * widths[-1] for j in range(1, len(widths) - 1))
    return sum(widths[0] * widths[j] * widths[j + 1] for j in range(1, len(widths) - 1))


def inputs_first_threshold(widths):
    """Rows below which applying the factors to the inputs one at a time costs fewer
    multiply-adds than forming the end-to-end kernel first and applying it.

    Inputs first costs rows * sum_j n_{j-1} n_j; kernel first costs `chain_product_flops` +
    rows * n_0 n_N. Returns `math.inf` when inputs first always wins (narrow hidden layers) and
    0 for a single factor (the two orders are the same).
    """
    if len(widths) <= 2:
        return 0
    per_row = sum(a * b for a, b in zip(widths[:-1], widths[1:])) - widths[0] * widths[-1]
    if per_row <= 0:
        return float("inf")
    return chain_product_flops(widths) / per_row


def apply_chain(inputs, factors):
    """inputs @ F_1 @ F_2 ... @ F_N, applied one factor at a time (leading dims broadcast)."""
    outputs = inputs
    for factor in factors:
        outputs = ops.matmul(outputs, factor)
    return outputs


def _matmul(a, b, transpose_a=False):
    """a @ b (or a^T @ b), as a broadcast product where a contracted or kept size is 1: the
    width-1 chains of the paper then cost element-wise ops instead of tiny batched matmuls."""
    if transpose_a and a.shape[-1] == 1 and b.shape[-1] == 1:
        return ops.sum(a * b, axis=-2, keepdims=True)
    if transpose_a:
        a = ops.swapaxes(a, -1, -2)
    if a.shape[-1] == 1:
        return a * b
    return ops.matmul(a, b)


def chain_product(factors):
    """End-to-end kernel F_1 F_2 ... F_N of a chain of factors (eq. 10, docs/equations.md).

    The product is taken from the narrower end, so a chain ending in a single unit costs
    matrix-vector products only. Leading batch dimensions broadcast.

    Args:
        factors: a non-empty sequence of tensors, F_j of shape (..., n_{j-1}, n_j).

    Returns:
        The tensor F_1 ... F_N of shape (..., n_0, n_N).
    """
    factors = list(factors)
    if not factors:
        raise ValueError("`factors` must hold at least one matrix, got an empty sequence.")
    if factors[-1].shape[-1] <= factors[0].shape[-2]:
        product = factors[-1]
        for factor in reversed(factors[:-1]):
            product = _matmul(factor, product)
    else:
        product = factors[0]
        for factor in factors[1:]:
            product = _matmul(product, factor)
    return product


def chain_gradients(factors, kernel_gradient):
    """Gradients of the factors from the gradient G of the end-to-end kernel (eq. 14).

    In Keras layout eq. 14 reads dL/dF_j = (F_1 ... F_{j-1})^T G (F_{j+1} ... F_N)^T. It is
    evaluated as v_j S_{j+1}^T with v_1 = G, v_{j+1} = F_j^T v_j and S_j = F_j S_{j+1}, so a
    chain ending in a single unit costs matrix-vector products only. Batch dims broadcast.

    Args:
        factors: sequence of tensors F_j of shape (..., n_{j-1}, n_j).
        kernel_gradient: tensor (..., n_0, n_N), the gradient of the loss at F_1 ... F_N.

    Returns:
        A list with the gradient of each factor.
    """
    factors = list(factors)
    suffixes = [None] * (len(factors) + 1)  # suffixes[j] = F_{j+1} ... F_N (0-based), None = I
    for j in range(len(factors) - 1, 0, -1):
        suffixes[j] = factors[j] if suffixes[j + 1] is None else _matmul(factors[j], suffixes[j + 1])
    gradients, projected = [], kernel_gradient
    for j, factor in enumerate(factors):
        suffix = suffixes[j + 1]
        gradients.append(projected if suffix is None else _matmul(projected, ops.swapaxes(suffix, -1, -2)))
        if j + 1 < len(factors):
            projected = _matmul(factor, projected, transpose_a=True)
    return gradients


def balanced_factors(kernel, hidden_units, rotation_seed=None):
    """Factors a kernel into a balanced chain (docs/equations.md, "Balanced factors").

    With the thin SVD kernel = A diag(s) B^T of rank r, the chain is F_1 = A S^{1/N},
    F_j = S^{1/N} (1 < j < N), F_N = S^{1/N} B^T, padded with zeros to the hidden widths, so
    that F_{j+1} F_{j+1}^T = F_j^T F_j = S^{2/N} (padded) holds exactly. Each hidden space is
    then turned by a seeded random rotation Q_j (F_j <- Q_{j-1}^T F_j Q_j, `RandomRotation`),
    which keeps the product and the balancedness and avoids a chain of exactly zero columns.

    If a hidden width h is smaller than the rank of the kernel, the chain can only hold the
    kernel's best rank-h approximation (its top h singular values); that is what it holds.

    Args:
        kernel: array of shape (inputs, units).
        hidden_units: sequence of depth - 1 positive ints, the hidden widths.
        rotation_seed: int or None, seeds the hidden-space rotations.

    Returns:
        A list of depth float64 NumPy arrays, input side first.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2:
        raise ValueError(f"`kernel` must be 2-D (inputs, units), got shape {kernel.shape}.")
    if not len(hidden_units):
        return [kernel.copy()]
    return balanced_factors_from_svd(np.linalg.svd(kernel, full_matrices=False), hidden_units, rotation_seed)


def balanced_chain(kernel, hidden_units, rotation_seed=None, dtype="float64"):
    """`balanced_factors` of a 2-D kernel, and the kernel's `numerical_rank`.

    A kernel whose singular values all lie well above rounding takes the Gram route: the
    eigendecomposition of its smaller Gram matrix (K^T K = B diag(s^2) B^T for a tall K) gives
    s and B, and the factor on the long side is K times a small matrix (K B diag(s^{1/N - 1}),
    rotated), one product, so that the left singular vectors A = K B diag(1/s) are never formed
    (`_gram_chain`). The Gram matrix is formed in float64, whose eigenvalues are then off by at most about
    rows * cols * eps * s_max^2; the route is taken only when every s^2 exceeds twice that, so
    every s is far above `numerical_rank`'s tolerance, the rank is min(rows, cols) as the SVD
    would give, and the product of the factors is K B B^T = K up to rounding. Any other kernel
    (ill-conditioned, rank-deficient, zero, non-finite) takes `np.linalg.svd` in float64. The two
    routes agree up to rounding and the signs of singular vector pairs, which the hidden-space
    rotations absorb.

    Args:
        kernel: array of shape (inputs, units).
        hidden_units: sequence of depth - 1 >= 1 positive ints, the hidden widths.
        rotation_seed: int or None, seeds the hidden-space rotations.
        dtype: the dtype of the returned factors. The product on the long side is taken in it.

    Returns:
        (a list of depth arrays of `dtype`, input side first; the rank of `kernel`).
    """
    matrix = np.asarray(kernel, dtype=np.float64)
    if matrix.ndim != 2 or not len(hidden_units):
        raise ValueError(f"`kernel` must be 2-D and `hidden_units` non-empty, got {matrix.shape} and {hidden_units!r}.")
    dtype = np.dtype(dtype)
    spectrum = _gram_spectrum(matrix)
    if spectrum is None:
        svd = np.linalg.svd(matrix, full_matrices=False)
        factors = balanced_factors_from_svd(svd, hidden_units, rotation_seed)
        return [f.astype(dtype, copy=False) for f in factors], numerical_rank(svd[1], matrix.shape)
    singular_values, vectors = spectrum
    hidden_units = [int(h) for h in hidden_units]
    original = np.asarray(kernel)
    long_side = original if original.dtype == dtype else matrix.astype(dtype, copy=False)
    return _gram_chain(long_side, singular_values, vectors, hidden_units, rotation_seed), len(singular_values)


def _gram_chain(long_side, singular_values, vectors, hidden_units, rotation_seed):
    """The factors of `balanced_factors_from_svd` for K = A S B^T given s and the smaller side's
    singular vectors only. For a tall K (rows >= cols): F_1 = K B S^{1/N - 1} = A S^{1/N}, so A is
    never formed. A wide K's chain is the transposed, reversed chain of K^T, with F_N = S^{1/N - 1}
    A^T K.

    The factor on K's long side is the one large product, taken in `long_side`'s dtype (K in the
    factors' dtype): where its hidden width equals the rank, K times the rotated small matrix;
    where it is wider (zero-padded), K times the unpadded small matrix, then padded and rotated,
    which skips the products with the padding. A wide K's factors are computed in their own
    orientation, so every factor comes out C-ordered.
    """
    dtype = long_side.dtype
    tall = long_side.shape[0] >= long_side.shape[1]
    long_rows = max(long_side.shape)
    widths = [long_rows, *(hidden_units if tall else hidden_units[::-1]), len(singular_values)]
    depth = len(widths) - 1
    rank = min(len(singular_values), *widths[1:-1])
    root = singular_values[:rank] ** (1.0 / depth)
    rng = np.random.default_rng(rotation_seed)
    rotations = [RandomRotation(width, rng) for width in widths[1:-1]]  # drawn in `balanced_factors_from_svd`'s order
    first = vectors[:, :rank] * (root / singular_values[:rank])  # (K B S^{1/N - 1} = K times this)
    if widths[1] == rank:
        small = rotations[0].right_multiply(first).astype(dtype, copy=False)
        long_factor = long_side @ small if tall else small.T @ long_side
    elif tall:
        long_factor = rotations[0].right_multiply(_embed(long_side @ first.astype(dtype), (long_rows, widths[1])))
    else:
        long_factor = rotations[0].transpose_left_multiply(_embed(first.T.astype(dtype) @ long_side, widths[1::-1]))
    factors = []
    for j in range(1, depth - 1):
        middle = rotations[j - 1].transpose_left_multiply(_embed(np.diag(root), (widths[j], widths[j + 1])))
        factors.append(rotations[j].right_multiply(middle))
    factors.append(rotations[-1].transpose_left_multiply(_embed(root[:, None] * vectors[:, :rank].T, widths[-2:])))
    if tall:
        return [long_factor, *(f.astype(dtype, copy=False) for f in factors)]
    return [*(np.ascontiguousarray(f.T, dtype=dtype) for f in reversed(factors)), long_factor]


def _embed(block, shape):
    """`block` in the top-left corner of a zero matrix of `shape` (its dtype)."""
    padded = np.zeros(shape, dtype=block.dtype)
    padded[: block.shape[0], : block.shape[1]] = block
    return padded


def _gram_spectrum(matrix):
    """(s descending, the smaller side's singular vectors as columns) of a float64 matrix from
    its smaller Gram matrix, or None where its eigenvalues cannot be trusted to resolve every s
    (see `balanced_chain`)."""
    rows, cols = matrix.shape
    if not matrix.size or not np.all(np.isfinite(matrix)):
        return None
    gram = matrix.T @ matrix if rows >= cols else matrix @ matrix.T
    eigenvalues, vectors = np.linalg.eigh(gram)  # ascending
    error = rows * cols * np.finfo(np.float64).eps * eigenvalues[-1]
    if not eigenvalues[-1] > 0 or not eigenvalues[0] > 2.0 * error:
        return None
    return np.sqrt(eigenvalues[::-1]), vectors[:, ::-1]


def numerical_rank(singular_values, shape):
    """The rank NumPy's `matrix_rank` gives a matrix of this shape and these singular values
    (those above s_max * max(shape) * eps)."""
    singular_values = np.asarray(singular_values)
    if not singular_values.size:
        return 0
    tolerance = singular_values.max() * max(shape) * np.finfo(singular_values.dtype).eps
    return int(np.count_nonzero(singular_values > tolerance))


def balanced_factors_from_svd(svd, hidden_units, rotation_seed=None):
    """`balanced_factors` of the kernel whose thin SVD (A, s, B^T) is given (float64 arrays)."""
    left, singular_values, right_t = svd
    widths = [left.shape[0], *[int(h) for h in hidden_units], right_t.shape[1]]
    depth = len(widths) - 1
    if depth == 1:
        return [(left * singular_values) @ right_t]  # `balanced_factors` returns the kernel itself
    rank = min(len(singular_values), *widths[1:-1])
    root = singular_values[:rank] ** (1.0 / depth)

    factors = [_embed(left[:, :rank] * root, (widths[0], widths[1]))]
    for j in range(1, depth - 1):
        factors.append(_embed(np.diag(root), (widths[j], widths[j + 1])))
    factors.append(_embed(root[:, None] * right_t[:rank], (widths[-2], widths[-1])))

    rng = np.random.default_rng(rotation_seed)
    for j in range(1, depth):
        rotation = RandomRotation(widths[j], rng)
        factors[j - 1] = rotation.right_multiply(factors[j - 1])
        factors[j] = rotation.transpose_left_multiply(factors[j])
    return factors


class RandomRotation:
    """A seeded random orthogonal matrix in factored form, Q = P D H_1 ... H_k: a random
    permutation P, random signs D and k Householder reflections H_i = I - 2 v_i v_i^T with
    random unit v_i. Exactly orthogonal (up to float rounding), and applied to an (m, n)
    matrix in O(k m n) operations, where a dense Q would cost O(n^3) to draw and O(m n^2) to
    apply. The reflections mix every coordinate, so zero-padded columns do not stay zero.

    Args:
        size: int n, the side of Q.
        rng: a `numpy.random.Generator`.
        reflections: int k >= 0, the number of Householder reflections.
    """

    def __init__(self, size, rng, reflections=2):
        self.permutation = rng.permutation(size)
        self.signs = rng.choice(np.array([-1.0, 1.0]), size=size)
        vectors = rng.standard_normal((reflections, size))
        self.vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(float).tiny)
        # Compact WY form H_1 ... H_k = I - V T V^T (V = the v_i as columns, T upper triangular): the
        # reflections are applied as two thin products, one pass over the matrix instead of 3k.
        gram = self.vectors @ self.vectors.T
        self._wy = np.zeros((reflections, reflections))
        for i in range(reflections):
            self._wy[:i, i] = -2.0 * self._wy[:i, :i] @ gram[:i, i]
            self._wy[i, i] = 2.0

    def right_multiply(self, matrix):
        """X Q, for X of shape (m, n), in X's float dtype."""
        result = np.take(matrix, self.permutation, axis=1)
        result *= self.signs.astype(result.dtype)
        if len(self.vectors):
            v, t = self.vectors.astype(result.dtype), self._wy.astype(result.dtype)
            result -= ((result @ v.T) @ t) @ v
        return result

    def transpose_left_multiply(self, matrix):
        """Q^T Y, for Y of shape (n, m), in Y's float dtype."""
        result = np.take(matrix, self.permutation, axis=0)
        result *= self.signs.astype(result.dtype)[:, None]
        if len(self.vectors):
            v, t = self.vectors.astype(result.dtype), self._wy.astype(result.dtype)
            result -= v.T @ (t.T @ (v @ result))
        return result

    def matrix(self):
        """Q as a dense (n, n) array."""
        return self.right_multiply(np.eye(len(self.permutation)))
