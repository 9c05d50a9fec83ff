"""Sharpness of a whole grid at once: the largest eigenvalue of every grid point's Hessian.

For full-batch gradient descent at rate eta, eta x sharpness is the quantity to watch: on a
quadratic GD diverges exactly when it exceeds 2, and on a deep model sharpness rises while
training until eta x sharpness meets 2, the "edge of stability" (Cohen et al., "Gradient
Descent on Neural Networks Typically Occurs at the Edge of Stability", ICLR 2021).

The grid's points never mix, so the Hessian of the SUM of their losses with respect to the
stacked factors is block diagonal, one block per grid point: one Hessian-vector product of the
summed loss gives every grid point's product at once. The Lanczos iteration (Lanczos 1950; with
full reorthogonalisation, Parlett, "The Symmetric Eigenvalue Problem", ch. 13) then runs on all
grid points together, with per-grid-point inner products and norms: its vectors are stacked
(grid, dimension) and its tridiagonal matrices (grid, k, k). Lanczos, not power iteration, as
in `tf_overparam.hessian`: it gives the largest algebraic eigenvalue (not the largest in
magnitude, which near a saddle may be a negative one) and is exact once its steps reach the
dimension.

The Hessian-vector products are forward over backward: a `tf.autodiff.ForwardAccumulator`
around a gradient function, compiled once.
"""

import math

import numpy as np
import tensorflow as tf

# Relative size of a Lanczos residual below which the Krylov space counts as exhausted.
BREAKDOWN = 1e-12


def batched_hessian_product(gradients, variables):
    """A compiled function: (grid, dimension) float64 array -> the same array of H_g v_g.

    Args:
        gradients: function of a list of tensors shaped like `variables` returning the list
            of gradients of the summed loss (grid point g's loss depends on the g-th slices
            of the variables only).
        variables: the stacked trained variables, each (grid, ...); the products are taken at
            their values at call time.

    A grid point's vector is its slices of the variables, flattened and concatenated in order.
    """
    shapes = [tuple(v.shape[1:]) for v in variables]
    sizes = [math.prod(s) for s in shapes]
    grid, dtype = int(variables[0].shape[0]), variables[0].dtype
    zero = tf.UnconnectedGradients.ZERO

    @tf.function
    def product(vectors):
        parts = tf.split(vectors, sizes, axis=1)
        tangents = [tf.reshape(part, [grid, *shape]) for part, shape in zip(parts, shapes)]
        primals = [tf.convert_to_tensor(v) for v in variables]
        with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
            outputs = gradients(primals)
        return tf.concat([tf.reshape(accumulator.jvp(g, zero), [grid, -1]) for g in outputs], axis=1)

    def apply(vectors):
        return product(tf.constant(vectors, dtype=dtype)).numpy().astype(np.float64)

    return apply


def _orthogonalised(vectors, basis):
    """`vectors` (grid, d) minus their projections on the orthonormal rows of `basis`
    (grid, k, d), twice: twice is enough to stay orthogonal to rounding (Parlett)."""
    for _ in range(2):
        vectors = vectors - np.einsum("gkd,gk->gd", basis, np.einsum("gkd,gd->gk", basis, vectors))
    return vectors


def _unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def top_eigenvalues(product, grid, dimension, iterations=20, seed=0):
    """The largest eigenvalue of each of `grid` symmetric operators, by batched Lanczos.

    Args:
        product: function of a (grid, dimension) array V returning the (grid, dimension) array
            whose row g is H_g V_g.
        grid, dimension: the number of operators and their dimension.
        iterations: the most products; no more than `dimension` are taken (the Krylov space is
            then the whole space and the values are exact up to rounding).
        seed: seed of the Gaussian start vectors (one per grid point).

    Returns:
        float64 array (grid,), NaN where a product was not finite. Where a grid point's Krylov
        space is exhausted before the others' (a residual below `BREAKDOWN` of its scale), its
        iteration restarts from a fresh random vector orthogonal to its basis (a zero coupling
        in its tridiagonal matrix), so the batch keeps one shape and each value stays a Ritz
        value of its own operator.
    """
    rng = np.random.default_rng(seed)
    steps = min(int(iterations), int(dimension))
    basis = np.zeros((grid, steps, dimension))
    alphas, betas = np.zeros((grid, steps)), np.zeros((grid, max(steps - 1, 0)))
    finite = np.ones(grid, dtype=bool)
    vectors = _unit(rng.standard_normal((grid, dimension)))
    with np.errstate(invalid="ignore", over="ignore"):
        for step in range(steps):
            basis[:, step] = vectors
            products = product(vectors)
            finite &= np.all(np.isfinite(products), axis=1)
            products[~finite] = 0.0  # a diverged point's zeros keep the others' arithmetic clean
            alphas[:, step] = np.einsum("gd,gd->g", vectors, products)
            if step + 1 == steps:
                break
            residual = _orthogonalised(products, basis[:, : step + 1])
            beta = np.linalg.norm(residual, axis=1)
            scale = np.maximum(np.abs(alphas[:, : step + 1]).max(axis=1), betas[:, :step].max(axis=1, initial=0.0))
            exhausted = beta <= BREAKDOWN * scale
            fresh = _orthogonalised(rng.standard_normal((grid, dimension)), basis[:, : step + 1])
            betas[:, step] = np.where(exhausted, 0.0, beta)
            vectors = _unit(np.where(exhausted[:, None], fresh, residual))
    tridiagonal = np.zeros((grid, steps, steps))
    index = np.arange(steps)
    tridiagonal[:, index, index] = alphas
    tridiagonal[:, index[:-1], index[1:]] = betas
    tridiagonal[:, index[1:], index[:-1]] = betas
    values = np.linalg.eigvalsh(tridiagonal)[:, -1]
    return np.where(finite, values, np.nan)
