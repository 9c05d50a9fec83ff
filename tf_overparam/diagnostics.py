"""Diagnostics of a factor chain: balancedness and the end-to-end spectrum."""

import dataclasses

import numpy as np
from keras import ops

from tf_overparam.chain import chain_product


@dataclasses.dataclass(frozen=True)
class Balancedness:
    """max_j ||F_{j+1} F_{j+1}^T - F_j^T F_j||_F, absolute and relative to the largest Gram norm.

    In the paper's layout this is max_j ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F; 0 means the chain
    is balanced, the condition under which deep gradient descent follows eq. 24.
    """

    absolute: float
    relative: float


def chain_balancedness(factors):
    """Balancedness of a chain given as tensors (..., n_{j-1}, n_j); batch dims are kept.

    Returns:
        (absolute, relative) tensors of the batch shape; zero for a chain of one factor.
    """
    absolute = relative_scale = ops.zeros(ops.shape(factors[0])[:-2], dtype=factors[0].dtype)
    for inner, outer in zip(factors[:-1], factors[1:]):
        outer_gram = ops.matmul(outer, ops.swapaxes(outer, -1, -2))
        inner_gram = ops.matmul(ops.swapaxes(inner, -1, -2), inner)
        gap = ops.sqrt(ops.sum(ops.square(outer_gram - inner_gram), axis=(-2, -1)))
        scale = ops.maximum(
            ops.sqrt(ops.sum(ops.square(outer_gram), axis=(-2, -1))),
            ops.sqrt(ops.sum(ops.square(inner_gram), axis=(-2, -1))),
        )
        absolute = ops.maximum(absolute, gap)
        relative_scale = ops.maximum(relative_scale, scale)
    relative = ops.where(relative_scale > 0, absolute / ops.maximum(relative_scale, 1e-30), 0.0)
    return absolute, relative


def balancedness(layer):
    """Balancedness of an `OverparamDense` layer (or a list of factor arrays).

    Example:

    >>> from tf_overparam import OverparamDense, initializers
    >>> layer = OverparamDense(1, depth=3, factor_initializer=initializers.Balanced(seed=0))
    >>> layer.build((None, 4))
    >>> balancedness(layer).relative < 1e-5
    True
    """
    factors = [ops.convert_to_tensor(f, dtype="float64") for f in _factors_of(layer)]
    absolute, relative = chain_balancedness(factors)
    return Balancedness(float(absolute), float(relative))


def end_to_end_singular_values(layer):
    """Singular values of the end-to-end kernel, descending, as a float64 NumPy array."""
    kernel = ops.convert_to_numpy(chain_product([ops.convert_to_tensor(f) for f in _factors_of(layer)]))
    return np.linalg.svd(kernel.astype(np.float64), compute_uv=False)


def _factors_of(layer):
    return list(layer.factors) if hasattr(layer, "factors") else list(layer)
