"""Tests for `tf_overparam.OverparamDense` (tf_overparam/layers/dense.py and base.py)."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _backend import keras_float64_rtol, layer_gradients  # tests/ is on sys.path (rootdir-relative import)

import tf_overparam as to

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _factors(layer):
    return [np.asarray(f.numpy(), dtype=np.float64) for f in layer.factors]


def _numpy_forward(layer, x):
    """x @ F_1 ... F_N + bias, in float64 NumPy, independent of `chain_product`."""
    kernel = functools.reduce(np.matmul, _factors(layer))
    out = np.asarray(x, np.float64) @ kernel
    if layer.use_bias:
        out = out + layer.bias.numpy().astype(np.float64)
    return out


# --- forward pass -------------------------------------------------------------------------------


def test_depth_one_equals_dense_exactly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)).astype("float32")
    deep = to.OverparamDense(3, depth=1, activation="tanh", factor_initializer=keras.initializers.RandomNormal(seed=0))
    dense = keras.layers.Dense(3, activation="tanh")
    deep.build((None, 5))
    dense.build((None, 5))
    assert len(deep.factors) == 1
    dense.kernel.assign(deep.factors[0].numpy())
    deep.bias.assign(rng.normal(size=3).astype("float32"))
    dense.bias.assign(deep.bias.numpy())
    # Same weights, same ops: bit-for-bit equal (tolerance 0).
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(deep(x)), keras.ops.convert_to_numpy(dense(x)))


def test_depth_n_output_is_input_times_factor_product_plus_bias():
    cases = [
        (2, None, (6, 5)),
        (3, 4, (6, 5)),
        (4, [3, 7, 2], (6, 5)),
        (3, [1, 8], (2, 3, 5)),  # ND input: the kernel acts on the last axis
        (2, [2], (2, 2, 3, 5)),
    ]
    for depth, hidden_units, input_shape in cases:
        rng = np.random.default_rng(depth)
        layer = to.OverparamDense(
            4,
            depth=depth,
            hidden_units=hidden_units,
            factor_initializer=keras.initializers.RandomNormal(stddev=0.7, seed=depth),
            bias_initializer=keras.initializers.RandomNormal(seed=1),
            dtype="float64",
        )
        x = rng.normal(size=input_shape)
        out = keras.ops.convert_to_numpy(layer(x))
        hidden = (
            [4] * (depth - 1)
            if hidden_units is None
            else [hidden_units] * (depth - 1)
            if isinstance(hidden_units, int)
            else hidden_units
        )
        widths = [5, *hidden, 4]
        assert [tuple(f.shape) for f in layer.factors] == list(zip(widths[:-1], widths[1:]))
        assert out.shape == input_shape[:-1] + (4,)
        # float64: equal to the NumPy product to 1e-12.
        np.testing.assert_allclose(out, _numpy_forward(layer, x), rtol=1e-12, atol=1e-12, err_msg=str(hidden_units))
        # `.kernel` is the end-to-end product too.
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(layer.kernel),
            functools.reduce(np.matmul, _factors(layer)),
            rtol=1e-12,
            atol=1e-14,
        )


def test_activation_and_no_bias():
    x = np.random.default_rng(1).normal(size=(5, 3))
    layer = to.OverparamDense(
        2,
        depth=3,
        use_bias=False,
        activation="relu",
        dtype="float64",
        factor_initializer=keras.initializers.RandomNormal(seed=3),
    )
    out = keras.ops.convert_to_numpy(layer(x))
    assert layer.bias is None and len(layer.weights) == 3
    np.testing.assert_allclose(out, np.maximum(_numpy_forward(layer, x), 0.0), rtol=1e-12, atol=1e-14)


def test_to_dense_computes_the_same_function():
    x = np.random.default_rng(2).normal(size=(8, 6)).astype("float32")
    layer = to.OverparamDense(
        3,
        depth=3,
        hidden_units=[5, 4],
        activation="sigmoid",
        factor_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=0),
        bias_initializer="ones",
    )
    expected = keras.ops.convert_to_numpy(layer(x))
    dense = layer.to_dense()
    assert type(dense) is keras.layers.Dense
    assert dense.units == 3 and dense.get_config()["activation"] == "sigmoid"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(dense.kernel), keras.ops.convert_to_numpy(layer.kernel), rtol=0, atol=0
    )
    # Same kernel and bias: the outputs agree to float32 rounding of the matmul (tolerance 1e-6).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense(x)), expected, rtol=1e-6, atol=1e-6)


def test_works_inside_a_subclassed_model():
    # A subclassed model builds its layers inside a traced call (shape inference): the chain must
    # still be drawn once, eagerly, and be the one the variables hold.
    for name, initializer in [
        ("balanced", to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.5))),
        ("near_zero", to.initializers.NearZero(0.3)),
        ("identity", to.initializers.Identity(0.9)),
    ]:

        class Sub(keras.Model):
            def __init__(self, initializer=initializer):
                super().__init__()
                self.deep = to.OverparamDense(3, depth=3, hidden_units=[4, 4], factor_initializer=initializer)

            def call(self, inputs):
                return self.deep(inputs)

        model = Sub()
        x = np.random.default_rng(7).normal(size=(5, 6)).astype("float32")
        out = keras.ops.convert_to_numpy(model(x))
        np.testing.assert_allclose(out, _numpy_forward(model.deep, x), rtol=1e-5, atol=1e-6, err_msg=name)
        if name == "balanced":
            # An unseeded Balanced draw, yet one chain: balanced to float32 rounding.
            assert to.diagnostics.balancedness(model.deep).relative < 1e-5
        if name == "identity":
            np.testing.assert_allclose(keras.ops.convert_to_numpy(model.deep.kernel), 0.9**3 * np.eye(6, 3), rtol=1e-6)
    model.compile(keras.optimizers.SGD(0.01), loss="mse")
    before = model.evaluate(x, 0 * x[:, :3], verbose=0)
    model.fit(x, 0 * x[:, :3], epochs=3, verbose=0)
    assert model.evaluate(x, 0 * x[:, :3], verbose=0) < before


def test_unseeded_initializers_draw_each_factor_independently():
    for initializer in ["near_zero", "glorot_uniform", keras.initializers.RandomNormal()]:
        layer = to.OverparamDense(3, depth=4, factor_initializer=initializer)
        layer.build((None, 3))
        values = [f.numpy() for f in layer.factors]  # four 3x3 factors
        for i in range(4):
            for j in range(i + 1, 4):
                assert not np.allclose(values[i], values[j]), (initializer, i, j)


# --- argument checks ----------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors_naming_them():
    for depth in [0, -1, 2.0, "3", True, None]:
        with pytest.raises(ValueError, match="depth"):
            to.OverparamDense(2, depth=depth)
    for hidden_units in [[3], [3, 3, 3], [3, 0], [-1, 2], 0, -2, [2.0, 3], [True, 3]]:
        with pytest.raises(ValueError, match="hidden_units"):
            to.OverparamDense(2, depth=3, hidden_units=hidden_units)
    for units in [0, -3, 1.5, True, np.float32(2.0)]:
        with pytest.raises(ValueError, match="units"):
            to.OverparamDense(units, depth=2)


def test_numpy_integers_are_accepted_as_integer_arguments():
    layer = to.OverparamDense(np.int32(3), depth=np.int64(3), hidden_units=[np.int16(4), np.uint8(2)])
    assert (layer.units, layer.depth, layer.hidden_units) == (3, 3, [4, 2])
    assert all(type(v) is int for v in (layer.units, layer.depth, *layer.hidden_units))
    layer.build((None, 5))
    assert [tuple(f.shape) for f in layer.factors] == [(5, 4), (4, 2), (2, 3)]


def test_kernel_before_build_is_a_clear_error():
    layer = to.OverparamDense(3)
    with pytest.raises(ValueError, match="before the layer is built"):
        _ = layer.kernel
    with pytest.raises(ValueError, match="before the layer is built"):
        layer.to_dense()


# --- order of the products ----------------------------------------------------------------------


def test_inputs_first_threshold_is_the_hand_derived_flop_balance():
    # Two factors n0 x n1 x n2: inputs first costs R (n0 n1 + n1 n2), kernel first n0 n1 n2 + R n0 n2.
    assert to.chain.inputs_first_threshold([20, 6, 5]) == pytest.approx(600 / (120 + 30 - 100))
    assert to.chain.inputs_first_threshold([3136, 512, 512]) == pytest.approx(3136.0)
    # Narrow hidden layer: inputs first is always cheaper; one factor: a single order.
    assert to.chain.inputs_first_threshold([20, 1, 5]) == float("inf")
    assert to.chain.inputs_first_threshold([20, 5]) == 0
    # Three factors 4 x 3 x 5 x 2, product taken from the narrow (output) end: 3*5*2 + 4*3*2.
    assert to.chain.chain_product_flops([4, 3, 5, 2]) == 3 * 5 * 2 + 4 * 3 * 2
    assert to.chain.inputs_first_threshold([4, 3, 5, 2]) == pytest.approx(54 / (12 + 15 + 10 - 8))


def _rounding_bound(x, factors, dtype):
    """Worst-case bound of the floating-point error of x @ F_1 ... F_N in `dtype`, in either
    order: (sum of contracted widths + one rounding of each input) * eps * |x| |F_1| ... |F_N|."""
    eps = np.finfo(dtype).eps
    terms = x.shape[-1] + sum(f.shape[0] for f in factors[1:]) + len(factors) + 1
    return terms * eps * functools.reduce(np.matmul, [np.abs(x)] + [np.abs(f) for f in factors])


@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"])
def test_both_orders_and_the_runtime_choice_equal_the_kernel_product(policy, monkeypatch):
    keras.mixed_precision.set_global_policy(policy)
    try:
        # widths 20 -> 6 -> 5: inputs first below 12 rows, kernel first from 12 rows on.
        layer = to.OverparamDense(
            5,
            depth=2,
            hidden_units=6,
            use_bias=False,
            factor_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=0),
        )
        layer.build((None, 20))
        factors = _factors(layer)
        compute = np.dtype(layer.compute_dtype)
        applied = []
        original = to.layers.dense.apply_chain
        monkeypatch.setattr(to.layers.dense, "apply_chain", lambda x, f: applied.append(1) or original(x, f))
        rng = np.random.default_rng(1)
        for rows, inputs_first in [(4, True), (11, True), (12, False), (40, False)]:
            applied.clear()
            x = rng.normal(size=(rows, 20)).astype(compute)
            out = keras.ops.convert_to_numpy(layer(x)).astype(np.float64)
            assert bool(applied) == inputs_first, rows
            expected = x.astype(np.float64) @ functools.reduce(np.matmul, factors)
            assert np.all(np.abs(out - expected) <= _rounding_bound(x.astype(np.float64), factors, compute)), rows
        # Unknown batch at trace time: the choice is made at run time (keras.ops.cond). Only a
        # TensorFlow graph has an unknown batch; JAX traces with the shapes known.
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            traced = tf.function(layer, input_signature=[tf.TensorSpec((None, 20), compute)])
            for rows in (3, 30):
                x = rng.normal(size=(rows, 20)).astype(compute)
                out = traced(x).numpy().astype(np.float64)
                expected = x.astype(np.float64) @ functools.reduce(np.matmul, factors)
                assert np.all(np.abs(out - expected) <= _rounding_bound(x.astype(np.float64), factors, compute)), rows
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_gradients_through_the_runtime_choice_match_numpy():
    layer = to.OverparamDense(
        5,
        depth=2,
        hidden_units=6,
        use_bias=False,
        dtype="float64",
        factor_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=0),
    )
    layer.build((None, 20))

    if keras.backend.backend() == "tensorflow":  # an unknown batch: the order chosen at run time
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec((None, 20), tf.float64)])
        def gradients(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x) ** 2) / 2
            return tape.gradient(loss, layer.factors)

    else:  # JAX traces with the batch known: the order chosen from the shape

        def gradients(x):
            return layer_gradients(layer, lambda out: keras.ops.sum(out**2) / 2, x)

    f1, f2 = _factors(layer)
    for rows in (3, 30):  # one on each side of the threshold (12)
        x = np.random.default_rng(rows).normal(size=(rows, 20))
        residual = x @ f1 @ f2  # dL/d(out) for L = |out|^2 / 2
        g1, g2 = (np.asarray(g) for g in gradients(x))
        np.testing.assert_allclose(g1, x.T @ residual @ f2.T, rtol=1e-10)
        np.testing.assert_allclose(g2, (x @ f1).T @ residual, rtol=1e-10)


# --- compatibility ------------------------------------------------------------------------------


def test_a_keras_file_saved_by_version_0_1_0_loads_with_equal_outputs_and_penalties(saved_models_dir):
    data = saved_models_dir
    model = keras.models.load_model(data / "overparam_dense_v0_1_0.keras")
    x = np.load(data / "overparam_dense_v0_1_0_inputs.npy")
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["OverparamDense", "OverparamDense"]
    # Outputs and penalties computed by 0.1.0: equal to float32 rounding (the new code may
    # multiply in the other order).
    np.testing.assert_allclose(
        model.predict(x, verbose=0), np.load(data / "overparam_dense_v0_1_0_outputs.npy"), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        sorted(float(v) for v in model.losses), sorted(np.load(data / "overparam_dense_v0_1_0_losses.npy")), rtol=1e-5
    )


# --- regularizers -------------------------------------------------------------------------------


def _losses(model):
    return sorted(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)


def test_kernel_regularizer_acts_on_end_to_end_kernel_and_factor_regularizer_on_each_factor():
    x = np.random.default_rng(3).normal(size=(4, 5))
    layer = to.OverparamDense(
        3,
        depth=3,
        hidden_units=[4, 2],
        dtype="float64",
        factor_initializer=keras.initializers.RandomNormal(stddev=0.8, seed=5),
        kernel_regularizer=keras.regularizers.L2(0.125),
        factor_regularizer=keras.regularizers.L1(0.0625),
        bias_regularizer=keras.regularizers.L2(0.25),
        bias_initializer="ones",
    )
    # Coefficients are powers of 2, exact in float32 (Keras keeps them as float32 constants), so
    # the float64 penalties can be compared at rtol 1e-12.
    model = keras.Sequential([keras.Input((5,)), layer])
    factors = _factors(layer)
    kernel = functools.reduce(np.matmul, factors)
    expected = sorted([0.125 * np.sum(kernel**2), 0.25 * 3.0] + [0.0625 * np.sum(np.abs(f)) for f in factors])
    # Like Dense's kernel penalty, the end-to-end penalty is there before any call ...
    np.testing.assert_allclose(_losses(model), expected, rtol=1e-12)
    model(x)
    model(x)  # ... and counted once, however often the model is called.
    np.testing.assert_allclose(_losses(model), expected, rtol=1e-12)
    # The penalty is not the sum of per-factor L2 penalties (the two regularizers differ).
    assert abs(0.125 * np.sum(kernel**2) - sum(0.125 * np.sum(f**2) for f in factors)) > 1e-3


def test_kernel_regularizer_tracks_training_and_matches_collapse(float64):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 5)), rng.normal(size=(16, 2))
    layer = to.OverparamDense(
        2,
        depth=2,
        kernel_regularizer=keras.regularizers.L2(0.25),
        factor_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=1),
    )
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    kernel = functools.reduce(np.matmul, _factors(layer))
    # After training, `model.losses` is the penalty of the current kernel (a number, not a
    # tensor left over from the traced train step).
    np.testing.assert_allclose(_losses(model), [0.25 * np.sum(kernel**2)], rtol=1e-12)
    # collapse keeps the same penalty (Dense's kernel regularizer on the same kernel).
    np.testing.assert_allclose(_losses(to.collapse(model)), [0.25 * np.sum(kernel**2)], rtol=1e-12)
    # The training loss includes the penalty: evaluate = mse + penalty.
    pred = _numpy_forward(layer, x)
    np.testing.assert_allclose(  # Keras' own "mse": its mean is float32 off TensorFlow
        model.evaluate(x, y, batch_size=16, verbose=0),
        np.mean((pred - y) ** 2) + 0.25 * np.sum(kernel**2),
        rtol=keras_float64_rtol(1e-10),
    )


# --- training on real data ----------------------------------------------------------------------


@functools.cache
def _ethanol(directory):
    """Class-1 rows of the UCI gas sensor batches: (z-scored features, z-scored concentration)."""
    xs, ys = [], []
    for path in sorted(pathlib.Path(directory).glob("batch*.dat")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            head, *features = line.split()
            gas, concentration = head.split(";")
            if int(gas) != 1:
                continue
            xs.append([float(token.split(":")[1]) for token in features])
            ys.append(float(concentration))
    x, y = np.asarray(xs), np.asarray(ys)[:, None]
    assert x.shape[1] == 128 and len(x) > 500
    return (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()


def test_fit_lowers_loss_on_gas_sensor_regression(gas_sensor_dir):
    x, y = _ethanol(str(gas_sensor_dir))
    x, y = x.astype("float32"), y.astype("float32")
    model = keras.Sequential(
        [
            keras.Input((128,)),
            to.OverparamDense(1, depth=3, factor_initializer=to.initializers.Balanced(seed=0)),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), loss=to.LpLoss(2))
    history = model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    final = model.evaluate(x, y, batch_size=len(x), verbose=0)
    # y is z-scored, so the near-zero start has loss ~ mean(y^2)/2 = 0.5; the least-squares fit
    # (with intercept) is the lowest loss any affine model can reach.
    design = np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    coef = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    optimum = 0.5 * np.mean((design @ coef - y) ** 2)
    assert history.history["loss"][0] < 0.5 + 1e-3
    assert final < 0.25, final  # at least halves the loss of the zero predictor
    assert final >= optimum - 1e-5
    assert history.history["loss"][-1] < history.history["loss"][0]


# --- mixed precision ----------------------------------------------------------------------------


def test_mixed_float16_keeps_float32_factors_and_trains():
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 2))).astype("float32")
    layer = to.OverparamDense(
        2,
        depth=3,
        factor_initializer=to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.3, seed=0), seed=0),
    )
    model = keras.Sequential([keras.Input((6,)), layer])
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert [f.dtype for f in layer.factors] == ["float32"] * 3
    assert layer.bias.dtype == "float32"
    out = model(x[:4])
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    # float16 output of the float32 kernel: agrees with NumPy to float16 precision (rtol 1e-2).
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out).astype(np.float64), _numpy_forward(layer, x[:4]), rtol=1e-2, atol=1e-2
    )
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=10, batch_size=16, verbose=0)
    assert [f.dtype for f in layer.factors] == ["float32"] * 3
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.evaluate(x, y, verbose=0) < 0.5 * before


# --- serialization ------------------------------------------------------------------------------


def test_keras_save_and_load_in_fresh_process_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 4)).astype("float32")
    inputs = keras.Input((4,))
    hidden = to.OverparamDense(
        5,
        depth=3,
        hidden_units=[6, 2],
        activation="relu",
        factor_initializer=to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.5, seed=2), seed=2),
        kernel_regularizer=keras.regularizers.L2(0.01),
        factor_regularizer=keras.regularizers.L2(0.001),
        bias_initializer="ones",
    )(inputs)
    outputs = to.OverparamDense(2, depth=2, factor_initializer=to.initializers.Identity(0.9))(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), loss=to.LpLoss(4))
    model.fit(x, rng.normal(size=(10, 2)).astype("float32"), epochs=2, verbose=0)  # weights differ from init
    path = tmp_path / "model.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import numpy as np, keras, tf_overparam
        model = keras.saving.load_model({str(path)!r})
        layer = model.layers[1]
        assert type(layer).__name__ == "OverparamDense" and layer.depth == 3, layer
        assert layer.hidden_units == [6, 2], layer.hidden_units
        assert model.loss.p == 4.0
        np.save({str(tmp_path / "pred.npy")!r}, model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "pred.npy"), model.predict(x, verbose=0))


def test_from_config_rebuilds_identical_initial_factors():
    initializers = {
        "near_zero": to.initializers.NearZero(stddev=0.1, seed=3),
        "identity": to.initializers.Identity(gain=0.7),
        "balanced": to.initializers.Balanced(to.initializers.NearZero(0.2, seed=4), seed=5),
        "balanced_default": to.initializers.Balanced(seed=6),
        "random_normal": keras.initializers.RandomNormal(stddev=0.5, seed=7),
    }
    for name, initializer in initializers.items():
        layer = to.OverparamDense(
            3, depth=4, hidden_units=[3, 3, 3], factor_initializer=initializer, kernel_regularizer="l2", name="deep"
        )
        layer.build((None, 3))
        clone = to.OverparamDense.from_config(layer.get_config())
        clone.build((None, 3))
        assert clone.get_config() == layer.get_config()
        for original, rebuilt in zip(layer.factors, clone.factors):
            np.testing.assert_array_equal(rebuilt.numpy(), original.numpy(), err_msg=name)
        if name != "identity":
            # Factors of equal shape are not all the same draw.
            values = [f.numpy() for f in layer.factors]
            for i in range(len(values)):
                for j in range(i + 1, len(values)):
                    assert not np.allclose(values[i], values[j]), (name, i, j)
