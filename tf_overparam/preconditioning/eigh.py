"""P(W) from the eigendecomposition of the small Gram matrix, at any depth.

For W oriented tall (a >= b; eq. 10 of the paper commutes with transposition) take
A = W^T W = V diag(lambda) V^T (b x b) instead of an SVD of W. With B = W V, whose columns are
s_r u_r (so U is never formed and W's left null space needs no basis), the direction of eq. 10
of the paper (the write-up's eq. 24) is

    P(W) G = G V diag(t) V^T + B (M o (B^T G V)) V^T,
    t_r = lambda_r^{(N-1)/N},   M = sum_{j=2..N} m_j c_j^T,
    m_{j,r} = lambda_r^{(j-1)/N - 1},   c_{j,r} = lambda_r^{(N-j)/N}.

The first part is the j = 1 term G [W^T W]^{(N-1)/N}, the one reaching W's left null space
([W W^T]^0 = I there); the second holds the terms j >= 2, U S^{2(j-1)/N} U^T G V S^{2(N-j)/N} V^T
with U = B S^{-1}. On the null space of W^T W, 0^0 = 1 (the j = N term keeps G's component there)
and m_j is 0. Building P costs one Gram product, one b x b eigh and B = W V; applying it four
products of G's size, or three and three b x b ones for a kernel more than `DIRECT_FORM_ASPECT`
times taller than wide.

Precision. A float64 kernel is computed in float64. A float32 kernel forms its Gram matrix in
float32: the Gram squares the condition number, and the eigenvalues it loses are the small ones,
whose fractional powers weigh most at large depth. So from depth `FLOAT64_EIGH_FROM_DEPTH` on
(and at every depth where the backend's float32 eigh is less accurate,
`backend.accurate_float32_eigh`) the b x b eigh runs in float64 where the backend has it. JAX
has float64 only with `jax.config.update("jax_enable_x64", True)`; without it everything runs in
float32, less accurately. float16 and bfloat16 kernels are computed in float32.
"""

from typing import NamedTuple

from keras import ops

from tf_overparam import backend
from tf_overparam.preconditioning._matrices import rank_tolerance, transpose

# From this depth on a float32 kernel's Gram matrix is eigendecomposed in float64: a float32 eigh
# loses the small eigenvalues whose fractional powers dominate at depth 4 and beyond.
FLOAT64_EIGH_FROM_DEPTH = 4

# A kernel this many times taller than wide (oriented) takes the direct form G Q1 + W Q2 in
# `direction`: three products of G's size and five b x b ones, against five of G's size (B = W V
# and the four of `apply_preconditioner`); 5 b^3 < 2 a b^2 when a > 2.5 b. Past it
# `apply_preconditioner` also regroups its products, to three of G's size and three b x b ones.
DIRECT_FORM_ASPECT = 2.5


class Preconditioner(NamedTuple):
    """P(W) of eq. 11 of the paper (the write-up's eq. 26) in its eigenbasis form, for W oriented
    tall (a >= b; W^T when wider than tall). Any depth; `compute_preconditioner` returns it at
    every depth but 2 (where it returns a `RootPreconditioner`), and `apply_preconditioner`
    applies it at any depth.

    Fields (leading batch axes allowed): `projected_kernel` B = W V (a, b); `basis` V (b, b),
    the eigenvectors of W^T W; `direct_weights` t (1, b); `cross_weights` (N - 1, 2, b), the pairs
    (m_j, c_j) whose outer products sum to M (module docstring). t is NaN where the kernel held
    inf or NaN, so the direction is NaN there.
    """

    projected_kernel: object
    basis: object
    direct_weights: object
    cross_weights: object


def eigh_dtype(dtype, depth):
    """The dtype of the b x b eigh for a kernel computed in `dtype` at `depth` (module docstring)."""
    wide = dtype == "float64" or depth >= FLOAT64_EIGH_FROM_DEPTH or not backend.accurate_float32_eigh()
    return "float64" if wide and backend.float64_available() else "float32"


def gram_spectrum(w, depth, gram=None):
    """(lambda, V, finite) of A = W^T W for `w` (..., a, b) oriented tall, in w's dtype.

    Eigenvalues at or below `rank_tolerance` of the largest are exact zeros. `finite` (...) says
    where A is finite: a kernel holding inf or NaN, or one whose W^T W overflows, has a
    non-finite Gram diagonal, so the Gram alone tells (no pass over the kernel); it is zeroed
    for the eigh. `gram`: W^T W if already formed. A single column takes lambda = ||w||^2,
    V = 1 (eq. 12 of the paper), no decomposition.
    """
    dtype = w.dtype
    rows, cols = w.shape[-2], w.shape[-1]
    if cols == 1:
        eigenvalues = ops.sum(ops.square(w), axis=(-2, -1))[..., None]
        finite = ops.isfinite(eigenvalues[..., 0])
        eigenvalues = ops.where(finite[..., None], eigenvalues, ops.zeros_like(eigenvalues))
        return eigenvalues, ops.ones(ops.shape(w)[:-2] + (1, 1), dtype), finite
    gram = ops.matmul(transpose(w), w) if gram is None else gram
    gram = ops.cast(gram, eigh_dtype(dtype, depth))
    finite = ops.all(ops.isfinite(gram), axis=(-2, -1))
    gram = ops.where(finite[..., None, None], gram, ops.zeros_like(gram))
    eigenvalues, basis = ops.eigh(gram)
    noise = rank_tolerance(rows, cols, dtype) * ops.max(eigenvalues, axis=-1, keepdims=True)
    eigenvalues = ops.where(eigenvalues > noise, eigenvalues, ops.zeros_like(eigenvalues))
    return eigenvalues, ops.cast(basis, dtype), finite


def _weights(eigenvalues, depth):
    """t = lambda^{(N-1)/N} (..., 1, b) and the pairs (m_j, c_j) (..., N - 1, 2, b) (0^0 = 1)."""
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
    """V diag(weights) V^T (..., b, b), `weights` (..., 1, b)."""
    return ops.matmul(basis * weights, transpose(basis))


def _spectrum_weights(w, depth, gram=None):
    """(V, t, pairs) in w's dtype; t is NaN where the kernel is not finite."""
    eigenvalues, basis, finite = gram_spectrum(w, depth, gram)
    direct, cross = (ops.cast(x, w.dtype) for x in _weights(eigenvalues, depth))
    direct = ops.where(finite[..., None, None], direct, ops.full_like(direct, float("nan")))
    return basis, direct, cross


def eigen_preconditioner(w, depth, gram=None):
    """The `Preconditioner` of `w` (..., a, b) oriented tall, in w's dtype."""
    basis, direct, cross = _spectrum_weights(w, depth, gram)
    return Preconditioner(ops.matmul(w, basis), basis, direct, cross)


def apply_eigen(preconditioner, g):
    """P(W) G for `g` oriented tall and cast to the preconditioner's dtype, any depth."""
    projected, basis, direct, cross = preconditioner
    if projected.shape[-2] > DIRECT_FORM_ASPECT * projected.shape[-1]:
        # Much taller than wide: G (V diag(t) V^T) + B ((M o (B^T G V)) V^T), three products of
        # G's size and three b x b ones, against the four of G's size below.
        inner = _cross_matrix(cross) * ops.matmul(ops.matmul(transpose(projected), g), basis)
        return ops.matmul(g, _eigen_matrix(basis, direct)) + ops.matmul(projected, ops.matmul(inner, transpose(basis)))
    g_basis = ops.matmul(g, basis)
    inner = _cross_matrix(cross) * ops.matmul(transpose(projected), g_basis)
    return ops.matmul(g_basis * direct + ops.matmul(projected, inner), transpose(basis))


def direction(w, g, depth, gram=None):
    """P(W) G for `w` and `g` oriented tall in one dtype, any depth >= 2: through the
    `Preconditioner`, or for a kernel more than `DIRECT_FORM_ASPECT` times taller than wide as
    G Q1 + W Q2 with Q1 = V diag(t) V^T and Q2 = V (M o (V^T (W^T G) V)) V^T, the same sum
    without forming B = W V."""
    if w.shape[-2] <= DIRECT_FORM_ASPECT * w.shape[-1]:
        return apply_eigen(eigen_preconditioner(w, depth, gram), g)
    basis, direct, cross = _spectrum_weights(w, depth, gram)
    basis_t = transpose(basis)
    w_g = ops.matmul(transpose(w), g)  # independent of the eigh: may run beside it
    left = ops.matmul(ops.matmul(basis, _cross_matrix(cross) * ops.matmul(ops.matmul(basis_t, w_g), basis)), basis_t)
    return ops.matmul(g, _eigen_matrix(basis, direct)) + ops.matmul(w, left)


def square_roots(w, gram=None):
    """(A^{1/2}, A^{+1/2}) of A = W^T W for `w` oriented tall, in w's dtype: the two roots that
    depth 2 needs. A^{+1/2} is the pseudo-inverse root (0 on the null space); A^{1/2} is NaN where
    the kernel is not finite."""
    eigenvalues, basis, finite = gram_spectrum(w, 2, gram)
    positive = eigenvalues > 0
    root = ops.cast(ops.sqrt(eigenvalues), w.dtype)[..., None, :]
    safe = ops.where(positive, eigenvalues, ops.ones_like(eigenvalues))
    inverse = ops.where(positive, 1 / ops.sqrt(safe), ops.zeros_like(eigenvalues))
    root = ops.where(finite[..., None, None], root, ops.full_like(root, float("nan")))
    return _eigen_matrix(basis, root), _eigen_matrix(basis, ops.cast(inverse, w.dtype)[..., None, :])
