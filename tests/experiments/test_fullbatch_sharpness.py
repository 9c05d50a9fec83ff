"""FullBatchTrainer.sharpness (batched Lanczos over the grid) against Hessians found another way:
by hand for a linear model, by the library's autodiff `sharpness` for a chain; and its trace in
`run` and in the run folder's grid files."""

import keras
import numpy as np
import pytest

import tf_overparam as to
from experiments.common import runstate
from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer, GridResult, sharpness_schedule
from tf_overparam import diagnostics, initializers

EXAMPLES, INPUTS, UNITS = 20, 5, 2


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(EXAMPLES, INPUTS))
    return x, x @ rng.normal(size=(INPUTS, UNITS)) + 0.3 * rng.normal(size=(EXAMPLES, UNITS))


def _dimension(trainer):
    return sum(int(np.prod(f.shape[1:])) for f in trainer.factors)


def test_least_squares_sharpness_is_the_top_eigenvalue_of_the_data_covariance():
    # L = 1/(m u) sum_{i,k} (1/2) (x_i . w_k - y_ik)^2, so d2L / dw_k dw_k' = [k = k'] X^T X / (m u):
    # H = (X^T X / (m u)) (x) I_u, whatever the weights. Its eigenvalues repeat u times, so the
    # Krylov space is exhausted before the dimension: the restart path runs too.
    x, y = _data()
    trainer = FullBatchTrainer(x, y, ChainSpec(depth=1, p=2), [0.01, 0.1], seeds=(0, 1), dtype="float64")
    trainer.advance(3)
    expected = np.linalg.eigvalsh(x.T @ x / (EXAMPLES * UNITS))[-1]
    values = trainer.sharpness(iterations=_dimension(trainer))
    assert values.shape == (4,)
    np.testing.assert_allclose(values, expected, rtol=1e-6)


@pytest.mark.parametrize("depth, update", [(1, "chain"), (2, "end_to_end")])
def test_l4_sharpness_of_a_linear_model_matches_the_analytic_hessian(depth, update):
    # L = 1/(m u) sum_{i,k} (1/4) r_ik^4 with r = X W - Y: the block of output k is
    # 3 sum_i r_ik^2 x_i x_i^T / (m u), and the blocks of different outputs do not couple.
    # The end-to-end rule trains W itself: its Hessian is this one (not eq. 24's preconditioned).
    x, y = _data(1)
    spec = ChainSpec(depth=depth, update=update, p=4, initializer=initializers.NearZero(0.5))
    trainer = FullBatchTrainer(x, y, spec, [1e-3, 3e-3], seeds=(2, 3), dtype="float64")
    trainer.advance(5)
    values = trainer.sharpness(iterations=_dimension(trainer))
    for g, kernel in enumerate(trainer.kernel().numpy()):
        residual = x @ kernel - y
        blocks = [3 * (x * residual[:, [k]] ** 2).T @ x / (EXAMPLES * UNITS) for k in range(UNITS)]
        expected = max(np.linalg.eigvalsh(block)[-1] for block in blocks)
        np.testing.assert_allclose(values[g], expected, rtol=1e-6)


def test_chain_sharpness_matches_the_library_autodiff_sharpness_of_the_same_keras_model(float64):
    # The library differentiates the Keras model twice by reverse-mode autodiff; the engine
    # takes forward-mode derivatives of its hand-written gradient, batched over the grid.
    x, y = _data(2)
    spec = ChainSpec(depth=2, hidden_units=3, p=4, initializer=initializers.NearZero(0.3))
    trainer = FullBatchTrainer(x, y, spec, [1e-3, 1e-2], seeds=(0, 5), dtype="float64")
    trainer.advance(4)
    dimension = _dimension(trainer)
    values = trainer.sharpness(iterations=dimension)
    assert np.all(np.isfinite(values))  # no grid point diverged: a comparison of numbers
    layer = to.OverparamDense(UNITS, depth=2, hidden_units=3, use_bias=False)
    model = keras.Sequential([keras.Input((INPUTS,)), layer])
    for g in range(trainer.grid):
        for variable, factor in zip(layer.factors, trainer.factors):
            variable.assign(factor.numpy()[g])
        expected = diagnostics.sharpness(model, x, y, loss=to.LpLoss(4), iterations=dimension)
        np.testing.assert_allclose(values[g], expected, rtol=1e-6)
    # Steps past the dimension are not taken: the same value.
    np.testing.assert_allclose(trainer.sharpness(iterations=dimension + 10), values, rtol=1e-6)


def test_a_diverged_grid_point_is_nan_and_leaves_the_others_alone():
    x, y = _data(3)
    spec = ChainSpec(depth=2, hidden_units=3, p=2, initializer=initializers.NearZero(0.5))
    trainer = FullBatchTrainer(x, y, spec, [0.01, 30.0, 1e3], dtype="float64", blowup=1e3)
    dimension = _dimension(trainer)

    def alone_value():
        alone = FullBatchTrainer(x, y, spec, [0.01], dtype="float64")
        alone.advance(trainer.iteration)
        return alone.sharpness(iterations=dimension)[0]

    # Just past the blow-up bound, rate 30's factors are still finite: NaN for being diverged.
    while np.isfinite(trainer.advance(1)[1]):
        assert trainer.iteration < 100
    assert all(np.all(np.isfinite(f.numpy()[1])) for f in trainer.factors)
    values = trainer.sharpness(iterations=dimension)
    assert np.isnan(values[1]) and np.isnan(values[2])
    np.testing.assert_allclose(values[0], alone_value(), rtol=1e-9)
    # Later rate 1e3's factors overflow: its Hessian-vector products are inf/NaN.
    trainer.advance(200)
    assert not np.all(np.isfinite(trainer.factors[0].numpy()[2]))
    values = trainer.sharpness(iterations=dimension)
    assert np.isnan(values[1]) and np.isnan(values[2])
    assert np.isfinite(values[0]) and values[0] > 0
    np.testing.assert_allclose(values[0], alone_value(), rtol=1e-9)


def test_run_traces_the_sharpness_at_the_asked_log_points_and_a_resumed_run_keeps_them():
    x, y = _data(4)
    spec = ChainSpec(depth=2, hidden_units=2, p=4, initializer=initializers.NearZero(0.5))

    def trainer():
        return FullBatchTrainer(x, y, spec, [1e-3, 1e-2], seeds=(0, 1), dtype="float64")

    schedule = [0, 3, 6, 9, 12, 15]
    heard = {}
    result = trainer().run(15, schedule=schedule, on_log=lambda t, i, _: heard.update({i: t.last_sharpness}))
    assert result.sharpness.shape == (0, 4) and result.sharpness_iterations.size == 0  # not asked for
    heard.clear()
    result = trainer().run(
        15, schedule=schedule, sharpness_every=2, on_log=lambda t, i, _: heard.update({i: t.last_sharpness})
    )
    # every second logged iteration from the first, and the last
    np.testing.assert_array_equal(result.sharpness_iterations, [0, 6, 12, 15])
    assert result.sharpness.shape == (4, 4) and result.sharpness.dtype == np.float64
    assert [i for i, value in heard.items() if value is None] == [3, 9]
    for row, iteration in enumerate(result.sharpness_iterations):
        np.testing.assert_array_equal(heard[int(iteration)], result.sharpness[row])
    separate = trainer()
    separate.advance(6)
    np.testing.assert_allclose(result.sharpness[1], separate.sharpness(), rtol=1e-12)

    first = trainer()
    at = sharpness_schedule(schedule, 2)
    head = first.run(6, schedule=schedule[:3], sharpness_at=at)
    second = trainer()
    second.set_state(first.get_state())
    tail = second.run(15, schedule=schedule[3:], sharpness_at=at)
    np.testing.assert_array_equal(np.concatenate([head.sharpness_iterations, tail.sharpness_iterations]), at)
    np.testing.assert_allclose(np.concatenate([head.sharpness, tail.sharpness]), result.sharpness, rtol=1e-12)


def test_sharpness_schedule_rejects_a_bad_count():
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sharpness_every"):
            sharpness_schedule([0, 1, 2], every)
    with pytest.raises(ValueError, match="sharpness_every"):
        FullBatchTrainer(*_data(), ChainSpec(), [0.1]).run(2, schedule=[0, 1, 2], sharpness_every=0)


def test_grid_files_keep_the_sharpness_trace_and_older_files_still_load(tmp_path):
    x, y = _data(5)
    trainer = FullBatchTrainer(x, y, ChainSpec(depth=2, p=4), [1e-3, 1e-2], dtype="float64")
    result = trainer.run(8, schedule=[0, 4, 8], sharpness_every=2)
    runstate.save_grid(tmp_path, "l4/gd-d2", result)
    loaded = runstate.load_grid(tmp_path, "l4/gd-d2", GridResult)
    for field in ("learning_rates", "seeds", "iterations", "losses", "diverged_at", "kernels"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(result, field))
    np.testing.assert_array_equal(loaded.sharpness_iterations, [0, 8])
    np.testing.assert_array_equal(loaded.sharpness, result.sharpness)
    # A file with the first six fields only, as grids were written without a sharpness trace.
    older = {
        f: getattr(result, f) for f in ("learning_rates", "seeds", "iterations", "losses", "diverged_at", "kernels")
    }
    path = tmp_path / runstate.GRIDS / "old.npz"
    np.savez(path, **older)
    loaded = runstate.load_grid(tmp_path, "old", GridResult)
    np.testing.assert_array_equal(loaded.losses, result.losses)
    assert loaded.sharpness_iterations.dtype == np.int64 and loaded.sharpness_iterations.size == 0
    assert loaded.sharpness.shape == (0, 2)
