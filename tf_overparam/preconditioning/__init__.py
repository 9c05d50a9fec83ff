"""The end-to-end update direction (eq. 10 of the paper; the write-up's eq. 24) and its
preconditioner (eq. 11; the write-up's eq. 26), in `keras.ops`.

Gradient descent with step eta on a balanced depth-N chain moves the end-to-end matrix W as

    W <- (1 - eta lambda N) W - eta sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N},

G = dL_1/dW. The sum is `end_to_end_direction(W, G, N)` = P(W) G, with P(W) the preconditioner of
eq. 11. It commutes with transposition, direction(W^T, G^T) = direction(W, G)^T, so Keras'
(inputs, units) kernels are used as they are, and every form works on W oriented tall (a >= b).
Every function takes leading batch axes: a stack of kernels of one matrix shape is computed in
one call (one batched eigh, or one batched Newton-Schulz iteration), and traces inside compiled
functions.

The forms, one module each:

- a kernel with a side of 1 (a single output) takes the closed form of eq. 12 of the paper (the
  write-up's eq. 27), here: ||w||^{2-2/N} (g + (N-1) <g, w>/||w||^2 w), no decomposition;
- `eigh`: the eigendecomposition of the b x b Gram matrix W^T W, at any depth;
- `newton_schulz`: at depth 2 the direction is G A^{1/2} + W A^{-1/2} (W^T G), A = W^T W
  ([W W^T]^{1/2} = W A^{-1/2} W^T), and the coupled Newton-Schulz iteration gives both roots by
  matmuls alone where A is well conditioned;
- `reference`: P written out as a matrix, and its eigenvalues, for checking.

`method` chooses: "eigh"; "newton_schulz" (depth 2 only) tries the iteration and falls back to
the eigh where it does not converge; "auto" tries it at depth 2 where `auto_tries_newton_schulz`
says it pays (kernels whose smaller side is at least `NEWTON_SCHULZ_MIN_COLUMNS`, computed on an
accelerator), and takes the eigh otherwise. With `return_info=True` the method that ran is
returned too (`PreconditioningInfo`), as a tensor: the fallback is decided at run time, inside a
compiled function.

Amortised use (Shampoo-style): keep the preconditioner of a kernel W_r for k steps
(`compute_preconditioner`) and apply it to each new gradient (`apply_preconditioner`),
D_t = P(W_r) G_t; a step in between costs the products with G only.
`tf_overparam.optimizers.EndToEnd(refresh_every=k)` does that.
"""

import functools
from typing import NamedTuple

import keras
from keras import ops

from tf_overparam.preconditioning import eigh, newton_schulz
from tf_overparam.preconditioning._matrices import compute_dtype, oriented, transpose
from tf_overparam.preconditioning.eigh import DIRECT_FORM_ASPECT, FLOAT64_EIGH_FROM_DEPTH, Preconditioner
from tf_overparam.preconditioning.newton_schulz import (
    LANCZOS_STEPS,
    SquareRoots,
    lanczos_extremes,
    newton_schulz_square_roots,
    slowest_converging_ratio,
)
from tf_overparam.preconditioning.newton_schulz import MAX_STEPS as NEWTON_SCHULZ_MAX_STEPS
from tf_overparam.preconditioning.newton_schulz import SPARE_STEPS as NEWTON_SCHULZ_SPARE_STEPS
from tf_overparam.preconditioning.reference import preconditioner_eigenvalues, preconditioner_matrix
from tf_overparam.validation import METHODS, check_depth, check_method

__all__ = [
    "DIRECT_FORM_ASPECT",
    "FLOAT64_EIGH_FROM_DEPTH",
    "LANCZOS_STEPS",
    "METHODS",
    "NEWTON_SCHULZ_MAX_STEPS",
    "NEWTON_SCHULZ_MIN_COLUMNS",
    "NEWTON_SCHULZ_SPARE_STEPS",
    "RAN_METHODS",
    "RootPreconditioner",
    "Preconditioner",
    "PreconditioningInfo",
    "SquareRoots",
    "apply_preconditioner",
    "auto_tries_newton_schulz",
    "compute_preconditioner",
    "end_to_end_direction",
    "lanczos_extremes",
    "newton_schulz_square_roots",
    "preconditioner_eigenvalues",
    "preconditioner_matrix",
    "preconditioner_shapes",
    "slowest_converging_ratio",
]


# What `PreconditioningInfo.method` indexes: the method that ran.
RAN_METHODS = ("gradient", "closed_form", "eigh", "newton_schulz")
_GRADIENT, _CLOSED_FORM, _EIGH, _NEWTON_SCHULZ = range(4)

# On an accelerator, "auto" tries Newton-Schulz at depth 2 from this smaller side on. Below it the
# Lanczos estimate's many small operations weigh against an eigh that is cheap at that size anyway.
NEWTON_SCHULZ_MIN_COLUMNS = 256


@functools.cache
def _on_accelerator():
    """Whether Keras computes on an accelerator (GPU, TPU) in this process, asked once."""
    try:
        devices = keras.distribution.list_devices()
    except AttributeError:  # a backend without Keras' distribution API (torch, numpy): the CPU's rule
        return False
    return any(not device.lower().startswith("cpu") for device in devices)


def auto_tries_newton_schulz(columns):
    """Whether `method="auto"` tries Newton-Schulz at depth 2 for a kernel whose smaller side is
    `columns`, rather than taking the eigh: from `NEWTON_SCHULZ_MIN_COLUMNS` columns on, and only
    where the computation runs on an accelerator (`keras.distribution.list_devices()`). There the
    eigendecomposition is the slow part and the iteration's matmuls are cheap. On a CPU a batched
    eigh costs the same as the iteration or less at the shapes of real models' kernels (the
    performance page measures it), so "auto" takes the eigh there. A Python bool, decided when
    the step is traced."""
    return columns >= NEWTON_SCHULZ_MIN_COLUMNS and _on_accelerator()


class PreconditioningInfo(NamedTuple):
    """What ran, returned with `return_info=True`.

    Fields: `method`, an int32 scalar tensor indexing `RAN_METHODS` ("gradient" at depth 1,
    "closed_form" for a single output, "eigh", "newton_schulz"); for a batch, one method ran for
    all of it.
    """

    method: object

    @property
    def method_name(self):
        """The method's name (needs a concrete `method`, i.e. outside a compiled function)."""
        return RAN_METHODS[int(ops.convert_to_numpy(self.method))]


class RootPreconditioner(NamedTuple):
    """P(W) at depth 2, for W oriented tall (a >= b; W^T when wider than tall): `kernel` W
    (a, b), `root` R = A^{1/2} and `inverse_root` Z = A^{+1/2} (b, b), A = W^T W, the
    pseudo-inverse root being 0 on A's null space. Leading batch axes allowed.

    P(W) G = G R + W (Z (W^T G)), since [W W^T]^{1/2} = W Z W^T: three products of G's size and
    one b x b, the same products as `end_to_end_direction` at depth 2, so computing it and
    applying it once costs what one direction costs. The roots come from the eigh or from
    Newton-Schulz. R is NaN where the kernel held inf or NaN, so the direction is NaN there.
    """

    kernel: object
    root: object
    inverse_root: object


def _code(value):
    return ops.convert_to_tensor(value, "int32")


def _check_kernel(kernel):
    kernel = ops.convert_to_tensor(kernel)
    if len(kernel.shape) < 2:
        raise ValueError(f"`kernel` must have at least 2 dimensions (..., a, b), got shape {tuple(kernel.shape)}.")
    return kernel


def _same_shape(expected, actual):
    return len(expected) == len(actual) and all(e is None or a is None or e == a for e, a in zip(expected, actual))


def _check_gradient(grad, shape, what):
    grad = ops.convert_to_tensor(grad)
    if not _same_shape(tuple(shape), tuple(grad.shape)):
        raise ValueError(
            f"`grad` (the gradient) must have the shape of {what}: {what} has shape {tuple(shape)}, "
            f"`grad` has shape {tuple(grad.shape)}."
        )
    return grad


def _with_info(result, code, return_info):
    return (result, PreconditioningInfo(code)) if return_info else result


def end_to_end_direction(kernel, grad, depth, method="auto", return_info=False):
    """sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}: eq. 10 of the paper (the write-up's eq. 24).

    The singular values of the null spaces are 0, and 0^0 = 1. A kernel with a side of 1 takes
    the closed form of eq. 12 whatever `method`. A kernel holding inf or NaN (or so large that
    W^T W overflows) gives a NaN direction, so divergence shows as usual.

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W; leading axes hold a stack of kernels.
        grad: tensor of the kernel's shape, the gradient G of the loss at W.
        depth: int >= 1, the depth N of the chain being emulated; depth 1 returns `grad`.
        method: "auto", "eigh" or "newton_schulz" (module docstring). "newton_schulz" needs
            depth <= 2; where the iteration does not converge (an ill-conditioned, rank-deficient,
            zero or non-finite kernel, or any such kernel in a stack) it falls back to the eigh,
            and `return_info` reports "eigh".
        return_info: also return a `PreconditioningInfo` saying which method ran.

    Returns:
        The direction, shaped like `kernel`, in `grad`'s dtype; with `return_info`, the pair
        (direction, info).
    """
    depth = check_depth(depth)
    method = check_method(method, depth)
    kernel = _check_kernel(kernel)
    grad = _check_gradient(grad, kernel.shape, "`kernel`")
    if depth == 1:
        return _with_info(grad, _code(_GRADIENT), return_info)
    if min(kernel.shape[-2:]) == 1:
        return _with_info(_single_output_direction(kernel, grad, depth), _code(_CLOSED_FORM), return_info)
    dtype = compute_dtype(kernel)
    w, _ = oriented(kernel, dtype)
    g, wide = oriented(grad, dtype)
    if depth == 2:
        root, inverse_root, code = _depth_two_roots(w, ops.matmul(transpose(w), w), method)
        direction = _apply_roots(RootPreconditioner(w, root, inverse_root), g)
    else:
        direction, code = eigh.direction(w, g, depth), _code(_EIGH)
    direction = ops.cast(transpose(direction) if wide else direction, grad.dtype)
    return _with_info(direction, code, return_info)


def compute_preconditioner(kernel, depth, method="auto", return_info=False):
    """P(W) of eq. 11 of the paper (the write-up's eq. 26) for `kernel`, to apply to later
    gradients with `apply_preconditioner`.

    Args:
        kernel: tensor (..., a, b), the end-to-end kernel W; leading axes hold a stack of kernels.
        depth: int >= 1, the depth N of the chain being emulated.
        method: as for `end_to_end_direction`; it matters at depth 2 only.
        return_info: also return a `PreconditioningInfo` saying which method ran.

    Returns:
        At depth 2 a `RootPreconditioner`, at any other depth a `Preconditioner`, both for W
        oriented tall and in the compute dtype (float64 for a float64 kernel, else float32);
        with `return_info`, the pair (preconditioner, info). `preconditioner_shapes` gives the
        fields' shapes without computing them.
    """
    depth = check_depth(depth)
    method = check_method(method, depth)
    kernel = _check_kernel(kernel)
    w, _ = oriented(kernel, compute_dtype(kernel))
    if depth != 2:
        code = _GRADIENT if depth == 1 else _CLOSED_FORM if w.shape[-1] == 1 else _EIGH
        return _with_info(eigh.eigen_preconditioner(w, depth), _code(code), return_info)
    if w.shape[-1] == 1:
        root, inverse_root = eigh.square_roots(w)
        code = _code(_CLOSED_FORM)
    else:
        root, inverse_root, code = _depth_two_roots(w, ops.matmul(transpose(w), w), method)
    return _with_info(RootPreconditioner(w, root, inverse_root), code, return_info)


def apply_preconditioner(preconditioner, grad):
    """P(W) G: the direction of eq. 10 of the paper for the gradient `grad` of the kernel that
    `preconditioner` was computed from (or, amortised, of a later kernel of the same shape).

    A `RootPreconditioner` (depth 2) costs three products of G's size and one b x b; a
    `Preconditioner` four of G's size, or three and three b x b ones for a kernel more than
    `DIRECT_FORM_ASPECT` times taller than wide.

    Args:
        preconditioner: a `RootPreconditioner` or `Preconditioner` from `compute_preconditioner`.
        grad: tensor (..., a, b) or (..., b, a), shaped like the kernel it was computed from.

    Returns:
        The direction, shaped like `grad`, in `grad`'s dtype.
    """
    if not isinstance(preconditioner, (RootPreconditioner, Preconditioner)):
        raise ValueError(
            "`preconditioner` must be a `RootPreconditioner` or `Preconditioner` (from `compute_preconditioner`), "
            f"got {type(preconditioner).__name__}."
        )
    tall_kernel = ops.convert_to_tensor(preconditioner[0])  # W or B = W V: (..., a, b) either way
    grad = ops.convert_to_tensor(grad)
    tall = tuple(tall_kernel.shape)
    if not (_same_shape(tall, tuple(grad.shape)) or _same_shape(tall[:-2] + tall[:-3:-1], tuple(grad.shape))):
        raise ValueError(
            f"`grad` (the gradient) must have the shape of the kernel that `preconditioner` was computed from: "
            f"{tall} or its transpose, got {tuple(grad.shape)}."
        )
    g, wide = oriented(grad, tall_kernel.dtype)
    fields = [ops.convert_to_tensor(x) for x in preconditioner]
    if isinstance(preconditioner, RootPreconditioner):
        direction = _apply_roots(RootPreconditioner(*fields), g)
    else:
        direction = eigh.apply_eigen(Preconditioner(*fields), g)
    return ops.cast(transpose(direction) if wide else direction, grad.dtype)


def preconditioner_shapes(shape, depth):
    """The shapes of the fields of `compute_preconditioner`'s result for a kernel of `shape`
    (..., rows, cols), as a `RootPreconditioner` (depth 2) or `Preconditioner` of tuples: for
    slots that keep a preconditioner between refreshes."""
    depth = check_depth(depth)
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"`shape` must have at least 2 dimensions (..., rows, cols), got {shape}.")
    batch, (a, b) = shape[:-2], sorted(shape[-2:], reverse=True)
    if depth == 2:
        return RootPreconditioner(batch + (a, b), batch + (b, b), batch + (b, b))
    return Preconditioner(batch + (a, b), batch + (b, b), batch + (1, b), batch + (depth - 1, 2, b))


def _apply_roots(preconditioner, g):
    """G R + W (Z (W^T G)) for `g` oriented tall in the preconditioner's dtype."""
    w, root, inverse_root = preconditioner
    return ops.matmul(g, root) + ops.matmul(w, ops.matmul(inverse_root, ops.matmul(transpose(w), g)))


def _depth_two_roots(w, gram, method):
    """(A^{1/2}, A^{+1/2}, method code) of A = W^T W for `w` oriented tall with b >= 2."""
    if method == "eigh" or (method == "auto" and not auto_tries_newton_schulz(w.shape[-1])):
        return (*eigh.square_roots(w, gram), _code(_EIGH))
    roots = newton_schulz.square_roots(gram)
    root, inverse_root = ops.cond(
        roots.converged, lambda: (roots.root, roots.inverse_root), lambda: eigh.square_roots(w, gram)
    )
    return root, inverse_root, ops.where(roots.converged, _code(_NEWTON_SCHULZ), _code(_EIGH))


def _single_output_direction(kernel, grad, depth):
    """Eq. 12 of the paper for a kernel with a side of 1: ||w||^{2-2/N} (g + (N-1) <g, w> /
    ||w||^2 w), and 0 at w = 0, NaN where w is not finite. Element-wise products and two sums, no
    decomposition: the full-batch engine's inner loop for a single output."""
    dtype = compute_dtype(kernel)
    w, g = ops.cast(kernel, dtype), ops.cast(grad, dtype)
    finite = ops.all(ops.isfinite(w), axis=(-2, -1), keepdims=True)
    w = ops.where(finite, w, ops.zeros_like(w))
    squared_norm = ops.sum(ops.square(w), axis=(-2, -1), keepdims=True)
    positive = squared_norm > 0
    safe_norm = ops.where(positive, squared_norm, ops.ones_like(squared_norm))
    radial = ops.where(positive, (depth - 1) * ops.sum(g * w, axis=(-2, -1), keepdims=True) / safe_norm, 0.0)
    direction = ops.power(squared_norm, (depth - 1) / depth) * (g + radial * w)
    direction = ops.where(finite, direction, ops.full_like(direction, float("nan")))
    return ops.cast(direction, grad.dtype)
