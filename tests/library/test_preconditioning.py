"""Tests for tf_overparam.preconditioning (the end-to-end update direction, eq. 10 of the paper
(the write-up's eq. 24), and the preconditioner of eq. 11 (eq. 26)), against an independent NumPy
evaluation of

    sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}

through eigendecompositions of W W^T and W^T W (0^0 = 1 on null spaces), for every method."""

import itertools

import keras
import numpy as np
import pytest
from _backend import compiled  # tests/ is on sys.path (rootdir-relative import)
from _reference import reference_direction, reference_eigenvalues, reference_square_roots
from keras import ops

from tf_overparam import preconditioning
from tf_overparam.preconditioning import (
    METHODS,
    Preconditioner,
    RootPreconditioner,
    apply_preconditioner,
    compute_preconditioner,
    eigh,
    end_to_end_direction,
    lanczos_extremes,
    newton_schulz_square_roots,
    preconditioner_eigenvalues,
    preconditioner_matrix,
    preconditioner_shapes,
    slowest_converging_ratio,
)


def _rank_deficient(rng, shape, rank):
    return rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))


def _kernels():
    """Named (a, b) kernels: single/multi output, square/wide/tall, rank-deficient, zero."""
    rng = np.random.default_rng(0)
    return {
        "scalar": rng.normal(size=(1, 1)),
        "column": rng.normal(size=(5, 1)),  # a Keras single-output kernel (inputs, 1)
        "row": rng.normal(size=(1, 4)),
        "square": rng.normal(size=(3, 3)),
        "wide": rng.normal(size=(2, 5)),
        "tall": rng.normal(size=(5, 2)),
        "very_tall": rng.normal(size=(12, 3)),  # past DIRECT_FORM_ASPECT: the regrouped products
        "very_wide": rng.normal(size=(3, 12)),
        "tall_rank1": _rank_deficient(rng, (4, 3), 1),
        "wide_rank2": _rank_deficient(rng, (3, 5), 2),
        "square_rank2": _rank_deficient(rng, (4, 4), 2),
        "zero_multi": np.zeros((3, 4)),
        "zero_single": np.zeros((4, 1)),
        "repeated_singular_values": np.diag([2.0, 2.0, 0.5])[:, :2],
    }


KERNELS = _kernels()
DEPTHS = [1, 2, 3, 4]


def _grad(shape, seed=1):
    return np.random.default_rng(seed).normal(size=shape)


# --- direction vs reference vs explicit preconditioner ------------------------------------------
# (Depths are looped inside the tests: each test item pays for conftest's clear_session.)


GROUPS = {
    "single_output": ["scalar", "column", "row", "zero_single"],
    "full_rank": ["square", "wide", "tall", "very_tall", "very_wide", "repeated_singular_values"],
    "rank_deficient_or_zero": ["tall_rank1", "wide_rank2", "square_rank2", "zero_multi"],
}
assert sorted(sum(GROUPS.values(), [])) == sorted(KERNELS)


@pytest.mark.parametrize("group", list(GROUPS))
def test_direction_matrix_and_eigenvalues_match_numpy_reference(group):
    for name in GROUPS[group]:
        _check_against_reference(name)


def _check_against_reference(name):
    w = KERNELS[name]
    g = _grad(w.shape)
    u, _, vt = np.linalg.svd(w)  # full SVD: eigenvectors vec(u_r v_r'^T) of P
    for depth in DEPTHS:
        msg = f"{name}, depth {depth}"
        expected = reference_direction(w, g, depth)
        scale = max(np.abs(expected).max(), 1e-300)
        direction = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth))
        # float64 throughout: agreement to 1e-12 relative to the direction's size.
        np.testing.assert_allclose(direction, expected, rtol=0, atol=1e-12 * scale, err_msg=msg)

        matrix = np.asarray(preconditioner_matrix(ops.convert_to_tensor(w), depth))
        # Row-major vec: vec(direction) = P vec(G).
        np.testing.assert_allclose(
            (matrix @ g.reshape(-1)).reshape(w.shape), expected, rtol=0, atol=1e-12 * scale, err_msg=msg
        )
        size = max(np.abs(matrix).max(), 1.0)
        # P is symmetric positive semidefinite.
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-12 * size, err_msg=msg)

        eigenvalues = np.asarray(preconditioner_eigenvalues(ops.convert_to_tensor(w), depth))
        assert eigenvalues.shape == w.shape
        np.testing.assert_allclose(eigenvalues, reference_eigenvalues(w, depth), rtol=1e-12, atol=1e-12, err_msg=msg)
        assert eigenvalues.min() >= 0
        np.testing.assert_allclose(
            np.sort(eigenvalues.reshape(-1)), np.linalg.eigvalsh(matrix), rtol=0, atol=1e-10 * size, err_msg=msg
        )
        for r, rp in itertools.product(range(w.shape[0]), range(w.shape[1])):
            vector = np.outer(u[:, r], vt[rp]).reshape(-1)
            np.testing.assert_allclose(matrix @ vector, eigenvalues[r, rp] * vector, atol=1e-10 * size, err_msg=msg)


def test_hand_computed_directions():
    g = np.array([[1.0]])
    # 1x1 kernel w = 4, depth 2: sum_j w^{2(j-1)/2} g w^{2(2-j)/2} = (4 + 4) g = 8 g.
    np.testing.assert_allclose(
        np.asarray(end_to_end_direction(ops.convert_to_tensor([[4.0]], "float64"), g, 2)), [[8.0]], rtol=1e-15
    )
    # depth 3: 3 * 4^{4/3}.
    np.testing.assert_allclose(
        np.asarray(end_to_end_direction(ops.convert_to_tensor([[4.0]], "float64"), g, 3)),
        [[3 * 4 ** (4 / 3)]],
        rtol=1e-14,
    )
    # W = diag(4, 1), depth 2: entry [r, r'] of G is scaled by s_r + s_r' -> [[8, 5], [5, 2]].
    w = np.diag([4.0, 1.0])
    np.testing.assert_allclose(
        np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.ones((2, 2), "float64"), 2)),
        [[8.0, 5.0], [5.0, 2.0]],
        rtol=1e-14,
    )
    # W = [[4], [0]] (tall, rank 1), depth 2: the left null space e_2 gets weight s^{2(N-1)/N} = 4.
    np.testing.assert_allclose(
        np.asarray(
            end_to_end_direction(
                ops.convert_to_tensor([[4.0, 0.0]], "float64"), ops.convert_to_tensor([[1.0, 1.0]], "float64"), 2
            )
        ),
        [[8.0, 4.0]],
        rtol=1e-14,
    )


# --- structure ----------------------------------------------------------------------------------


def test_transpose_consistency():
    for name, depth in itertools.product(["column", "row", "wide", "tall", "tall_rank1", "square"], [2, 3, 4]):
        w, g = KERNELS[name], _grad(KERNELS[name].shape, seed=2)
        forward = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth))
        transposed = np.asarray(end_to_end_direction(ops.convert_to_tensor(w.T), ops.convert_to_tensor(g.T), depth))
        np.testing.assert_allclose(
            transposed, forward.T, rtol=1e-12, atol=1e-12 * np.abs(forward).max(), err_msg=f"{name}, depth {depth}"
        )


def test_depth_one_is_the_gradient():
    w, g = KERNELS["wide"], _grad((2, 5))
    np.testing.assert_array_equal(
        np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), 1)), g
    )
    np.testing.assert_allclose(np.asarray(preconditioner_matrix(ops.convert_to_tensor(w), 1)), np.eye(10), atol=0)
    np.testing.assert_array_equal(np.asarray(preconditioner_eigenvalues(ops.convert_to_tensor(w), 1)), np.ones((2, 5)))


def test_single_output_closed_form_is_eq27():
    for depth, shape in itertools.product([2, 3, 4], [(6, 1), (1, 6)]):
        rng = np.random.default_rng(depth)
        w, g = rng.normal(size=shape), rng.normal(size=shape)
        closed = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth))
        # Eq. 27 written out: ||w||^{2-2/N} (g + (N-1) <g, w>/||w||^2 w).
        norm2 = np.sum(w**2)
        eq27 = norm2 ** (1 - 1 / depth) * (g + (depth - 1) * np.sum(g * w) / norm2 * w)
        np.testing.assert_allclose(closed, eq27, rtol=1e-13)
        np.testing.assert_allclose(closed, reference_direction(w, g, depth), rtol=1e-12)


def test_zero_kernel_is_a_fixed_point():
    for depth, shape in itertools.product([2, 3, 4], [(5, 1), (1, 5), (1, 1), (3, 4)]):
        g = _grad(shape)
        direction = np.asarray(end_to_end_direction(ops.zeros(shape, "float64"), ops.convert_to_tensor(g), depth))
        np.testing.assert_array_equal(direction, np.zeros(shape))
        assert np.all(np.isfinite(direction))


def test_non_finite_kernel_gives_nan_direction():
    for shape, bad, depth in itertools.product(
        [(4, 1), (1, 1), (3, 4), (12, 3), (3, 12)], [np.inf, -np.inf, np.nan], [2, 3]
    ):
        w = _grad(shape, seed=5)
        w[0, 0] = bad
        direction = np.asarray(
            end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(_grad(shape)), depth)
        )
        assert np.all(np.isnan(direction)), (shape, bad, depth)


def test_batched_kernels_match_per_item_directions():
    rng = np.random.default_rng(3)
    for shape in [(2, 3, 4, 2), (3, 5, 1), (2, 1, 4), (4, 3, 3)]:
        w, g = rng.normal(size=shape), rng.normal(size=shape)
        w[0] = 0.0  # one zero kernel in the batch
        if len(shape) == 4:
            w[1, 1] = _rank_deficient(rng, shape[-2:], 1)
        w[-1] *= 1e-3  # and a small one
        for depth in [1, 2, 3, 4]:
            direction = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth))
            eigenvalues = np.asarray(preconditioner_eigenvalues(ops.convert_to_tensor(w), depth))
            assert direction.shape == shape and eigenvalues.shape == shape
            for index in np.ndindex(*shape[:-2]):
                expected = reference_direction(w[index], g[index], depth)
                np.testing.assert_allclose(
                    direction[index], expected, rtol=0, atol=1e-12 * max(np.abs(expected).max(), 1e-300)
                )
                np.testing.assert_allclose(
                    eigenvalues[index], reference_eigenvalues(w[index], depth), rtol=1e-12, atol=1e-15
                )
    # A non-finite kernel poisons only its own batch entry.
    w, g = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    w[1, 0, 0] = np.inf
    direction = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), 3))
    assert np.all(np.isnan(direction[1])) and np.all(np.isfinite(direction[[0, 2]]))
    np.testing.assert_allclose(direction[2], reference_direction(w[2], g[2], 3), rtol=1e-12)


def test_direction_is_linear_in_the_gradient():
    w = KERNELS["tall"]
    g1, g2 = _grad(w.shape, 1), _grad(w.shape, 2)
    for depth in [2, 3]:

        def d(g, depth=depth):
            return np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth))

        np.testing.assert_allclose(d(2.5 * g1 - g2), 2.5 * d(g1) - d(g2), rtol=1e-12, atol=1e-12)


def test_float32_and_compiled():
    w, g = KERNELS["wide_rank2"], _grad((3, 5))
    expected = reference_direction(w, g, 4)
    fn = compiled(lambda w, g: end_to_end_direction(w, g, 4))
    direction = fn(ops.convert_to_tensor(w, "float32"), ops.convert_to_tensor(g, "float32"))
    assert direction.dtype == "float32"
    # float32: agreement to 1e-5 of the direction's size, also for a rank-deficient kernel.
    np.testing.assert_allclose(np.asarray(direction), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    matrix = np.asarray(preconditioner_matrix(ops.convert_to_tensor(w, "float32"), 4))
    np.testing.assert_allclose(
        (matrix @ g.reshape(-1)).reshape(w.shape), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
    )


def test_rank_deficient_kernel_at_depth_8_is_accurate():
    # s^{2/8} of a singular value at the rounding level (1e-16) would be 1e-4: rounding noise
    # in the null space must count as zero, as in the exact maths.
    w, g = KERNELS["tall_rank1"], _grad((4, 3))
    expected = reference_direction(w, g, 8)
    direction = np.asarray(end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), 8))
    np.testing.assert_allclose(direction, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    np.testing.assert_allclose(
        np.asarray(preconditioner_eigenvalues(ops.convert_to_tensor(w), 8)),
        reference_eigenvalues(w, 8),
        rtol=1e-12,
        atol=1e-12,
    )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="depth"):
        end_to_end_direction(ops.ones((2, 2)), ops.ones((2, 2)), 0)
    with pytest.raises(ValueError, match="depth"):
        preconditioner_eigenvalues(ops.ones((2, 2)), 1.5)
    with pytest.raises(ValueError, match="kernel"):
        preconditioner_matrix(ops.ones((2, 2, 2)), 2)


# --- float32 accuracy at condition number 1e3 ----------------------------------------------------


def _conditioned(shape, condition, seed):
    """A kernel with log-spaced singular values 0.05 .. 0.05/condition, and a gradient."""
    rng = np.random.default_rng(seed)
    rank = min(shape)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], rank)))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], rank)))
    return (u * np.logspace(0, -np.log10(condition), rank) * 0.05) @ v.T, rng.normal(size=shape)


@pytest.mark.parametrize("shape", [(784, 128), (128, 784), (300, 300)])
def test_float32_direction_of_a_condition_1e3_kernel_is_within_the_bounds(shape):
    # The bounds against the float64 NumPy reference, relative Frobenius error: 1e-4 at depths
    # 2-4, 5e-4 at depth 8 (a Gram matrix squares the condition number to 1e6).
    # Every method at depth 2 ("newton_schulz" declines such a kernel and takes the eigh).
    w, g = _conditioned(shape, 1e3, seed=sum(shape))
    for depth, bound in [(2, 1e-4), (3, 1e-4), (4, 1e-4), (8, 5e-4)]:
        expected = reference_direction(w, g, depth)
        for method in METHODS if depth == 2 else ["auto", "eigh"]:
            direction = end_to_end_direction(
                ops.convert_to_tensor(w, "float32"), ops.convert_to_tensor(g, "float32"), depth, method=method
            )
            assert direction.dtype == "float32"
            error = np.linalg.norm(np.asarray(direction) - expected) / np.linalg.norm(expected)
            assert error <= bound, (shape, depth, method, error)
            # The same bound for P(W) computed once and then applied (EndToEnd's path under a
            # tf.distribute strategy, where the replicas share one P(W)).
            applied = apply_preconditioner(
                compute_preconditioner(ops.convert_to_tensor(w, "float32"), depth, method=method),
                ops.convert_to_tensor(g, "float32"),
            )
            error = np.linalg.norm(np.asarray(applied) - expected) / np.linalg.norm(expected)
            assert error <= bound, (shape, depth, method, "applied", error)


def test_float64_direction_of_a_condition_1e3_kernel_is_exact():
    w, g = _conditioned((300, 120), 1e3, seed=4)
    for depth in [2, 3, 8]:
        expected = reference_direction(w, g, depth)
        for method in METHODS if depth == 2 else ["auto", "eigh"]:
            direction = np.asarray(
                end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth, method=method)
            )
            assert np.linalg.norm(direction - expected) <= 1e-10 * np.linalg.norm(expected), (depth, method)


# --- depth 2 by Newton-Schulz (kernels with at least NEWTON_SCHULZ_MIN_COLUMNS columns) --------

NS_COLUMNS = preconditioning.NEWTON_SCHULZ_MIN_COLUMNS


def _gram(w, dtype="float64"):
    w = ops.convert_to_tensor(w, dtype)
    return ops.matmul(ops.transpose(w), w)


@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 2e-5)])
def test_newton_schulz_roots_of_a_well_conditioned_gram_are_its_square_roots(dtype, tolerance):
    # A Gaussian 300 x 60 kernel: cond(W) about 2.7. Y Y = A, Z A Z = I, Y Z = I, and both equal
    # the roots from NumPy's float64 eigh.
    w = np.random.default_rng(7).normal(size=(300, 60))
    gram = w.T @ w
    roots = newton_schulz_square_roots(_gram(w, dtype))
    root, inverse_root, converged = (np.asarray(x) for x in roots[:3])
    assert bool(converged) and root.dtype == inverse_root.dtype == dtype
    expected_root, expected_inverse = reference_square_roots(gram)
    assert np.linalg.norm(root - expected_root) <= tolerance * np.linalg.norm(expected_root)
    assert np.linalg.norm(inverse_root - expected_inverse) <= tolerance * np.linalg.norm(expected_inverse)
    np.testing.assert_allclose(root @ root, gram, rtol=0, atol=tolerance * np.abs(gram).max())
    np.testing.assert_allclose(inverse_root @ gram @ inverse_root, np.eye(60), rtol=0, atol=10 * tolerance)


def test_newton_schulz_declines_ill_conditioned_singular_zero_and_non_finite_grams():
    rng = np.random.default_rng(8)
    conditioned, _ = _conditioned((300, 60), 1e3, seed=8)
    rank_deficient = _rank_deficient(rng, (300, 60), 20)
    not_finite = rng.normal(size=(300, 60))
    not_finite[3, 4] = np.nan
    for name, w in [
        ("cond 1e3", conditioned),
        ("rank 20", rank_deficient),
        ("zero", np.zeros((300, 60))),
        ("nan", not_finite),
        ("square Gaussian", rng.normal(size=(60, 60))),
    ]:
        for dtype in ["float32", "float64"]:
            assert not bool(newton_schulz_square_roots(_gram(w, dtype)).converged), (name, dtype)


def test_newton_schulz_of_a_batch_converges_only_if_every_matrix_does():
    rng = np.random.default_rng(9)
    good = [rng.normal(size=(200, 40)) for _ in range(2)]
    both = ops.stack([_gram(w) for w in good])
    root, inverse_root, converged = (np.asarray(x) for x in newton_schulz_square_roots(both)[:3])
    assert bool(converged)
    for index, w in enumerate(good):
        expected_root, expected_inverse = reference_square_roots(w.T @ w)
        np.testing.assert_allclose(root[index], expected_root, rtol=0, atol=1e-12 * np.abs(expected_root).max())
        np.testing.assert_allclose(
            inverse_root[index], expected_inverse, rtol=0, atol=1e-12 * np.abs(expected_inverse).max()
        )
    mixed = ops.stack([_gram(good[0]), _gram(_rank_deficient(rng, (200, 40), 5))])
    assert not bool(newton_schulz_square_roots(mixed).converged)


def test_slowest_allowed_eigenvalue_converges_in_exactly_the_steps():
    # The bisection's answer x: k steps of x (3 - x)^2 / 4 bring it to 1 - tolerance (by the
    # scalar map itself), and the allowance shrinks with every step added.
    for steps, tolerance in [(1, 0.25), (5, 1e-3), (8, 3.45e-4)]:
        x = slowest_converging_ratio(steps, tolerance)
        for _ in range(steps):
            x = x * (3 - x) ** 2 / 4
        assert x == pytest.approx(1 - tolerance, abs=1e-9)
    allowed = [slowest_converging_ratio(k, 1e-4) for k in range(3, 10)]
    assert all(a > b for a, b in zip(allowed, allowed[1:]))


def test_lanczos_extremes_lie_inside_the_spectrum_and_find_its_ends():
    rng = np.random.default_rng(10)
    basis, _ = np.linalg.qr(rng.normal(size=(200, 200)))
    spectrum = np.linspace(1.0, 50.0, 200)  # cond 50, evenly spread
    matrix = (basis * spectrum) @ basis.T
    smallest, largest = (float(np.asarray(x).reshape(())) for x in lanczos_extremes(ops.convert_to_tensor(matrix), 16))
    assert 1.0 - 1e-9 <= smallest <= largest <= 50.0 + 1e-9
    assert largest >= 0.98 * 50.0 and smallest <= 3.0 * 1.0
    # A breakdown (A = I: the Krylov space is one vector) leaves Ritz values 0, so Newton-Schulz declines.
    smallest, _ = lanczos_extremes(ops.eye(64, dtype="float64"), 16)
    assert float(np.asarray(smallest).reshape(())) == 0.0


@pytest.mark.parametrize("shape", [(600, NS_COLUMNS), (NS_COLUMNS, 600), (3 * NS_COLUMNS + 100, NS_COLUMNS + 40)])
def test_depth_two_direction_by_newton_schulz_matches_the_reference(shape):
    # Gaussian kernels with at least NEWTON_SCHULZ_MIN_COLUMNS columns, tall or wide and at least
    # about 2.5 times longer than wide (cond(W) <= about 4; nearer square, cond(W) grows and the
    # iteration declines): it converges (checked on the same Gram matrix) and the
    # direction is eq. 10, exact in float64 and far inside the 1e-4 bound in float32.
    rng = np.random.default_rng(sum(shape))
    w, g = rng.normal(size=shape), rng.normal(size=shape)
    oriented = w if shape[0] >= shape[1] else w.T
    assert bool(newton_schulz_square_roots(_gram(oriented)).converged)
    expected = reference_direction(w, g, 2)
    direction, info = end_to_end_direction(
        ops.convert_to_tensor(w), ops.convert_to_tensor(g), 2, method="newton_schulz", return_info=True
    )
    assert _ran(info) == "newton_schulz"
    assert np.linalg.norm(np.asarray(direction) - expected) <= 1e-12 * np.linalg.norm(expected)
    single = compiled(lambda w, g: end_to_end_direction(w, g, 2, method="newton_schulz"))(
        ops.convert_to_tensor(w, "float32"), ops.convert_to_tensor(g, "float32")
    )
    assert single.dtype == "float32"
    assert np.linalg.norm(np.asarray(single) - expected) <= 1e-5 * np.linalg.norm(expected)


def test_depth_two_direction_falls_back_to_the_eigh_where_newton_schulz_declines():
    # Kernels wide enough for the iteration that it declines (its Gram as above): the eigh path
    # gives eq. 24 all the same, and a non-finite kernel a NaN direction.
    rng = np.random.default_rng(11)
    conditioned, _ = _conditioned((400, NS_COLUMNS), 1e3, seed=11)
    for w in [conditioned, _rank_deficient(rng, (400, NS_COLUMNS), 30), np.zeros((400, NS_COLUMNS))]:
        assert not bool(newton_schulz_square_roots(_gram(w)).converged)
        g = rng.normal(size=w.shape)
        expected = reference_direction(w, g, 2)
        direction, info = end_to_end_direction(
            ops.convert_to_tensor(w), ops.convert_to_tensor(g), 2, method="newton_schulz", return_info=True
        )
        assert _ran(info) == "eigh"
        assert np.linalg.norm(np.asarray(direction) - expected) <= 1e-10 * max(np.linalg.norm(expected), 1e-300)
    w = rng.normal(size=(400, NS_COLUMNS))
    w[5, 6] = np.inf
    direction = np.asarray(
        end_to_end_direction(
            ops.convert_to_tensor(w), ops.convert_to_tensor(rng.normal(size=w.shape)), 2, method="newton_schulz"
        )
    )
    assert np.all(np.isnan(direction))


# --- the preconditioner, reused (amortised mode) -------------------------------------------------


@pytest.mark.parametrize("depth", [2, 3])  # depth 2 keeps the roots of W^T W, depth 3 its eigenbasis
@pytest.mark.parametrize(
    "name", ["tall", "wide", "very_tall", "very_wide", "square_rank2", "column", "row", "zero_multi"]
)
def test_a_kept_preconditioner_applies_the_old_kernels_eq26_to_new_gradients(name, depth):
    # P(W_r) G_t for a later gradient: the explicit matrix of eq. 11 of the paper (eq. 26) of W_r
    # times vec(G_t), and the reference direction at W_r (linear in G).
    w_r = KERNELS[name]
    preconditioner = compute_preconditioner(ops.convert_to_tensor(w_r), depth)
    assert isinstance(preconditioner, RootPreconditioner if depth == 2 else Preconditioner)
    shapes = preconditioner_shapes(w_r.shape, depth)
    assert type(shapes) is type(preconditioner)
    assert [tuple(x.shape) for x in preconditioner] == list(shapes)
    if depth == 2 and min(w_r.shape) > 1:  # computed and applied once: the exact direction's products
        g = ops.convert_to_tensor(_grad(w_r.shape, 6))
        np.testing.assert_array_equal(
            np.asarray(apply_preconditioner(preconditioner, g)), np.asarray(end_to_end_direction(w_r, g, 2))
        )
    for seed in [7, 8]:
        g = _grad(w_r.shape, seed)
        applied = np.asarray(apply_preconditioner(preconditioner, ops.convert_to_tensor(g)))
        expected = (np.asarray(preconditioner_matrix(ops.convert_to_tensor(w_r), depth)) @ g.reshape(-1)).reshape(
            w_r.shape
        )
        scale = max(np.abs(expected).max(), 1e-300)
        np.testing.assert_allclose(applied, expected, rtol=0, atol=1e-12 * scale, err_msg=name)
        np.testing.assert_allclose(
            applied, reference_direction(w_r, g, depth), rtol=0, atol=1e-12 * scale, err_msg=name
        )


# --- the methods, the report of which ran, and the batched call -------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_its_kept_preconditioner_match_numpy(method):
    # Small kernels, where "newton_schulz" converges on some (Gaussian) and falls back on others
    # (rank-deficient, zero); single outputs take the closed form whatever the method.
    names = ["square", "wide", "tall", "very_tall", "very_wide", "tall_rank1", "wide_rank2", "zero_multi", "column"]
    for name, depth in itertools.product(names, [1, 2, 3] if method != "newton_schulz" else [1, 2]):
        w, g = KERNELS[name], _grad(KERNELS[name].shape, seed=3)
        expected = reference_direction(w, g, depth)
        atol = 1e-12 * max(np.abs(expected).max(), 1e-300)
        direction = end_to_end_direction(ops.convert_to_tensor(w), ops.convert_to_tensor(g), depth, method=method)
        kept = compute_preconditioner(ops.convert_to_tensor(w), depth, method=method)
        applied = apply_preconditioner(kept, ops.convert_to_tensor(g))
        for result in [direction, applied]:
            np.testing.assert_allclose(np.asarray(result), expected, rtol=0, atol=atol, err_msg=f"{name}, {depth}")


def _ran(info):
    return info.method_name


def test_the_method_that_ran_is_reported():
    rng = np.random.default_rng(12)
    gaussian = rng.normal(size=(40, 8))  # cond(W) about 1.6: the iteration converges
    assert bool(newton_schulz_square_roots(_gram(gaussian)).converged)
    conditioned, _ = _conditioned((40, 8), 1e3, seed=12)
    cases = [
        (gaussian, 1, "newton_schulz", "gradient"),
        (gaussian[:, :1], 2, "auto", "closed_form"),
        (gaussian, 2, "auto", "eigh"),  # fewer columns than NEWTON_SCHULZ_MIN_COLUMNS
        (gaussian, 2, "eigh", "eigh"),
        (gaussian, 2, "newton_schulz", "newton_schulz"),
        (gaussian.T, 2, "newton_schulz", "newton_schulz"),
        (conditioned, 2, "newton_schulz", "eigh"),  # declined: the eigh instead
        (np.zeros((40, 8)), 2, "newton_schulz", "eigh"),
        (gaussian, 3, "auto", "eigh"),
    ]
    for w, depth, method, ran in cases:
        g = rng.normal(size=w.shape)
        direction, info = end_to_end_direction(w, g, depth, method=method, return_info=True)
        assert _ran(info) == ran, (w.shape, depth, method)
        expected = reference_direction(w, g, depth)
        np.testing.assert_allclose(np.asarray(direction), expected, rtol=0, atol=1e-10 * max(np.abs(expected).max(), 1))
        assert _ran(compute_preconditioner(w, depth, method=method, return_info=True)[1]) == ran
    # Without `return_info` the result is the direction alone.
    assert tuple(end_to_end_direction(gaussian, gaussian, 2).shape) == (40, 8)


def _keras_computes_on_an_accelerator():
    """What Keras reports for this process: its default devices are a GPU's or TPU's."""
    return any(not device.startswith("cpu") for device in keras.distribution.list_devices())


def test_auto_tries_newton_schulz_from_the_threshold_on_an_accelerator_only(monkeypatch):
    # The documented rule: at depth 2, "auto" tries the iteration for a kernel whose smaller side
    # has at least NEWTON_SCHULZ_MIN_COLUMNS columns where Keras computes on an accelerator, and
    # takes the eigh otherwise (fewer columns, or a CPU). A Gaussian 600 x NS_COLUMNS kernel,
    # tall or wide, is one the iteration converges on; one column fewer is below the threshold.
    rng = np.random.default_rng(15)
    w = rng.normal(size=(600, NS_COLUMNS))
    assert bool(newton_schulz_square_roots(_gram(w)).converged)

    def ran(kernel):
        g = rng.normal(size=kernel.shape)
        direction, info = end_to_end_direction(kernel, g, 2, return_info=True)
        expected = reference_direction(kernel, g, 2)
        assert np.linalg.norm(np.asarray(direction) - expected) <= 1e-12 * np.linalg.norm(expected)
        kept = _ran(compute_preconditioner(kernel, 2, return_info=True)[1])
        assert kept == _ran(info)
        return kept

    here = "newton_schulz" if _keras_computes_on_an_accelerator() else "eigh"
    assert preconditioning.auto_tries_newton_schulz(NS_COLUMNS) == (here == "newton_schulz")
    assert ran(w) == ran(w.T) == here
    monkeypatch.setattr(preconditioning, "_on_accelerator", lambda: True)
    assert preconditioning.auto_tries_newton_schulz(NS_COLUMNS)
    assert ran(w) == ran(w.T) == "newton_schulz"
    assert not preconditioning.auto_tries_newton_schulz(NS_COLUMNS - 1)
    assert ran(w[:, : NS_COLUMNS - 1]) == "eigh"
    monkeypatch.setattr(preconditioning, "_on_accelerator", lambda: False)
    assert ran(w) == "eigh"


def test_the_report_is_decided_at_run_time_inside_a_compiled_function():
    rng = np.random.default_rng(13)
    fn = compiled(lambda w, g: end_to_end_direction(w, g, 2, method="newton_schulz", return_info=True))
    conditioned, _ = _conditioned((40, 8), 1e3, seed=13)
    for w, ran in [(rng.normal(size=(40, 8)), "newton_schulz"), (conditioned, "eigh")]:
        g = rng.normal(size=w.shape)
        direction, info = fn(ops.convert_to_tensor(w, "float32"), ops.convert_to_tensor(g, "float32"))
        assert _ran(info) == ran
        expected = reference_direction(w, g, 2)
        assert np.linalg.norm(np.asarray(direction) - expected) <= 1e-4 * np.linalg.norm(expected)


@pytest.mark.parametrize("shape", [(3, 30, 8), (3, 8, 30)])
def test_a_stack_of_kernels_takes_one_batched_call(shape):
    # Every kernel converges: one batched Newton-Schulz iteration. One rank-deficient kernel in
    # the stack: one batched eigh for all. One non-finite kernel: NaN there only. Each entry
    # against NumPy, through the direction and through the kept preconditioner.
    rng = np.random.default_rng(14)
    w, g = rng.normal(size=shape), rng.normal(size=shape)
    deficient = w.copy()
    deficient[1] = _rank_deficient(rng, shape[1:], 2)
    for kernels, ran in [(w, "newton_schulz"), (deficient, "eigh")]:
        for method in ["newton_schulz", "auto", "eigh"]:
            direction, info = end_to_end_direction(kernels, g, 2, method=method, return_info=True)
            assert _ran(info) == (ran if method == "newton_schulz" else "eigh"), method
            kept = compute_preconditioner(kernels, 2, method=method)
            assert [tuple(x.shape) for x in kept] == list(preconditioner_shapes(shape, 2))
            applied = apply_preconditioner(kept, g)
            for index in range(shape[0]):
                expected = reference_direction(kernels[index], g[index], 2)
                for result in [direction, applied]:
                    np.testing.assert_allclose(
                        np.asarray(result)[index], expected, rtol=0, atol=1e-12 * np.abs(expected).max()
                    )
    poisoned = w.copy()
    poisoned[2, 0, 0] = np.nan
    direction = np.asarray(end_to_end_direction(poisoned, g, 2, method="newton_schulz"))
    assert np.all(np.isnan(direction[2])) and np.all(np.isfinite(direction[:2]))
    np.testing.assert_allclose(direction[0], reference_direction(w[0], g[0], 2), rtol=1e-12, atol=1e-12)


def test_preconditioner_shapes_are_those_computed():
    for shape, depth in itertools.product([(5, 3), (3, 5), (2, 4, 6), (4, 1)], [1, 2, 3]):
        computed = compute_preconditioner(_grad(shape), depth)
        shapes = preconditioner_shapes(shape, depth)
        assert type(shapes) is type(computed)
        assert [tuple(x.shape) for x in computed] == list(shapes), (shape, depth)


def test_newton_schulz_tuning_values_and_diagnostics():
    rng = np.random.default_rng(15)
    gram = _gram(rng.normal(size=(200, 40)))
    default = newton_schulz_square_roots(gram)
    steps = int(np.asarray(default.steps))
    assert bool(default.converged) and 1 <= steps <= preconditioning.NEWTON_SCHULZ_MAX_STEPS
    assert float(np.asarray(default.residual)) <= np.sqrt(np.finfo(np.float64).eps)
    # Fewer steps allowed than the prediction asks: declined, nothing run.
    declined = newton_schulz_square_roots(gram, max_steps=1)
    assert not bool(declined.converged) and int(np.asarray(declined.steps)) == 0
    assert np.isinf(float(np.asarray(declined.residual)))
    # A looser tolerance stops earlier.
    assert int(np.asarray(newton_schulz_square_roots(gram, tolerance=1e-2).steps)) < steps
    # Forced to start on an ill-conditioned matrix: it runs out of steps, unconverged.
    conditioned, _ = _conditioned((200, 40), 1e3, seed=15)
    forced = newton_schulz_square_roots(_gram(conditioned), max_steps=4, spare_steps=2, decline_below=0.0)
    assert not bool(forced.converged) and int(np.asarray(forced.steps)) == 6
    assert float(np.asarray(forced.residual)) > np.sqrt(np.finfo(np.float64).eps)


def test_bad_methods_and_shapes_raise():
    kernel, wrong = ops.ones((4, 3)), ops.ones((3, 4))
    for depth in [1, 2, 3]:
        with pytest.raises(ValueError, match=r"gradient.*\(4, 3\).*\(3, 4\)"):
            end_to_end_direction(kernel, wrong, depth)
    with pytest.raises(ValueError, match="gradient"):
        end_to_end_direction(ops.ones((2, 4, 3)), ops.ones((3, 4, 3)), 2)
    with pytest.raises(ValueError, match="kernel"):
        end_to_end_direction(ops.ones((4,)), ops.ones((4,)), 2)
    with pytest.raises(ValueError, match="method"):
        end_to_end_direction(kernel, kernel, 2, method="svd")
    with pytest.raises(ValueError, match="method"):
        end_to_end_direction(kernel, kernel, 3, method="newton_schulz")
    with pytest.raises(ValueError, match="method"):
        compute_preconditioner(kernel, 3, method="newton_schulz")
    kept = compute_preconditioner(kernel, 2)
    with pytest.raises(ValueError, match="gradient"):
        apply_preconditioner(kept, ops.ones((4, 4)))
    with pytest.raises(ValueError, match="preconditioner"):
        apply_preconditioner(tuple(kept), kernel)
    with pytest.raises(ValueError, match="shape"):
        preconditioner_shapes((3,), 2)
    gram = ops.eye(3)
    for kwargs, name in [
        ({"max_steps": 0}, "max_steps"),
        ({"spare_steps": -1}, "spare_steps"),
        ({"lanczos_steps": 2.5}, "lanczos_steps"),
        ({"tolerance": 2.0}, "tolerance"),
        ({"decline_below": -0.1}, "decline_below"),
    ]:
        with pytest.raises(ValueError, match=name):
            newton_schulz_square_roots(gram, **kwargs)
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz_square_roots(ops.ones((3, 4)))
    with pytest.raises(ValueError, match="steps"):
        lanczos_extremes(gram, 0)


def test_the_eigenbasis_form_applies_at_depth_two_too():
    # `apply_preconditioner` takes a `Preconditioner` at any depth, 2 included, where
    # `compute_preconditioner` returns the root form.
    for name in ["tall", "wide", "very_tall", "square_rank2"]:
        w, g = KERNELS[name], _grad(KERNELS[name].shape, seed=9)
        tall = ops.convert_to_tensor(w if w.shape[0] >= w.shape[1] else w.T)
        expected = reference_direction(w, g, 2)
        applied = np.asarray(apply_preconditioner(eigh.eigen_preconditioner(tall, 2), ops.convert_to_tensor(g)))
        np.testing.assert_allclose(applied, expected, rtol=0, atol=1e-12 * np.abs(expected).max(), err_msg=name)
