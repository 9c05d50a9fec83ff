"""The chain core (tf_overparam/chain.py): validators and shapes, and the rule that the
library's maths modules use `keras.ops` only (they run on the JAX backend too)."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tf_overparam import chain

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_check_positive_int_accepts_integrals_and_refuses_bools_floats_and_small_values():
    for value in (1, 7, np.int8(3), np.int64(2**40), np.uint16(5)):
        result = chain.check_positive_int(value, "units")
        assert result == int(value) and type(result) is int
    for value in (0, -1, True, False, 2.0, np.float64(3.0), "3", None, [2]):
        with pytest.raises(ValueError, match="`units` must be a positive int"):
            chain.check_positive_int(value, "units")
    assert chain.check_positive_int(0, "steps", minimum=0) == 0
    with pytest.raises(ValueError, match="`steps` must be an int >= 0"):
        chain.check_positive_int(-1, "steps", minimum=0)


def test_check_depth_and_hidden_units():
    assert chain.check_depth(np.int32(4)) == 4
    for depth in (0, 1.0, True, np.float32(2)):
        with pytest.raises(ValueError, match="`depth`"):
            chain.check_depth(depth)
    assert chain.resolve_hidden_units(None, 3, 5) == [5, 5]
    assert chain.resolve_hidden_units(np.int64(2), 3, 5) == [2, 2]
    assert chain.resolve_hidden_units((np.int16(4), 1), 3, 5) == [4, 1]
    assert chain.resolve_hidden_units(None, 1, 5) == []
    with pytest.raises(ValueError, match="`hidden_filters`"):
        chain.resolve_hidden_units([2], 3, 5, name="hidden_filters")
    with pytest.raises(ValueError, match="`hidden_units`"):
        chain.resolve_hidden_units(object(), 3, 5)


def test_chain_shapes_link_inputs_hidden_and_units():
    assert chain.chain_shapes(6, [4, 2], 3) == [(6, 4), (4, 2), (2, 3)]
    assert chain.chain_shapes(6, [], 3) == [(6, 3)]


def test_apply_chain_equals_the_product_of_the_chain():
    rng = np.random.default_rng(0)
    factors = [rng.normal(size=s) for s in [(5, 3), (3, 4), (4, 2)]]
    x = rng.normal(size=(2, 3, 5))
    expected = x @ (factors[0] @ factors[1] @ factors[2])
    np.testing.assert_allclose(np.asarray(chain.apply_chain(x, factors)), expected, rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(chain.chain_product(factors)), factors[0] @ factors[1] @ factors[2], rtol=1e-12
    )


@pytest.mark.parametrize(
    "module",
    [
        "chain.py",
        "layers/base.py",
        "layers/dense.py",
        "layers/conv_arithmetic.py",
        "layers/registry.py",
        "models.py",
        "conversion.py",
        "validation.py",
        "_keras_compat.py",
        "diagnostics.py",
        "losses.py",
        "initializers.py",
    ],
)
def test_maths_modules_do_not_import_tensorflow(module):
    source = (REPO_ROOT / "tf_overparam" / module).read_text()
    assert not re.search(r"^\s*(import tensorflow|from tensorflow)", source, re.MULTILINE)


def test_overparam_dense_trains_on_the_jax_backend():
    pytest.importorskip("jax")
    script = textwrap.dedent(
        """
        import numpy as np, keras
        import tf_overparam as to
        assert keras.backend.backend() == "jax"
        x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
        layer = to.OverparamDense(3, depth=3, hidden_units=[4, 2], bias_initializer="ones",
                                  factor_initializer=to.initializers.Balanced(seed=0))
        out = np.asarray(layer(x))
        f = [np.asarray(v, np.float64) for v in layer.factors]
        expected = x @ f[0] @ f[1] @ f[2] + 1.0
        assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max(), np.abs(out - expected).max()
        assert to.diagnostics.balancedness(layer).relative < 1e-5
        model = keras.Sequential([keras.Input((6,)), to.OverparamDense(2, depth=2, kernel_regularizer="l2")])
        model.compile("sgd", "mse")
        history = model.fit(x, x[:, :2], epochs=3, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        print("ok")
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --- the structured rotations and the rank of the balanced factorisation -------------------------


def test_random_rotation_is_orthogonal_and_is_its_factors_multiplied_out():
    rng = np.random.default_rng(0)
    rotation = chain.RandomRotation(7, np.random.default_rng(5), reflections=3)
    q = rotation.matrix()
    # Built independently in NumPy: Q = P D H_1 H_2 H_3, P = I[:, permutation].
    expected = np.eye(7)[:, rotation.permutation] @ np.diag(rotation.signs)
    for v in rotation.vectors:
        expected = expected @ (np.eye(7) - 2.0 * np.outer(v, v))
    np.testing.assert_allclose(q, expected, atol=1e-14)
    np.testing.assert_allclose(q.T @ q, np.eye(7), atol=1e-14)
    np.testing.assert_allclose(q @ q.T, np.eye(7), atol=1e-14)
    assert sorted(rotation.permutation) == list(range(7)) and set(np.abs(rotation.signs)) == {1.0}
    x, y = rng.normal(size=(4, 7)), rng.normal(size=(7, 3))
    np.testing.assert_allclose(rotation.right_multiply(x), x @ q, atol=1e-14)
    np.testing.assert_allclose(rotation.transpose_left_multiply(y), q.T @ y, atol=1e-14)
    # A float32 matrix is turned in float32 (the long side of a float32 chain is never widened).
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert rotation.right_multiply(x32).dtype == rotation.transpose_left_multiply(y32).dtype == np.float32
    np.testing.assert_allclose(rotation.right_multiply(x32), x32.astype(np.float64) @ q, atol=1e-5)
    np.testing.assert_allclose(rotation.transpose_left_multiply(y32), q.T @ y32.astype(np.float64), atol=1e-5)
    # Seeded: the same seed, the same rotation; a zero column does not stay zero.
    np.testing.assert_array_equal(chain.RandomRotation(7, np.random.default_rng(5), reflections=3).matrix(), q)
    padded = np.hstack([rng.normal(size=(4, 2)), np.zeros((4, 5))])
    assert np.all(np.abs(chain.RandomRotation(7, np.random.default_rng(1)).right_multiply(padded)).sum(axis=0) > 0)


def test_numerical_rank_agrees_with_numpy_matrix_rank():
    rng = np.random.default_rng(2)
    for rows, cols, rank in ((6, 4, 2), (3, 8, 3), (5, 5, 0), (9, 2, 2)):
        matrix = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols))
        singular_values = np.linalg.svd(matrix, compute_uv=False)
        assert chain.numerical_rank(singular_values, matrix.shape) == np.linalg.matrix_rank(matrix) == rank


def _kernel(rows, cols, singular_values, seed):
    """A rows x cols matrix with these singular values (NumPy: random orthonormal bases)."""
    rng = np.random.default_rng(seed)
    rank = len(singular_values)
    left = np.linalg.qr(rng.normal(size=(rows, rank)))[0]
    right = np.linalg.qr(rng.normal(size=(cols, rank)))[0]
    return (left * singular_values) @ right.T


@pytest.mark.parametrize(
    "rows, cols, singular_values, gram_route",
    [
        (40, 12, np.linspace(2.0, 0.2, 12), True),  # well-conditioned, tall
        (12, 40, np.linspace(2.0, 0.2, 12), True),  # well-conditioned, wide
        (30, 9, np.geomspace(1.0, 1e-9, 9), False),  # ill-conditioned, full rank
        (9, 30, np.linspace(3.0, 1.0, 4), False),  # rank 4
    ],
)
def test_balanced_chain_holds_the_kernel_and_gives_numpys_rank_by_either_route(rows, cols, singular_values, gram_route):
    kernel = _kernel(rows, cols, singular_values, seed=rows + cols)
    rank = np.linalg.matrix_rank(kernel)
    assert rank == len(singular_values)
    # The Gram route is taken only where its eigenvalues resolve every singular value.
    assert (chain._gram_spectrum(kernel) is not None) == gram_route
    for hidden in ([rank], [rank + 3, rank + 1]):
        factors, found_rank = chain.balanced_chain(kernel, hidden, rotation_seed=3)
        assert found_rank == rank
        assert [f.shape for f in factors] == chain.chain_shapes(rows, hidden, cols)
        product = factors[0]
        for factor in factors[1:]:
            product = product @ factor
        np.testing.assert_allclose(product, kernel, atol=1e-13)
        # Balanced: F_{j+1} F_{j+1}^T = F_j^T F_j, and the NumPy SVD route gives the same Gram matrices.
        reference = chain.balanced_factors(kernel, hidden, rotation_seed=3)
        for j in range(len(factors) - 1):
            np.testing.assert_allclose(factors[j + 1] @ factors[j + 1].T, factors[j].T @ factors[j], atol=1e-12)
        np.testing.assert_allclose(
            np.linalg.eigvalsh(factors[0].T @ factors[0]), np.linalg.eigvalsh(reference[0].T @ reference[0]), atol=1e-12
        )
    # float32 factors: the product taken in float32 holds the kernel to float32 rounding.
    factors, _ = chain.balanced_chain(kernel.astype(np.float32), [rank + 2], rotation_seed=0, dtype="float32")
    assert all(f.dtype == np.float32 for f in factors)
    np.testing.assert_allclose(factors[0] @ factors[1], kernel, atol=1e-5)
