"""The floor of the end-to-end step at depth 2: the products eq. 24 cannot avoid, in `keras.ops`.

For a kernel W oriented tall (a x b, a >= b) with gradient G, eq. 24 at depth 2 is

    G A^{1/2} + W A^{-1/2} W^T G,   A = W^T W = V diag(lambda) V^T,

since [W W^T]^{1/2} = W A^{-1/2} W^T. With B = W V and m = lambda^{-1/2} the second term is
B diag(m) B^T G. So the step splits into

- a refresh (`refresh_products`): the Gram matrix A (a b^2 multiply-adds), its `eigh`, B = W V
  (a b^2) and R = A^{1/2} = V diag(lambda^{1/2}) V^T (b^3);
- an apply (`apply_products`): G R + B (m o B^T G), three products of a b^2.

The exact rule does both every step; the amortised rule (`refresh_every=k`) does the apply every
step and a refresh every k-th. Kernels of one shape are stacked and done in one batched call
(`stacked_by_shape`), the arrangement no per-kernel loop beats. A full-rank W is assumed: no
rounding mask and no finiteness check, which the library's step adds.
"""

import collections

from keras import ops


def _t(x):
    return ops.swapaxes(x, -1, -2)


def refresh_products(w):
    """(B, R, m) of the tall kernels `w` (..., a, b): B = W V, R = A^{1/2}, m = lambda^{-1/2}."""
    eigenvalues, basis = ops.eigh(ops.matmul(_t(w), w))
    root = ops.sqrt(eigenvalues)
    return ops.matmul(w, basis), ops.matmul(basis * root[..., None, :], _t(basis)), 1.0 / root


def apply_products(preconditioner, g):
    """G R + B (m o B^T G) for the tall gradients `g` (..., a, b) and a kept (B, R, m)."""
    projected, root, inverse = preconditioner
    return ops.matmul(g, root) + ops.matmul(projected, inverse[..., :, None] * ops.matmul(_t(projected), g))


def floor_direction(w, g):
    """Eq. 24 at depth 2 of one kernel in either orientation, through the floor's products only."""
    wide = w.shape[-2] < w.shape[-1]
    if wide:
        w, g = _t(w), _t(g)
    direction = apply_products(refresh_products(w), g)
    return _t(direction) if wide else direction


def stacked_by_shape(matrices):
    """Groups 2-D arrays by their tall shape (a >= b, transposing wider ones) and stacks each
    group: a list of (n, a, b) NumPy arrays, largest group first."""
    import numpy as np

    groups = collections.defaultdict(list)
    for matrix in matrices:
        matrix = np.asarray(matrix)
        groups[max(matrix.shape), min(matrix.shape)].append(matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T)
    return [np.stack(group) for _, group in sorted(groups.items(), key=lambda item: -len(item[1]))]


def floor_products(stacks):
    """Multiply-adds of one apply and of one refresh's products (eigh excluded) of `stacks`."""
    apply = sum(3 * s.shape[0] * s.shape[1] * s.shape[2] ** 2 for s in stacks)
    refresh = sum(s.shape[0] * (2 * s.shape[1] * s.shape[2] ** 2 + s.shape[2] ** 3) for s in stacks)
    return {"apply_multiply_adds": apply, "refresh_multiply_adds_without_eigh": refresh}


def floor_cases(stacks, rate=1e-3, unroll=1):
    """Three compiled loops over every group at once, each step W <- W - rate D with
    G(W) = G + 1e-3 W (so that no step's work is loop-invariant and hoisted):

    - "exact": D = eq. 24 from the current W (refresh and apply);
    - "apply": D = apply of the preconditioner of the starting W (amortised, between refreshes);
    - "refresh": D = G, plus a refresh of the current W whose outputs enter with a weight of
      1e-30 (not 0, which a graph optimizer may fold away with the refresh).
    """
    import numpy as np

    from benchmarks.timing import compiled_loop

    rng = np.random.default_rng(0)
    kernels = tuple(ops.convert_to_tensor(s.astype("float32")) for s in stacks)
    grads = tuple(ops.convert_to_tensor(rng.normal(scale=0.01, size=s.shape).astype("float32")) for s in stacks)
    kept = tuple(refresh_products(w) for w in kernels)

    def loop(direction):
        def step(state):
            return tuple(w - rate * direction(i, w, g + 1e-3 * w) for i, (w, g) in enumerate(zip(state, grads)))

        return compiled_loop(step, kernels, unroll)

    def refreshed(i, w, g):
        return g + 1e-30 * sum(ops.sum(x) for x in refresh_products(w))

    return {
        "exact": loop(lambda i, w, g: apply_products(refresh_products(w), g)),
        "apply": loop(lambda i, w, g: apply_products(kept[i], g)),
        "refresh": loop(refreshed),
    }
