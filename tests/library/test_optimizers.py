"""Tests for `tf_overparam.optimizers.EndToEnd`: the eq. 24 wrapper optimizer, against NumPy
evaluations of eq. 24 (tests/_reference.py) and of the amortised rule written out by hand."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
from _backend import assert_allclose_through_keras, layer_gradients  # tests/ is on sys.path (rootdir-relative import)
from _reference import reference_direction

import tf_overparam as to
from tf_overparam.optimizers import EndToEnd, is_preconditioned_by_default

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _data(n=16, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, x @ rng.normal(size=(d, k)) + 0.1 * rng.normal(size=(n, k))


def _weights(seed=1):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(4, 5)) * 0.7,
        rng.normal(size=5) * 0.1,
        rng.normal(size=(5, 3)) * 0.7,
        rng.normal(size=3) * 0.1,
    ]


def _numpy_run(weights, x, y, eta, depth, weight_decay, steps, refresh_steps=None):
    """`steps` full-batch steps on tanh(x W1 + b1) W2 + b2 with loss (1/2) mean (out - y)^2,
    gradients by hand; kernels step by eq. 24 (amortised, with `refresh_steps` = (steps at which
    W1 refreshes, steps at which W2 does): with the kernel W_r of its last refresh in the
    preconditioner, D_t = P(W_r) G_t), biases by plain SGD."""
    w1, b1, w2, b2 = (w.copy() for w in weights)
    refs = [None, None]
    for step in range(steps):
        hidden = np.tanh(x @ w1 + b1)
        residual = (hidden @ w2 + b2 - y) / y.size
        g2, gb2 = hidden.T @ residual, residual.sum(0)
        back = residual @ w2.T * (1 - hidden**2)
        g1, gb1 = x.T @ back, back.sum(0)
        for i, w in enumerate([w1, w2]):
            if refresh_steps is None or step in refresh_steps[i]:
                refs[i] = w.copy()
        w1 = w1 - eta * (reference_direction(refs[0], g1, depth) + weight_decay * depth * w1)
        w2 = w2 - eta * (reference_direction(refs[1], g2, depth) + weight_decay * depth * w2)
        b1, b2 = b1 - eta * gb1, b2 - eta * gb2
    return [w1, b1, w2, b2]


def _model(weights, model_class=keras.Model, **kwargs):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    model = model_class(inputs, keras.layers.Dense(3)(hidden), **kwargs)
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("depth, weight_decay", [(1, 0.1), (2, 0.0), (3, 0.1)])
def test_sgd_trajectory_is_eq24_and_equals_end_to_end_model(float64, depth, weight_decay):
    x, y = _data()
    eta, steps = 0.1, 5
    expected = _numpy_run(_weights(), x, y, eta, depth, weight_decay, steps)
    wrapped = _model(_weights())
    wrapped.compile(EndToEnd(keras.optimizers.SGD(eta), depth=depth, weight_decay=weight_decay), loss=to.LpLoss(2))
    wrapped.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    model = _model(_weights(), to.EndToEndModel, depth=depth, weight_decay=weight_decay)
    model.compile(keras.optimizers.SGD(eta), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    for a, b, c in zip(wrapped.get_weights(), model.get_weights(), expected, strict=True):
        assert_allclose_through_keras(a, c, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    # Not plain SGD: the kernels moved differently.
    plain = _numpy_run(_weights(), x, y, eta, 1, 0.0, steps)
    assert np.abs(wrapped.get_weights()[0] - plain[0]).max() > 1e-4


def test_sgd_on_a_kernel_wide_enough_for_newton_schulz_is_eq24(float64, monkeypatch):
    # A linear layer whose 600 x 256 kernel takes the depth-2 Newton-Schulz path (checked on its
    # Gram matrix) under method="auto" on an accelerator (the device answer patched: this test
    # runs on CPUs too): three full-batch SGD steps equal the NumPy eq. 24 steps of the hand
    # gradient of (1/2) mean (x W - y)^2.
    from tf_overparam import preconditioning

    monkeypatch.setattr(preconditioning, "_on_accelerator", lambda: True)
    tries, rule = [], preconditioning.auto_tries_newton_schulz
    monkeypatch.setattr(preconditioning, "auto_tries_newton_schulz", lambda cols: tries.append(rule(cols)) or tries[-1])
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(32, 600)), rng.normal(size=(32, preconditioning.NEWTON_SCHULZ_MIN_COLUMNS))
    kernel = rng.normal(size=(600, preconditioning.NEWTON_SCHULZ_MIN_COLUMNS)) * 0.05
    assert bool(preconditioning.newton_schulz_square_roots(keras.ops.convert_to_tensor(kernel.T @ kernel)).converged)
    model = keras.Sequential([keras.Input((600,)), keras.layers.Dense(y.shape[1], use_bias=False)])
    model.set_weights([kernel])
    eta, steps = 0.5, 3
    model.compile(EndToEnd(keras.optimizers.SGD(eta), depth=2), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    expected = kernel.copy()
    for _ in range(steps):
        expected = expected - eta * reference_direction(expected, x.T @ ((x @ expected - y) / y.size), 2)
    assert np.abs(expected - kernel).max() > 1e-3  # it moved
    assert_allclose_through_keras(model.get_weights()[0], expected, rtol=1e-10, atol=1e-12)
    assert tries and all(tries)  # "auto" chose the iteration where the step was traced


# Which kernel refreshes at which of 7 steps: every kernel at step 0, then the i-th selected
# kernel at the steps t with t mod k = i mod k (W1 is kernel 0, W2 kernel 1).
REFRESH_STEPS = {1: (set(range(7)), set(range(7))), 3: ({0, 3, 6}, {0, 1, 4}), 10: ({0}, {0, 1})}


@pytest.mark.parametrize("depth, refresh_every", [(3, 1), (3, 3), (3, 10), (2, 3)])
def test_amortised_rule_refreshes_a_staggered_share_of_the_kernels(float64, depth, refresh_every):
    x, y = _data()
    eta, steps = 0.2, 7
    expected = _numpy_run(_weights(), x, y, eta, depth, 0.05, steps, refresh_steps=REFRESH_STEPS[refresh_every])
    model = _model(_weights())
    model.compile(
        EndToEnd(keras.optimizers.SGD(eta), depth=depth, weight_decay=0.05, refresh_every=refresh_every),
        loss=to.LpLoss(2),
    )
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    for a, c in zip(model.get_weights(), expected, strict=True):
        assert_allclose_through_keras(a, c, rtol=1e-11, atol=1e-12)
    if refresh_every == 1:  # the exact rule
        exact = _numpy_run(_weights(), x, y, eta, depth, 0.05, steps)
        for a, c in zip(model.get_weights(), exact):
            assert_allclose_through_keras(a, c, rtol=1e-11, atol=1e-12)
    else:  # and the stale preconditioner is not the exact rule
        exact = _numpy_run(_weights(), x, y, eta, depth, 0.05, steps)
        assert np.abs(model.get_weights()[0] - exact[0]).max() > 1e-6


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(3, 2, kernel_initializer=keras.initializers.RandomNormal(seed=1))
        self.flatten = keras.layers.Flatten()
        self.chain = to.OverparamDense(4, depth=2, factor_initializer=keras.initializers.RandomNormal(seed=2))
        self.head = keras.layers.Dense(2, kernel_initializer=keras.initializers.RandomNormal(seed=3))

    def call(self, inputs):
        return self.head(self.chain(self.flatten(self.conv(inputs))))


def test_subclassed_model_with_conv_and_overparam_layers_trains_by_the_rule(float64):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4, 4, 2)), rng.normal(size=(8, 2))
    model = Subclassed()
    model(x[:1])
    selected = [v.path for v in model.trainable_variables if is_preconditioned_by_default(v)]
    assert selected == [model.conv.kernel.path, model.head.kernel.path]  # not the chain's factors
    eta, depth = 0.05, 3
    grads = dict(
        zip([v.path for v in model.trainable_variables], layer_gradients(model, lambda out: to.LpLoss(2)(y, out), x))
    )
    before = {v.path: np.asarray(v) for v in model.trainable_variables}
    model.compile(EndToEnd(keras.optimizers.SGD(eta), depth=depth), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for variable in model.trainable_variables:
        w, g = before[variable.path], grads[variable.path]
        if variable.path in selected:  # a Conv2D kernel (2, 2, 2, 3) is the (8, 3) matrix
            matrix = (-1, w.shape[-1])
            expected = w - eta * reference_direction(w.reshape(matrix), g.reshape(matrix), depth).reshape(w.shape)
        else:
            expected = w - eta * g
        np.testing.assert_allclose(np.asarray(variable), expected, rtol=1e-11, atol=1e-13, err_msg=variable.path)
    history = model.fit(x, y, batch_size=4, epochs=5, verbose=0).history["loss"]
    assert history[-1] < history[0]


def test_default_rule_and_path_patterns():
    inputs = keras.Input((3, 4))
    lstm = keras.layers.LSTM(2, return_sequences=True)(inputs)
    dense = keras.layers.Dense(4, name="lora")
    out = keras.layers.EinsumDense("btd,de->bte", output_shape=(None, 2), name="einsum")(dense(lstm))
    dense.enable_lora(2)
    model = keras.Model(inputs, out)
    names = {v.path: is_preconditioned_by_default(v) for v in model.trainable_variables}
    assert names == {
        "lstm/lstm_cell/kernel": True,
        "lstm/lstm_cell/recurrent_kernel": False,
        "lstm/lstm_cell/bias": False,
        "lora/bias": False,
        "lora/lora_kernel_a": False,
        "lora/lora_kernel_b": False,
        "einsum/kernel": True,
    }
    opt = EndToEnd("sgd", variables=["einsum/*"])
    opt.build(model.trainable_variables)
    assert [v.path for v, s in zip(model.trainable_variables, opt._selected) if s] == ["einsum/kernel"]
    with pytest.raises(ValueError, match="matches no trainable variable"):
        EndToEnd("sgd", variables=["dense*/kernel"]).build(model.trainable_variables)
    chain_only = keras.Sequential([keras.Input((3,)), to.OverparamDense(2, depth=3)])
    with pytest.raises(ValueError, match="no variable to precondition"):
        EndToEnd("sgd").build(chain_only.trainable_variables)


def test_bad_arguments_raise():
    for kwargs, name in [
        ({"depth": 0}, "depth"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"refresh_every": 2.5}, "refresh_every"),
        ({"variables": []}, "variables"),
        ({"variables": [3]}, "variables"),
        ({"clipnorm": 1.0}, "clipnorm"),
    ]:
        with pytest.raises(ValueError, match=name):
            EndToEnd("sgd", **kwargs)
    with pytest.raises(ValueError, match="plain Keras optimizer"):
        EndToEnd(EndToEnd("sgd"))


def test_zero_kernel_warns_once_naming_it():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, kernel_initializer="zeros", name="dead"),
            keras.layers.Dense(1, name="alive"),
        ]
    )
    model.compile(EndToEnd(keras.optimizers.SGD(0.1)), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.ones((4, 3)), np.ones((4, 1)), epochs=3, verbose=0)
    messages = [str(w.message) for w in caught if "fixed point" in str(w.message)]
    assert len(messages) == 1 and "dead/kernel" in messages[0]
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel), 0.0)  # eq. 24 keeps it at zero


def test_inner_clipnorm_acts_on_the_preconditioned_gradient(float64):
    x, y = _data()
    model = _model(_weights())
    expected = _numpy_run(_weights(), x, y, 1.0, 2, 0.0, 1)
    step = [w - e for w, e in zip(_weights(), expected)]  # the unclipped SGD(1) updates
    model.compile(EndToEnd(keras.optimizers.SGD(1.0, clipnorm=1e-3), depth=2), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for w0, w, s in zip(_weights(), model.get_weights(), step):
        assert_allclose_through_keras(w0 - w, s * min(1.0, 1e-3 / np.linalg.norm(s)), rtol=1e-10)


def test_save_load_round_trip_continues_identically(float64, tmp_path):
    x, y = _data()
    model = _model(_weights())
    inner = keras.optimizers.Adam(0.01, clipnorm=5.0)
    model.compile(
        EndToEnd(inner, depth=3, weight_decay=0.01, refresh_every=2, variables=["dense*/kernel"]), loss=to.LpLoss(2)
    )
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 4 steps: mid-refresh-cycle after 3
    model.fit(x[:4], y[:4], batch_size=4, epochs=1, shuffle=False, verbose=0)  # 5 steps: state is stale now
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    config = loaded.optimizer.get_config()
    assert {k: config[k] for k in ("depth", "weight_decay", "refresh_every", "variables")} == {
        "depth": 3,
        "weight_decay": 0.01,
        "refresh_every": 2,
        "variables": ["dense*/kernel"],
    }
    assert isinstance(loaded.optimizer.inner_optimizer, keras.optimizers.Adam)
    assert loaded.optimizer.inner_optimizer.clipnorm == 5.0
    assert int(loaded.optimizer.iterations) == 5
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Training continues by the same rule and the same state (a stale step, then a refresh).
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_mixed_precision_under_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = (a.astype("float32") for a in _data(n=64))
    model = _model([w.astype("float32") for w in _weights()])
    model.compile(EndToEnd(keras.optimizers.SGD(0.1), depth=2, weight_decay=0.5), loss=to.LpLoss(2))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(model.optimizer.inner_optimizer, EndToEnd)
    expected = _numpy_run(_weights(), x.astype("float64"), y.astype("float64"), 0.1, 2, 0.5, 1)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    # Gradients scaled by 2^15 are unscaled before the preconditioner and the decay (a large part
    # of the step here): float16 forward pass, 1e-3.
    for w, e in zip(model.get_weights(), expected):
        np.testing.assert_allclose(w, e, rtol=1e-3, atol=1e-3)


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import keras
    import tf_overparam as to
    from tf_overparam.optimizers import EndToEnd

    out, refresh_every = sys.argv[1], None if sys.argv[2] == "none" else int(sys.argv[2])
    keras.backend.set_floatx("float64")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)); y = x @ rng.normal(size=(4, 3))
    init = [rng.normal(size=s) * 0.5 for s in [(4, 5), (5,), (5, 3), (3,)]]
    multi = "TF_CONFIG" in os.environ
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else tf.distribute.get_strategy()
    with strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inputs)))
        model.set_weights(init)
        optimizer = EndToEnd(keras.optimizers.SGD(0.05), depth=3, weight_decay=0.1, refresh_every=refresh_every)
        optimizer.build(model.trainable_variables)
    replicas = strategy.num_replicas_in_sync
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"] if multi else 0

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                # Each worker's loss is its share of the global mean.
                loss = tf.reduce_sum(0.5 * tf.reduce_mean((model(xb) - yb) ** 2, axis=-1)) / 16
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
        strategy.run(replica_step, args=(xb, yb))

    for i in range(6):
        batch = slice(16 * (i % 2), 16 * (i % 2) + 16)
        xb, yb = x[batch], y[batch]
        if multi:  # worker k takes its half of the global batch of 16
            xb, yb = xb[8 * task: 8 * task + 8], yb[8 * task: 8 * task + 8]
        step(tf.constant(xb), tf.constant(yb))
    np.savez(out, replicas=replicas, *[v.numpy() for v in model.trainable_variables])
    """
)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _subprocess_env():
    """The environment of a TensorFlow subprocess test: this checkout first, quiet, CPU only."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "CUDA_VISIBLE_DEVICES": "",
    }


@pytest.mark.tf_only("tf.distribute.MultiWorkerMirroredStrategy")
def test_multi_worker_custom_loop_matches_a_single_worker(tmp_path):
    # Keras 3's fit under MultiWorkerMirroredStrategy is reported broken (keras-team/keras#20585):
    # the optimizer is checked in a custom training loop, two worker processes on localhost.
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = _subprocess_env()
    for refresh_every in ["none", "2"]:
        single = tmp_path / f"single_{refresh_every}.npz"
        result = subprocess.run(
            [sys.executable, str(script), str(single), refresh_every],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        workers = [f"localhost:{port}" for port in _free_ports(2)]
        procs = []
        for index in range(2):
            tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(tmp_path / f"worker{index}_{refresh_every}.npz"), refresh_every],
                    env={**env, "TF_CONFIG": tf_config},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
        expected = np.load(single)
        assert int(expected["replicas"]) == 1
        for index in range(2):
            out = np.load(tmp_path / f"worker{index}_{refresh_every}.npz")
            assert int(out["replicas"]) == 2
            for i in range(4):
                # Per-worker directions (linear in G) and half decay terms sum to the single
                # worker's step: float64 rounding.
                np.testing.assert_allclose(out[f"arr_{i}"], expected[f"arr_{i}"], rtol=1e-12, atol=1e-13)


_COUNTED = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tf_overparam.optimizers import EndToEnd

    keras.backend.set_floatx("float64")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4)); y = x @ rng.normal(size=(4, 2))
    init = [rng.normal(size=s) * 0.5 for s in [(4, 3), (3,), (3, 2), (2,)]]

    def run(strategy, depth, refresh_every):
        with strategy.scope():
            inputs = keras.Input((4,))
            model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(3, activation="tanh")(inputs)))
            model.set_weights(init)
            optimizer = EndToEnd(
                keras.optimizers.SGD(0.05), depth=depth, weight_decay=0.1, refresh_every=refresh_every, method="eigh"
            )
            optimizer.build(model.trainable_variables)

        @tf.function
        def step(xb, yb):
            def replica_step(xb, yb):
                with tf.GradientTape() as tape:  # every replica takes the whole batch: its share of the loss
                    loss = tf.reduce_mean((model(xb) - yb) ** 2) / strategy.num_replicas_in_sync
                optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

            strategy.run(replica_step, args=(xb, yb))

        graph = step.get_concrete_function(tf.constant(x), tf.constant(y)).graph.as_graph_def()
        nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
        for _ in range(3):
            step(tf.constant(x), tf.constant(y))
        return sum(node.op == "SelfAdjointEigV2" for node in nodes), [v.numpy() for v in model.trainable_variables]

    depth, refresh_every = int(sys.argv[2]), None if sys.argv[3] == "none" else int(sys.argv[3])
    single = run(tf.distribute.get_strategy(), depth, refresh_every)
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), depth, refresh_every)
    np.savez(sys.argv[1], eighs=[single[0], mirrored[0]], *[w for pair in zip(single[1], mirrored[1]) for w in pair])
    """
)


@pytest.mark.tf_only("tf.distribute.MirroredStrategy")
@pytest.mark.parametrize("depth, refresh_every", [(3, "none"), (2, "2")])
def test_mirrored_replicas_compute_the_preconditioner_once_per_step(tmp_path, depth, refresh_every):
    # Two replicas hold the same kernels: the traced step holds the eighs of one device, one per
    # kernel shape, (4, 3) and (3, 2) (the exact rule; with refresh_every=2 one per staggered
    # refresh), not one per replica; and 3 steps still match one device to float64 rounding.
    script = tmp_path / "counted.py"
    script.write_text(_COUNTED)
    env = _subprocess_env()
    out = tmp_path / "out.npz"
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(depth), refresh_every],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(out)
    assert out["eighs"].tolist() == [2, 2]
    for i in range(4):
        np.testing.assert_allclose(out[f"arr_{2 * i + 1}"], out[f"arr_{2 * i}"], rtol=1e-12, atol=1e-13)


def test_inner_gradient_accumulation_gives_one_step_of_the_mean_gradient(float64):
    # Two half batches accumulated (mean) are one full-batch step: the direction is linear in G
    # and W does not change in between.
    x, y = _data()
    expected = _numpy_run(_weights(), x, y, 0.1, 3, 0.1, 1)
    model = _model(_weights())
    model.compile(
        EndToEnd(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), depth=3, weight_decay=0.1), loss=to.LpLoss(2)
    )
    model.fit(x, y, batch_size=len(x) // 2, epochs=1, shuffle=False, verbose=0)
    for w, e in zip(model.get_weights(), expected, strict=True):
        assert_allclose_through_keras(w, e, rtol=1e-11, atol=1e-13)


def test_the_documented_sequential_pattern_selects_the_dense_kernels():
    # The docstring's example: paths of a Sequential model begin with the model's name.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    optimizer = EndToEnd(keras.optimizers.SGD(0.1), variables=["dense*/kernel"])
    optimizer.build(model.trainable_variables)
    selected = [v.path for v, s in zip(model.trainable_variables, optimizer._selected) if s]
    assert selected == [layer.kernel.path for layer in model.layers]
    assert all(path.startswith(model.name + "/") for path in selected)


def test_an_optimizer_class_or_a_bad_method_raises():
    with pytest.raises(ValueError, match="instance.*SGD"):
        EndToEnd(keras.optimizers.SGD)
    for kwargs in [{"method": "svd"}, {"method": "newton_schulz", "depth": 3}]:
        with pytest.raises(ValueError, match="method"):
            EndToEnd("sgd", **kwargs)


@pytest.mark.parametrize("method", ["auto", "eigh", "newton_schulz"])
def test_each_method_is_passed_through_and_steps_by_eq24(float64, method, monkeypatch):
    from tf_overparam import kernel_groups

    seen = []
    direction = kernel_groups._direction
    monkeypatch.setattr(kernel_groups, "_direction", lambda *args: seen.append(args[-1]) or direction(*args))
    x, y = _data()
    expected = _numpy_run(_weights(), x, y, 0.1, 2, 0.0, 2)
    model = _model(_weights())
    model.compile(EndToEnd(keras.optimizers.SGD(0.1), depth=2, method=method), loss=to.LpLoss(2))
    model.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
    assert seen and set(seen) == {method}
    for a, c in zip(model.get_weights(), expected, strict=True):
        assert_allclose_through_keras(a, c, rtol=1e-10, atol=1e-12)
