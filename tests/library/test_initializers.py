"""Tests for tf_overparam.initializers and chain.balanced_factors."""

import functools
import itertools

import keras
import numpy as np
import pytest

import tf_overparam as to
from tf_overparam.chain import balanced_factors, chain_product
from tf_overparam.initializers import initialize_chain


def _np(values):
    return [np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in values]


def _relative_balancedness(factors):
    """max_j ||F_{j+1} F_{j+1}^T - F_j^T F_j||_F / max Gram norm, in NumPy."""
    gaps, scales = [0.0], [0.0]
    for inner, outer in zip(factors[:-1], factors[1:]):
        a, b = outer @ outer.T, inner.T @ inner
        gaps.append(np.linalg.norm(a - b))
        scales += [np.linalg.norm(a), np.linalg.norm(b)]
    return max(gaps) / max(scales) if max(scales) > 0 else 0.0


def _best_rank(kernel, rank):
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


# --- Balanced -----------------------------------------------------------------------------------


BALANCED_WIDTHS = [
    [5, 1],  # depth 1
    [5, 1, 1],  # single output, scalar hidden layer
    [6, 1, 1, 1, 1],
    [4, 7, 9, 3],  # hidden wider than the rank (3)
    [3, 8, 8, 8, 5],
    [6, 2, 3, 4],  # hidden width 2 below the rank 4: best rank-2 approximation
    [5, 5, 5],  # square, hidden = rank
    [2, 1, 6],  # bottleneck 1
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_balanced_chain_is_balanced_and_holds_the_drawn_kernel(dtype):
    for widths in BALANCED_WIDTHS:
        shapes = list(zip(widths[:-1], widths[1:]))
        draw = keras.initializers.RandomNormal(stddev=0.5, seed=11)
        factors = to.initializers.Balanced(draw, seed=3).chain(shapes, dtype=dtype)
        assert [tuple(f.shape) for f in factors] == shapes
        assert all(keras.backend.standardize_dtype(f.dtype) == dtype for f in factors)
        factors = _np(factors)
        # Exactly balanced up to rounding of the stored dtype: relative 1e-5 (float32) / 1e-12.
        tol = 1e-5 if dtype == "float32" else 1e-12
        assert _relative_balancedness(factors) < tol, widths
        kernel = np.asarray(keras.ops.convert_to_numpy(draw((widths[0], widths[-1]), dtype="float64")))
        rank = min(widths)
        expected = kernel if rank >= min(widths[0], widths[-1]) else _best_rank(kernel, rank)
        np.testing.assert_allclose(
            functools.reduce(np.matmul, factors), expected, rtol=tol, atol=tol, err_msg=str(widths)
        )
        # The library's own diagnostic agrees with the NumPy computation.
        assert to.diagnostics.balancedness(factors).relative == pytest.approx(
            _relative_balancedness(factors), abs=1e-12
        )


def test_balanced_layer_relative_balancedness_below_1e_5():
    for units, inputs, hidden in [(1, 8, None), (3, 5, [4, 6]), (4, 4, [2, 2]), (2, 9, 7)]:
        layer = to.OverparamDense(
            units, depth=3, hidden_units=hidden, factor_initializer=to.initializers.Balanced(seed=1)
        )
        layer.build((None, inputs))
        factors = _np(layer.factors)
        assert _relative_balancedness(factors) < 1e-5
        assert to.diagnostics.balancedness(layer).relative < 1e-5
        # The default end-to-end draw is near zero (NearZero(0.01)) but not zero.
        kernel = functools.reduce(np.matmul, factors)
        assert 0 < np.abs(kernel).max() < 0.1


def test_balanced_hidden_rotations_differ_by_seed_but_keep_the_product():
    draw = to.initializers.NearZero(0.3, seed=0)
    a = _np(to.initializers.Balanced(draw, seed=1).chain([(4, 3), (3, 3), (3, 2)], dtype="float64"))
    b = _np(to.initializers.Balanced(draw, seed=2).chain([(4, 3), (3, 3), (3, 2)], dtype="float64"))
    assert not np.allclose(a[1], b[1])
    np.testing.assert_allclose(functools.reduce(np.matmul, a), functools.reduce(np.matmul, b), atol=1e-12)
    # Same seed: the same chain.
    c = _np(to.initializers.Balanced(draw, seed=1).chain([(4, 3), (3, 3), (3, 2)], dtype="float64"))
    for x, y in zip(a, c):
        np.testing.assert_array_equal(x, y)


def test_balanced_factors_of_a_hand_made_kernel():
    # diag(4, 1) at depth 2: balanced factors have singular values sqrt(4) = 2 and 1.
    factors = balanced_factors(np.diag([4.0, 1.0]), [2], rotation_seed=0)
    np.testing.assert_allclose(factors[0] @ factors[1], np.diag([4.0, 1.0]), atol=1e-14)
    for f in factors:
        np.testing.assert_allclose(np.linalg.svd(f, compute_uv=False), [2.0, 1.0], atol=1e-14)
    # A rank-1 kernel in a width-3 hidden layer: the padded hidden directions carry nothing.
    kernel = np.outer([1.0, 2.0, 2.0], [0.0, 3.0])  # singular value 9
    factors = balanced_factors(kernel, [3, 3], rotation_seed=1)
    np.testing.assert_allclose(factors[0] @ factors[1] @ factors[2], kernel, atol=1e-13)
    for f in factors:
        np.testing.assert_allclose(np.linalg.svd(f, compute_uv=False), [9 ** (1 / 3), 0, 0][: min(f.shape)], atol=1e-13)


def test_balanced_config_round_trip():
    init = to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.2, seed=4), seed=9)
    config = keras.initializers.serialize(init)
    clone = keras.initializers.deserialize(config)
    assert isinstance(clone, to.initializers.Balanced) and clone.seed == 9
    shapes = [(3, 2), (2, 2), (2, 4)]
    for x, y in zip(_np(init.chain(shapes)), _np(clone.chain(shapes))):
        np.testing.assert_array_equal(x, y)


# --- Identity -----------------------------------------------------------------------------------


def test_identity_end_to_end_kernel_is_gain_power_depth_times_identity():
    cases = [(3, 3, None, 2), (3, 3, None, 4), (2, 5, [3, 4], 3), (5, 2, [2, 7], 3), (1, 1, None, 5)]
    for (units, inputs, hidden, depth), gain in itertools.product(cases, [1.0, 0.8, 1.5]):
        layer = to.OverparamDense(
            units, depth=depth, hidden_units=hidden, factor_initializer=to.initializers.Identity(gain), dtype="float64"
        )
        layer.build((None, inputs))
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.kernel), gain**depth * np.eye(inputs, units), rtol=1e-14, atol=0
        )
        for factor in layer.factors:
            np.testing.assert_array_equal(factor.numpy(), gain * np.eye(*factor.shape))


def test_identity_keeps_gain_in_config():
    init = to.initializers.Identity(gain=2.5)
    assert init.get_config() == {"gain": 2.5}
    clone = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(clone, to.initializers.Identity) and clone.gain == 2.5
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone((2, 3))), [[2.5, 0, 0], [0, 2.5, 0]])


def test_chain_initializers_reject_shapes_that_do_not_chain():
    for initializer in [to.initializers.Identity(), to.initializers.Balanced(seed=0)]:
        with pytest.raises(ValueError, match="shapes"):
            initializer.chain([(3, 4), (5, 2)])
        with pytest.raises(ValueError, match="shape"):
            initializer.chain([(3, 4, 1)])


# --- NearZero and plain initializers ------------------------------------------------------------


def test_near_zero_draws_with_the_given_stddev_and_round_trips():
    init = to.initializers.NearZero(stddev=0.01, seed=0)
    values = np.asarray(keras.ops.convert_to_numpy(init((200, 200), dtype="float64")))
    # 40000 i.i.d. N(0, 1e-4) draws: sample std within 2% and mean within 5 standard errors.
    assert values.std() == pytest.approx(0.01, rel=0.02)
    assert abs(values.mean()) < 5 * 0.01 / 200
    assert init.get_config() == {"stddev": 0.01, "seed": 0}
    clone = to.initializers.NearZero.from_config(init.get_config())
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone((3, 3))), keras.ops.convert_to_numpy(init((3, 3))))
    with pytest.raises(ValueError, match="stddev"):
        to.initializers.NearZero(stddev=0.0)


def test_seeded_plain_initializer_gets_seed_plus_j_per_factor():
    shapes = [(3, 3), (3, 3), (3, 3)]
    values = _np(initialize_chain(keras.initializers.RandomNormal(stddev=0.5, seed=10), shapes))
    for j, value in enumerate(values):
        expected = keras.initializers.RandomNormal(stddev=0.5, seed=10 + j)((3, 3))
        np.testing.assert_array_equal(value, keras.ops.convert_to_numpy(expected))
    assert not np.allclose(values[0], values[1]) and not np.allclose(values[1], values[2])


def test_get_resolves_aliases_and_rejects_unknown_names():
    assert isinstance(to.initializers.get("balanced"), to.initializers.Balanced)
    assert isinstance(to.initializers.get("near_zero"), to.initializers.NearZero)
    assert isinstance(to.initializers.get("identity"), to.initializers.Identity)
    assert isinstance(to.initializers.get("glorot_uniform"), keras.initializers.GlorotUniform)
    with pytest.raises(ValueError):
        to.initializers.get("no_such_initializer")


def test_chain_product_matches_numpy_with_batch_dims():
    rng = np.random.default_rng(0)
    for widths in ([4, 3, 1], [1, 3, 4], [2, 5, 5, 3]):
        factors = [rng.normal(size=(2, a, b)) for a, b in zip(widths[:-1], widths[1:])]
        expected = functools.reduce(np.matmul, factors)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(chain_product(factors)), expected, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="factors"):
        chain_product([])
