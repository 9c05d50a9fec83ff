"""The full-batch grid engine against Keras' own training, and its divergence handling."""

import keras
import numpy as np
import pytest
from _synthetic_data import regression

import tf_overparam as to
from experiments.data import gas_sensor
from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer, log_schedule
from tf_overparam import initializers

STEPS = 30


@pytest.fixture(params=["synthetic", "real"])
def ethanol(request):
    """(x, y) float64: a synthetic z-scored linear problem (always), and the real Ethanol data
    (skipped without the shared data, required under CI)."""
    if request.param == "synthetic":
        return regression(rows=1316, inputs=128, seed=7)  # the real data's shape
    data = gas_sensor.load_ethanol(request.getfixturevalue("gas_sensor_dir"))
    return data.x.astype("float64"), data.y.astype("float64")


def _fit_losses(model, x, y, optimizer, p):
    """Per-step full-batch losses of model.fit: loss after t updates, t = 0..STEPS-1."""
    model.compile(optimizer=optimizer, loss=to.LpLoss(p), steps_per_execution=STEPS)
    history = model.fit(x, y, batch_size=len(x), epochs=STEPS, shuffle=False, verbose=0)
    return np.asarray(history.history["loss"])


def _engine_losses(x, y, spec, rate, model_kernel_factors):
    trainer = FullBatchTrainer(x, y, spec, [rate], dtype="float64")
    for variable, value in zip(trainer.factors, model_kernel_factors):
        variable.assign(value[np.newaxis])
    result = trainer.run(STEPS, schedule=np.arange(STEPS))
    return result.losses[:, 0]


@pytest.mark.parametrize(
    "optimizer, rate, keras_optimizer",
    [
        # Rates are powers of 2: Keras keeps its learning rate in float32.
        ("gd", 2.0**-10, lambda r: keras.optimizers.SGD(r)),
        ("adam", 2.0**-7, lambda r: keras.optimizers.Adam(r)),
        ("adagrad", 2.0**-3, lambda r: keras.optimizers.Adagrad(r)),
        ("adadelta", 1.0, lambda r: keras.optimizers.Adadelta(r)),
    ],
)
@pytest.mark.parametrize("depth, width", [(1, 1), (2, 1), (3, 4)])
def test_engine_matches_model_fit(ethanol, float64, optimizer, rate, keras_optimizer, depth, width):
    # Both sides are float64 and differ only in summation order: 1e-9 relative for GD. The
    # adaptive rules divide by sqrt(second moment), which amplifies round-off in near-zero
    # gradient entries, so they get 1e-5. Keras' float64 Adam takes its betas through float32
    # (ops.cast of a Python float); update_rules casts them the same way, so both follow one rule.
    x, y = ethanol
    init = initializers.Balanced(keras.initializers.RandomNormal(stddev=0.05, seed=1), seed=2)
    layer = to.OverparamDense(1, depth=depth, hidden_units=width, use_bias=False, factor_initializer=init)
    model = keras.Sequential([keras.Input((x.shape[1],)), layer])
    start = [keras.ops.convert_to_numpy(f) for f in layer.factors]
    spec = ChainSpec(depth=depth, hidden_units=width, optimizer=optimizer, p=4)
    expected = _fit_losses(model, x, y, keras_optimizer(rate), p=4)
    rtol = 1e-9 if optimizer == "gd" else 1e-5
    np.testing.assert_allclose(_engine_losses(x, y, spec, rate, start), expected, rtol=rtol)


@pytest.mark.parametrize("p", [2, 4])
def test_end_to_end_rule_matches_end_to_end_model(ethanol, float64, p):
    x, y = ethanol
    inputs = keras.Input((x.shape[1],))
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.RandomNormal(0.005, seed=3))
    model = to.EndToEndModel(inputs, dense(inputs), depth=3)
    start = keras.ops.convert_to_numpy(dense.kernel)
    expected = _fit_losses(model, x, y, keras.optimizers.SGD(2.0**-10), p=p)
    spec = ChainSpec(depth=3, update="end_to_end", p=p)
    np.testing.assert_allclose(_engine_losses(x, y, spec, 2.0**-10, [start]), expected, rtol=1e-9)


def test_grid_points_are_independent_and_divergence_is_recorded(ethanol):
    x, y = ethanol
    spec = ChainSpec(depth=2, p=4, initializer=initializers.NearZero(0.05))
    rates = [1e-4, 1e-3, 10.0]
    grid = FullBatchTrainer(x, y, spec, rates, seeds=(0, 1)).run(200, schedule=[0, 50, 200])
    assert grid.losses.shape == (3, 6)
    for g, (rate, seed) in enumerate(zip(grid.learning_rates, grid.seeds)):
        alone = FullBatchTrainer(x, y, spec, [rate], seeds=(int(seed),)).run(200, schedule=[0, 50, 200])
        np.testing.assert_allclose(grid.losses[:, g], alone.losses[:, 0], rtol=1e-4)
        assert grid.diverged_at[g] == alone.diverged_at[0]
    diverged = grid.learning_rates == 10.0
    assert np.all(grid.diverged_at[diverged] >= 1) and np.all(grid.diverged_at[~diverged] == -1)
    assert np.all(np.isnan(grid.losses[-1, diverged])) and np.all(np.isfinite(grid.losses[:, ~diverged]))
    # Diverged at iteration t: the loss after t - 1 updates was within the bound, after t not.
    for g in np.flatnonzero(diverged):
        t = int(grid.diverged_at[g])
        trainer = FullBatchTrainer(x, y, spec, [10.0], seeds=(int(grid.seeds[g]),))
        trainer.advance(t - 1)
        bound = trainer.divergence_bound.numpy()[0]
        assert trainer.loss().numpy()[0] <= bound
        trainer.advance(1)
        assert not trainer.loss().numpy()[0] <= bound


def test_log_schedule_covers_start_and_end_in_order():
    schedule = log_schedule(1_000_000, points=100)
    assert schedule[0] == 0 and schedule[-1] == 1_000_000
    assert np.all(np.diff(schedule) > 0)
    assert {1, 2, 3}.issubset(set(schedule.tolist()))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="optimizer"):
        ChainSpec(optimizer="rmsprop")
    with pytest.raises(ValueError, match="update"):
        ChainSpec(update="deep")
    with pytest.raises(ValueError, match="depth"):
        ChainSpec(depth=0)
    with pytest.raises(ValueError, match="learning_rates"):
        FullBatchTrainer(np.eye(2), np.ones((2, 1)), ChainSpec(), [0.1, -1.0])
