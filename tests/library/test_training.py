"""Tests for `EndToEndModel` (tf_overparam/models.py): the end-to-end update rule (eq. 24) as a
Keras training step, and the paper's claim that it follows gradient descent on a balanced
depth-N chain."""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _backend import (
    assert_allclose_through_keras,
    keras_float64_rtol,
    layer_gradients,
)  # tests/ is on sys.path (rootdir-relative import)
from _reference import reference_direction

import tf_overparam as to

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _expected_step(model, kernels, x, y, eta, depth, weight_decay, loss_fn, sample_weight=None):
    """Weights after one SGD(eta) step of eq. 24 on `kernels`, plain SGD on everything else.

    The gradient is taken through the model's forward pass and `loss_fn` (tests/_backend.py), not
    by the model's train step."""
    variables = model.trainable_variables
    grads = layer_gradients(model, lambda out: loss_fn(y, out, sample_weight=sample_weight), x)
    kernel_ids = {id(k) for k in kernels}
    expected = []
    for variable, grad in zip(variables, grads):
        value, grad = np.asarray(variable), np.asarray(grad)
        if id(variable) in kernel_ids:
            expected.append(value - eta * (reference_direction(value, grad, depth) + weight_decay * depth * value))
        else:
            expected.append(value - eta * grad)
    return expected


def _data(n=32, d=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, k)) + 0.1 * rng.normal(size=(n, k))
    return x, y


def _functional(depth=3, weight_decay=0.0, seed=0, d=4, k=2):
    inputs = keras.Input((d,))
    hidden = keras.layers.Dense(
        3,
        activation="tanh",
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 1),
    )
    out = keras.layers.Dense(
        k,
        kernel_initializer=keras.initializers.RandomNormal(seed=seed + 2),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 3),
    )
    model = to.EndToEndModel(inputs, out(hidden(inputs)), depth=depth, weight_decay=weight_decay)
    return model, [hidden.kernel, out.kernel]


# --- one step is eq. 24 --------------------------------------------------------------------------


def test_one_sgd_step_of_single_dense_is_hand_applied_eq24(float64):
    # One Dense (4 -> 3) with bias, l2 loss (1/2) mean (xW + b - y)^2: G = x^T R / (n k) by hand.
    x, y = _data(k=3)
    rng = np.random.default_rng(1)
    w0, b0 = rng.normal(size=(4, 3)), rng.normal(size=3)
    eta = 0.1
    for depth, lam in [(2, 0.0), (3, 0.0), (3, 0.2), (4, 0.05)]:
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(3)
        model = to.EndToEndModel(inputs, dense(inputs), depth=depth, weight_decay=lam)
        dense.set_weights([w0, b0])
        model.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
        model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
        residual = x @ w0 + b0 - y
        grad_w, grad_b = x.T @ residual / residual.size, residual.sum(0) / residual.size
        expected_w = w0 - eta * (reference_direction(w0, grad_w, depth) + lam * depth * w0)
        # Float64: agreement to 1e-12. The bias gets its plain gradient and no decay.
        np.testing.assert_allclose(
            np.asarray(dense.kernel), expected_w, rtol=1e-12, atol=1e-12, err_msg=f"{depth}, {lam}"
        )
        np.testing.assert_allclose(np.asarray(dense.bias), b0 - eta * grad_b, rtol=1e-12, atol=1e-12)
        # And it is not plain gradient descent.
        assert np.abs(np.asarray(dense.kernel) - (w0 - eta * grad_w)).max() > 1e-3


def test_single_output_step_matches_eq27(float64):
    x, y = _data(k=1)
    w0 = np.random.default_rng(2).normal(size=(4, 1))
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(1, use_bias=False)
    model = to.EndToEndModel(inputs, dense(inputs), depth=3, weight_decay=0.1)
    dense.set_weights([w0])
    model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    g = x.T @ (x @ w0 - y) / len(x)
    norm2 = np.sum(w0**2)
    eq27 = norm2 ** (2 / 3) * (g + 2 * np.sum(g * w0) / norm2 * w0)
    np.testing.assert_allclose(np.asarray(dense.kernel), (1 - 0.05 * 0.1 * 3) * w0 - 0.05 * eq27, rtol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_functional_and_subclassed_models_step_by_eq24(float64, weight_decay):
    x, y = _data()
    eta, depth = 0.05, 3
    functional, kernels = _functional(depth, weight_decay)
    expected = _expected_step(functional, kernels, x, y, eta, depth, weight_decay, to.LpLoss(2))
    functional.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
    functional.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for variable, value in zip(functional.trainable_variables, expected, strict=True):
        assert_allclose_through_keras(np.asarray(variable), value, rtol=1e-12, atol=1e-12, err_msg=variable.path)

    class Sub(to.EndToEndModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(
                3, activation="tanh", kernel_initializer=keras.initializers.RandomNormal(seed=4)
            )
            self.head = keras.layers.Dense(2, kernel_initializer=keras.initializers.RandomNormal(seed=5))
            self.other = to.OverparamDense(2, depth=2, factor_initializer=keras.initializers.RandomNormal(seed=6))

        def call(self, inputs):
            return self.head(self.hidden(inputs)) + self.other(inputs)

    sub = Sub(depth=depth, weight_decay=weight_decay)
    sub(x[:1])
    assert sub.depth == depth and sub.weight_decay == weight_decay
    assert len(sub.preconditioned_kernels()) == 2  # the OverparamDense chain is not preconditioned
    # Only the two Dense kernels follow eq. 24; the OverparamDense factors get plain gradients.
    expected = _expected_step(sub, [sub.hidden.kernel, sub.head.kernel], x, y, eta, depth, weight_decay, to.LpLoss(2))
    sub.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
    sub.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for variable, value in zip(sub.trainable_variables, expected, strict=True):
        assert_allclose_through_keras(np.asarray(variable), value, rtol=1e-12, atol=1e-12, err_msg=variable.path)


def test_sample_weight_loss_and_step(float64):
    x, y = _data()
    sample_weight = np.random.default_rng(3).uniform(0.0, 2.0, size=len(x))
    model, kernels = _functional(depth=2)
    plain = keras.Model(model.inputs, model.outputs)  # the same layers, Keras' own train step
    weights = [np.asarray(v) for v in model.weights]
    # Loss as Keras weights it ("sum_over_batch_size": sum_i w_i l_i / n).
    outputs = model.predict(x, verbose=0)
    per_example = 0.5 * np.mean((outputs - y) ** 2, axis=-1)
    hand_loss = np.sum(sample_weight * per_example) / len(x)
    expected = _expected_step(model, kernels, x, y, 0.05, 2, 0.0, to.LpLoss(2), sample_weight=sample_weight)

    plain.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(2))
    plain_loss = plain.fit(x, y, sample_weight=sample_weight, batch_size=len(x), verbose=0).history["loss"][0]
    for variable, value in zip(model.weights, weights):
        variable.assign(value)  # undo the plain step (shared layers)
    model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(2))
    loss = model.fit(x, y, sample_weight=sample_weight, batch_size=len(x), verbose=0).history["loss"][0]
    assert loss == pytest.approx(plain_loss, rel=1e-12)
    assert loss == pytest.approx(hand_loss, rel=1e-12)
    for variable, value in zip(model.trainable_variables, expected):
        assert_allclose_through_keras(np.asarray(variable), value, rtol=1e-12, atol=1e-12)


def test_steps_per_execution_gives_the_same_weights(float64):
    x, y = _data()
    final = []
    for steps_per_execution in [1, 4]:
        keras.backend.clear_session()
        model, _ = _functional(depth=3, weight_decay=0.05)
        model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(4), steps_per_execution=steps_per_execution)
        history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        final.append(([np.asarray(v) for v in model.weights], history.history["loss"]))
    for a, b in zip(final[0][0], final[1][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(final[0][1], final[1][1], rtol=1e-12)


def test_metrics_reported_and_evaluate_untouched(float64):
    x, y = _data()
    model, _ = _functional(depth=3)
    pred = model.predict(x, verbose=0)
    model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(2), metrics=["mae", keras.metrics.MeanSquaredError()])
    # evaluate is Keras' own test step: the loss and metrics of the current weights.
    evaluation = model.evaluate(x, y, batch_size=len(x), return_dict=True, verbose=0)
    assert evaluation["loss"] == pytest.approx(0.5 * np.mean((pred - y) ** 2), rel=keras_float64_rtol(1e-12))
    assert evaluation["mae"] == pytest.approx(np.mean(np.abs(pred - y)), rel=keras_float64_rtol(1e-12))
    assert evaluation["mean_squared_error"] == pytest.approx(np.mean((pred - y) ** 2), rel=keras_float64_rtol(1e-12))
    history = model.fit(x, y, batch_size=len(x), epochs=2, verbose=0).history
    assert set(history) == {"loss", "mae", "mean_squared_error"}
    # Metrics of the first epoch are those of the starting weights (one full batch).
    assert history["mae"][0] == pytest.approx(np.mean(np.abs(pred - y)), rel=keras_float64_rtol(1e-12))
    assert history["mean_squared_error"][0] == pytest.approx(np.mean((pred - y) ** 2), rel=keras_float64_rtol(1e-12))
    assert history["loss"][1] < history["loss"][0]
    # evaluate of the trained weights equals that of a plain keras.Model holding them.
    twin = keras.Model(model.inputs, model.outputs)
    twin.compile(loss=to.LpLoss(2), metrics=["mae"])
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0)[:2], twin.evaluate(x, y, verbose=0), rtol=1e-12)


def test_mixed_float16_with_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = _data(n=64)
    x, y = x.astype("float32"), y.astype("float32")
    eta, depth, lam = 0.05, 2, 1.0
    model, kernels = _functional(depth=depth, weight_decay=lam)
    model.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(k.dtype == "float32" for k in kernels)
    assert keras.backend.standardize_dtype(model(x[:2]).dtype) == "float16"
    expected = _expected_step(model, kernels, x, y, eta, depth, lam, to.LpLoss(2))
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    # The gradient is scaled by the loss scale (2^15) and unscaled by the optimizer; the decay
    # term (a large part of this step, lambda N = 2) must be too. float16 forward pass: 1e-3.
    for variable, value in zip(model.trainable_variables, expected):
        np.testing.assert_allclose(np.asarray(variable), value, rtol=1e-3, atol=1e-3, err_msg=variable.path)
    # Without the (strong) decay, and from O(1) weights (near zero the preconditioner is near
    # zero too), training lowers the loss.
    model, _ = _functional(depth=depth, weight_decay=0.0)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    model.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
    history = model.fit(x, y, batch_size=16, epochs=10, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < 0.85 * history[0]


@pytest.mark.tf_only("tf.distribute.MirroredStrategy")
def test_mirrored_strategy_on_two_cpus_matches_one_device(tmp_path):
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, numpy as np, tf_overparam as to
        keras.backend.set_floatx("float64")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4)); y = x @ rng.normal(size=(4, 2)) + 0.1 * rng.normal(size=(32, 2))
        init = [rng.normal(size=s) * 0.5 for s in [(4, 3), (3,), (3, 2), (2,)]]

        def build():
            inputs = keras.Input((4,))
            hidden = keras.layers.Dense(3, activation="tanh")(inputs)
            model = to.EndToEndModel(inputs, keras.layers.Dense(2)(hidden), depth=3, weight_decay=0.1)
            model.set_weights(init)
            model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(2), metrics=["mae"])
            return model

        single = build()
        single_history = single.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            mirrored = build()
        mirrored_history = mirrored.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history
        np.savez({str(tmp_path / "out.npz")!r},
                 *[w for pair in zip(single.get_weights(), mirrored.get_weights()) for w in pair],
                 losses=np.array([single_history["loss"], mirrored_history["loss"]]),
                 mae=np.array([single_history["mae"], mirrored_history["mae"]]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    weights = [out[f"arr_{i}"] for i in range(8)]
    for single, mirrored in zip(weights[::2], weights[1::2]):
        # Per-replica directions (linear in G) and decay terms (1/replicas each) sum to the
        # single-device step: agreement to float64 rounding (1e-12).
        np.testing.assert_allclose(mirrored, single, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["losses"][1], out["losses"][0], rtol=1e-12)
    np.testing.assert_allclose(out["mae"][1], out["mae"][0], rtol=1e-12)


def test_terminate_on_nan_stops_a_diverging_run():
    x, y = _data(n=16)
    x, y = x.astype("float32"), (10 * y).astype("float32")
    inputs = keras.Input((4,))
    model = to.EndToEndModel(inputs, keras.layers.Dense(2)(inputs), depth=2)
    model.compile(keras.optimizers.SGD(10.0), loss=to.LpLoss(4))
    history = model.fit(
        x, y, batch_size=16, epochs=100, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    ).history["loss"]
    assert len(history) < 100
    assert not np.isfinite(history[-1])
    assert np.all(np.isfinite(history[:-1]))


def test_model_without_dense_kernel_raises_on_fit():
    inputs = keras.Input((4,))
    model = to.EndToEndModel(inputs, to.OverparamDense(2, depth=2)(inputs), depth=2)
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(ValueError, match="Dense"):
        model.fit(np.ones((4, 4), "float32"), np.ones((4, 2), "float32"), verbose=0)


def test_bad_arguments_raise():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(inputs)
    for bad in [-0.1, -1, "0.1", True, float("nan")]:
        with pytest.raises(ValueError, match="weight_decay"):
            to.EndToEndModel(inputs, outputs, weight_decay=bad)
    for bad in [0, 1.5, "2"]:
        with pytest.raises(ValueError, match="depth"):
            to.EndToEndModel(inputs, outputs, depth=bad)


def test_save_and_load_keep_depth_and_weight_decay(float64, tmp_path):
    x, y = _data()
    model, _ = _functional(depth=4, weight_decay=0.05)
    model.compile(keras.optimizers.SGD(0.05), loss=to.LpLoss(4))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, to.EndToEndModel) and type(loaded) is type(model)
    assert loaded.depth == 4 and loaded.weight_decay == 0.05
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Training continues by the same rule: one more identical step on both.
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    loaded.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


# --- the paper's claim: eq. 24 is gradient descent on a balanced deep chain ----------------------


class _FullBatch(keras.utils.PyDataset):
    """The full batch, `steps` times (any backend)."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.batch, self.steps = (x, y), steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.batch


def _deep_vs_end_to_end(eta, steps, depth, units, p, weight_decay, seed=0):
    """Max |W_deep - W_e2e| after `steps` steps of size eta, and the kernel's total movement."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 5))
    y = x @ (0.5 * rng.normal(size=(5, units))) + 0.1 * rng.normal(size=(32, units))
    data = _FullBatch(x, y, steps)

    chain = to.OverparamDense(
        units,
        depth=depth,
        use_bias=False,
        factor_initializer=to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.3, seed=seed), seed=seed),
    )
    deep = keras.Sequential([keras.Input((5,)), chain])
    # Deep side: plain SGD, each factor decayed by (1 - eta lambda) per step (eq. 11).
    deep.compile(
        keras.optimizers.SGD(eta, weight_decay=weight_decay or None), loss=to.LpLoss(p), steps_per_execution=steps
    )
    start = np.asarray(chain.kernel)
    assert np.abs(start).max() > 0.05  # a non-zero start (W_e = 0 is a fixed point)

    inputs = keras.Input((5,))
    dense = keras.layers.Dense(units, use_bias=False)
    shallow = to.EndToEndModel(inputs, dense(inputs), depth=depth, weight_decay=weight_decay)
    dense.kernel.assign(start)
    shallow.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(p), steps_per_execution=steps)

    deep.fit(data, epochs=1, shuffle=False, verbose=0)
    shallow.fit(data, epochs=1, shuffle=False, verbose=0)
    end = np.asarray(dense.kernel)
    return np.abs(np.asarray(chain.kernel) - end).max(), np.abs(end - start).max()


@pytest.mark.parametrize(
    "p, units, weight_decay, depth",
    [(2, 1, 0.0, 2), (4, 1, 0.1, 3), (2, 3, 0.1, 3), (4, 3, 0.0, 2), (2, 1, 0.1, 4), (4, 3, 0.1, 3)],
)
def test_end_to_end_rule_tracks_deep_gradient_descent_with_gap_linear_in_eta(float64, p, units, weight_decay, depth):
    eta, steps = (0.02, 200) if p == 2 else (0.01, 200)
    gap, moved = _deep_vs_end_to_end(eta, steps, depth, units, p, weight_decay)
    gap_half, moved_half = _deep_vs_end_to_end(eta / 2, 2 * steps, depth, units, p, weight_decay)
    print(
        f"l{p}, units {units}, wd {weight_decay}, depth {depth}: gap {gap:.3e} (eta), {gap_half:.3e} (eta/2), "
        f"ratio {gap / gap_half:.3f}, kernel moved {moved:.3f}"
    )
    # Both runs reach the same time eta * steps, over which the kernel moves by O(1) ...
    assert moved > 0.2 and moved_half == pytest.approx(moved, rel=0.01)
    # ... while the two dynamics stay within 1% of that movement ...
    assert gap < 0.01 * moved
    # ... and their gap is O(eta): halving eta (twice the steps) halves it.
    assert 1.5 <= gap / gap_half <= 2.7
