"""Tests for `tf_overparam.kernel_groups`: many kernels' eq. 24 directions in batched calls, one per
oriented matrix shape, against NumPy eq. 24 (tests/_reference.py) kernel by kernel."""

import keras
import numpy as np
from _reference import reference_direction

from tf_overparam import kernel_groups
from tf_overparam.linear_maps import LinearMap, shape_map
from tf_overparam.preconditioning import compute_preconditioner


def _kernels(rng):
    """(kernel, its LinearMap) for a few shapes: a tall
    and a wide one of the same oriented shape, a conv-like one of that shape too, a batch of
    two maps of that shape, and a lone one of another shape."""
    out = []
    for shape, linear_map in [
        ((6, 4), None),
        ((4, 6), None),
        ((1, 2, 3, 4), None),  # (6, 4) as a conv kernel
        ((6, 2, 4), LinearMap((6, 2, 4), rows=(0,), cols=(2,), batch=(1,))),  # two (6, 4) maps
        ((5, 3), None),
    ]:
        kernel = rng.normal(size=shape)
        linear_map = linear_map or shape_map(shape)
        out.append((kernel, linear_map))
    return out


def _expected(kernel, grad, linear_map, depth):
    if linear_map.batch:
        return np.stack([reference_direction(kernel[:, b], grad[:, b], depth) for b in range(kernel.shape[1])], axis=1)
    matrix = (-1, kernel.shape[-1])
    return reference_direction(kernel.reshape(matrix), grad.reshape(matrix), depth).reshape(kernel.shape)


def test_grouped_directions_are_eq24_kernel_by_kernel_in_one_call_per_shape(float64, monkeypatch):
    rng = np.random.default_rng(0)
    items = _kernels(rng)
    grads = [rng.normal(size=k.shape) for k, _ in items]
    calls = []
    direction = kernel_groups._direction
    monkeypatch.setattr(
        kernel_groups, "_direction", lambda w, g, *rest: calls.append(tuple(w.shape)) or direction(w, g, *rest)
    )
    for depth in (2, 3):
        calls.clear()
        out = kernel_groups.grouped_directions(
            [k for k, _ in items], grads, [m for _, m in items], depth, method="eigh"
        )
        assert sorted(calls) == [(1, 5, 3), (5, 6, 4)]  # the four (6, 4)-shaped kernels (five maps) at once
        for (kernel, linear_map), grad, d in zip(items, grads, out, strict=True):
            assert tuple(d.shape) == kernel.shape
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(d), _expected(kernel, grad, linear_map, depth), rtol=1e-10, atol=1e-12
            )


def test_grouped_preconditioners_applied_are_the_directions(float64):
    rng = np.random.default_rng(1)
    items = _kernels(rng)
    grads = [rng.normal(size=k.shape) for k, _ in items]
    kernels, maps = [k for k, _ in items], [m for _, m in items]
    preconditioners = kernel_groups.grouped_preconditioners(kernels, maps, 3)
    for (kernel, linear_map), p in zip(items, preconditioners):
        shapes = kernel_groups.slot_shapes(linear_map, 3)
        assert type(p) is type(shapes) and [tuple(f.shape) for f in p] == [tuple(s) for s in shapes]
        # Each kernel's part of the batched call is its own preconditioner.
        single = compute_preconditioner(kernel_groups._to_oriented(keras.ops.convert_to_tensor(kernel), linear_map), 3)
        for field, alone in zip(p, single):
            alone = keras.ops.convert_to_numpy(alone).reshape(field.shape)
            np.testing.assert_allclose(keras.ops.convert_to_numpy(field), alone, rtol=1e-10, atol=1e-12)
    out = kernel_groups.grouped_directions(kernels, grads, maps, 3, preconditioners=preconditioners)
    for (kernel, linear_map), grad, d in zip(items, grads, out):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(d), _expected(kernel, grad, linear_map, 3), rtol=1e-10, atol=1e-12
        )
