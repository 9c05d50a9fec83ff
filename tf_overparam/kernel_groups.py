"""Eq. 24 for many kernels at once: the kernels whose matrices share a shape, stacked along a
leading axis, take one batched call of the preconditioning functions.

A model's kernels repeat a few shapes, and a batched call lets the backend spread one group's eigendecompositions over the
cores, where one call per kernel runs them one after the other. Each kernel is read through its
`tf_overparam.linear_maps.LinearMap` as a (batch, rows, cols) tensor and oriented tall
(transposed when wider than tall: eq. 24 commutes with transposition, direction(W^T, G^T) =
direction(W, G)^T), so (64, 256) and (256, 64) maps share a group.
"""

import keras
from keras import ops

from tf_overparam import preconditioning
from tf_overparam.preconditioning import apply_preconditioner, compute_preconditioner


def oriented_shape(linear_map):
    """(batch, rows, cols) of `linear_map`'s matrices oriented tall (rows >= cols)."""
    batch, rows, cols = linear_map.matrix_shape
    return (batch, rows, cols) if rows >= cols else (batch, cols, rows)


def _is_wide(linear_map):
    return linear_map.matrix_shape[1] < linear_map.matrix_shape[2]


def _to_oriented(x, linear_map):
    matrix = linear_map.to_matrix(x)
    return ops.swapaxes(matrix, -1, -2) if _is_wide(linear_map) else matrix


def _from_oriented(matrix, linear_map):
    return linear_map.from_matrix(ops.swapaxes(matrix, -1, -2) if _is_wide(linear_map) else matrix)


def _groups(keys):
    """The positions of equal keys, each group in order of first appearance."""
    groups = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def _stack(tensors):
    return tensors[0] if len(tensors) == 1 else ops.concatenate(tensors, axis=0)


def _unstack(tensor, sizes):
    if len(sizes) == 1:
        return [tensor]
    parts, start = [], 0
    for size in sizes:
        parts.append(tensor[start : start + size])
        start += size
    return parts


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def _direction(kernel, grad, depth, method):
    """`end_to_end_direction` with the `method` chosen (validated by the caller)."""
    return preconditioning.end_to_end_direction(kernel, grad, depth, method=method)


def slot_shapes(linear_map, depth):
    """The fields' shapes of the preconditioner of `linear_map`'s matrices (oriented tall), as
    the type `compute_preconditioner` returns at `depth`, with a leading axis of the batch size
    for a map with a batch and none for a single matrix: what `grouped_preconditioners` returns
    and `grouped_directions` takes."""
    batch, rows, cols = oriented_shape(linear_map)
    shapes = preconditioning.preconditioner_shapes((rows, cols), depth)
    lead = () if batch == 1 else (batch,)
    return type(shapes)(*(lead + tuple(shape) for shape in shapes))


def _from_slot(field, batch):
    field = ops.convert_to_tensor(field)
    return field[None] if batch == 1 else field


def grouped_directions(kernels, grads, maps, depth, method="auto", preconditioners=None):
    """The eq. 24 directions of `kernels` for `grads`, each read as its `LinearMap` in `maps`,
    one batched call per group of equal oriented shape and dtypes; in the kernels' shapes.

    With `preconditioners` (one per kernel, shaped as `slot_shapes` says), they are applied
    instead of computing P(W).
    """
    kernels = [ops.convert_to_tensor(k) for k in kernels]
    grads = [ops.convert_to_tensor(g) for g in grads]
    keys = [(oriented_shape(m)[1:], _dtype(k), _dtype(g)) for k, g, m in zip(kernels, grads, maps)]
    directions = [None] * len(kernels)
    for group in _groups(keys):
        sizes = [maps[i].matrix_shape[0] for i in group]
        g = _stack([_to_oriented(grads[i], maps[i]) for i in group])
        if preconditioners is None:
            w = _stack([_to_oriented(kernels[i], maps[i]) for i in group])
            stacked = _direction(w, g, depth, method)
        else:
            kind = type(preconditioners[group[0]])
            fields = zip(*(preconditioners[i] for i in group))
            stacked = apply_preconditioner(
                kind(*(_stack([_from_slot(f, n) for f, n in zip(parts, sizes)]) for parts in fields)), g
            )
        for i, part in zip(group, _unstack(stacked, sizes)):
            directions[i] = _from_oriented(part, maps[i])
    return directions


def grouped_preconditioners(kernels, maps, depth, method="auto"):
    """`compute_preconditioner` of each kernel's oriented matrices, one batched call per group
    of equal oriented shape and dtype; one preconditioner per kernel, shaped as `slot_shapes`
    says."""
    kernels = [ops.convert_to_tensor(k) for k in kernels]
    keys = [(oriented_shape(m)[1:], _dtype(k)) for k, m in zip(kernels, maps)]
    result = [None] * len(kernels)
    for group in _groups(keys):
        sizes = [maps[i].matrix_shape[0] for i in group]
        stacked = compute_preconditioner(
            _stack([_to_oriented(kernels[i], maps[i]) for i in group]), depth, method=method
        )
        parts = [_unstack(field, sizes) for field in stacked]
        for position, (i, n) in enumerate(zip(group, sizes)):
            result[i] = type(stacked)(*(field[position][0] if n == 1 else field[position] for field in parts))
    return result
