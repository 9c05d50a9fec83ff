"""`diagnostics.sharpness` (the largest eigenvalue of the loss's Hessian) against Hessians
derived by hand and against finite differences of the gradient; `callbacks.SharpnessLogger`
against the same derivation at the weights of the logged steps.

The linear model's Hessian, derived by hand. A `Dense(m)` maps x to x W + b; write
x~ = (x, 1) and r_sk = x~_s . w~_k - y_sk for sample s and output k (w~_k: column k of W with
b_k below it). A loss averaged over the n samples and m outputs, L = (1/(n m)) sum_sk l(r_sk),
has d^2 L / dw~_k dw~_l = delta_kl (1/(n m)) sum_s l''(r_sk) x~_s x~_s^T: one block per output,
no coupling between outputs.
- Mean squared error, l(r) = r^2, l'' = 2: the block is (2/(n m)) X~^T X~, the same for every
  output and independent of the weights.
- The l4 loss, l(r) = r^4 / 4, l'' = 3 r^2: the block of output k is
  (3/(n m)) X~^T diag(r_k^2) X~, which depends on the weights through the residuals.
"""

import keras
import numpy as np
import pytest
from _backend import gradients, keras_float64_rtol

import tf_overparam as to
from tf_overparam import diagnostics, hessian

RTOL = 1e-6


def linear_hessian(x, curvature, use_bias=True):
    """The full Hessian of a Dense layer's loss in the variables' order (kernel (d, m) row
    major, then bias (m,)): `curvature[s, k]` = l''(r_sk) / (n m)."""
    n, d = x.shape
    m = curvature.shape[1]
    xt = np.hstack([x, np.ones((n, 1))]) if use_bias else x
    size = d * m + (m if use_bias else 0)
    full = np.zeros((size, size))

    def index(i, k):  # entry (i, k) of the augmented kernel [W; b]
        return i * m + k if i < d else d * m + k

    for k in range(m):
        block = xt.T @ (curvature[:, k, None] * xt)
        rows = [index(i, k) for i in range(xt.shape[1])]
        full[np.ix_(rows, rows)] = block
    return full


def dense_model(d, m, seed, **kwargs):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(m, **kwargs)])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    return model


def data(n, d, m, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(n, m))


def flat(parts):
    return np.concatenate([np.ravel(p) for p in parts])


def weights(model):
    kernel, bias = model.get_weights()
    return kernel, bias


def test_least_squares_with_the_compiled_loss(float64):
    n, d, m = 7, 3, 2
    x, y = data(n, d, m, seed=0)
    model = dense_model(d, m, seed=1)
    model.compile(loss="mse")
    expected = linear_hessian(x, np.full((n, m), 2.0 / (n * m)))
    top = np.linalg.eigvalsh(expected)[-1]
    # The per-output block is the same for both outputs, so the top eigenvalue is double.
    np.testing.assert_allclose(
        top, 2.0 / (n * m) * np.linalg.eigvalsh(np.hstack([x, np.ones((n, 1))]).T @ np.hstack([x, np.ones((n, 1))]))[-1]
    )
    estimate = diagnostics.sharpness(model, x, y, return_details=True)
    # The compiled "mse" passes through `ops.mean`, which Keras computes in float32 on JAX.
    np.testing.assert_allclose(estimate.value, top, rtol=keras_float64_rtol(RTOL))
    vector = flat(estimate.vector)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-12)
    assert np.linalg.norm(expected @ vector - top * vector) <= keras_float64_rtol(RTOL) * top


def test_l4_loss_of_a_linear_model(float64):
    n, d, m = 9, 3, 2
    x, y = data(n, d, m, seed=2)
    model = dense_model(d, m, seed=3)
    kernel, bias = weights(model)
    residual = x @ kernel + bias - y
    expected = linear_hessian(x, 3.0 * residual**2 / (n * m))
    top = np.linalg.eigvalsh(expected)[-1]
    estimate = diagnostics.sharpness(model, x, y, loss=to.LpLoss(4), return_details=True)
    np.testing.assert_allclose(estimate.value, top, rtol=RTOL)
    vector = flat(estimate.vector)
    assert np.linalg.norm(expected @ vector - top * vector) <= RTOL * top
    # The residual reported is measured: that of the hand-derived Hessian, to rounding.
    np.testing.assert_allclose(
        estimate.residual, np.linalg.norm(expected @ vector - estimate.value * vector), atol=1e-9 * top
    )
    # Another start, the same answer: the value does not depend on the draw once exact.
    np.testing.assert_allclose(diagnostics.sharpness(model, x, y, loss=to.LpLoss(4), seed=5), top, rtol=RTOL)


def test_the_compiled_objective_includes_the_regularisation(float64):
    # L2(c) adds c ||W||^2, whose Hessian is 2 c I on the kernel.
    n, d, m, c = 6, 3, 2, 0.05
    x, y = data(n, d, m, seed=4)
    model = dense_model(d, m, seed=5, use_bias=False, kernel_regularizer=keras.regularizers.L2(c))
    model.compile(loss=to.LpLoss(2))  # (1/2) r^2: l'' = 1
    expected = linear_hessian(x, np.full((n, m), 1.0 / (n * m)), use_bias=False) + 2 * c * np.eye(d * m)
    np.testing.assert_allclose(diagnostics.sharpness(model, x, y), np.linalg.eigvalsh(expected)[-1], rtol=RTOL)


def test_repeated_calls_follow_the_weights_and_the_compiled_loss(float64):
    # The compiled product is reused between calls: it must read the current weights, and a
    # recompiled loss must not be served by the old trace.
    n, d, m = 7, 3, 1
    x, y = data(n, d, m, seed=20)
    model = dense_model(d, m, seed=21)
    model.compile(loss=to.LpLoss(4))
    for seed in (22, 23):
        model.set_weights([np.random.default_rng(seed).normal(size=w.shape) for w in model.get_weights()])
        kernel, bias = weights(model)
        expected = np.linalg.eigvalsh(linear_hessian(x, 3.0 * (x @ kernel + bias - y) ** 2 / (n * m)))[-1]
        np.testing.assert_allclose(diagnostics.sharpness(model, x, y), expected, rtol=RTOL)
    model.compile(loss=to.LpLoss(2))
    expected = np.linalg.eigvalsh(linear_hessian(x, np.full((n, m), 1.0 / (n * m))))[-1]
    np.testing.assert_allclose(diagnostics.sharpness(model, x, y), expected, rtol=RTOL)


def test_the_largest_eigenvalue_not_the_largest_in_magnitude(float64):
    # l(y, y_hat) = y * y_hat^2 per sample: the Hessian (2/n) X~^T diag(y) X~ is indefinite, and
    # one strongly negative y makes its most negative eigenvalue the largest in magnitude, the
    # one power iteration would report.
    n, d = 8, 3
    x, _ = data(n, d, 1, seed=6)
    y = np.abs(np.random.default_rng(7).normal(size=(n, 1)))
    y[0] = -20.0
    model = dense_model(d, 1, seed=8)
    eigenvalues = np.linalg.eigvalsh(linear_hessian(x, 2.0 * y / n))
    assert eigenvalues[-1] > 0 and -eigenvalues[0] > 2 * eigenvalues[-1]

    def loss(y_true, y_pred):
        return y_true * y_pred**2

    np.testing.assert_allclose(diagnostics.sharpness(model, x, y, loss=loss), eigenvalues[-1], rtol=RTOL)


def test_depth_2_chain_against_finite_differences_of_the_gradient(float64):
    n, d, m = 10, 3, 2
    x, y = data(n, d, m, seed=9)
    initializer = keras.initializers.RandomNormal(stddev=0.7, seed=10)
    model = keras.Sequential([keras.Input((d,)), to.OverparamDense(m, depth=2, factor_initializer=initializer)])
    loss = to.LpLoss(2)
    values = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in model.trainable_variables]
    shapes, sizes = [v.shape for v in values], [v.size for v in values]

    def gradient(theta):
        parts = [p.reshape(s) for p, s in zip(np.split(theta, np.cumsum(sizes)[:-1]), shapes)]

        def fn(*trainable):
            y_pred, _ = model.stateless_call(list(trainable), [], x)
            return loss(y, y_pred)

        return flat(gradients(fn, *parts))

    # The loss is a quartic polynomial of the factors, so the central difference of the (cubic)
    # gradient is off by h^2 / 6 times its third derivative: about 1e-10 relative at h = 1e-5.
    theta, h = flat(values), 1e-5
    columns = [(gradient(theta + h * e) - gradient(theta - h * e)) / (2 * h) for e in np.eye(theta.size)]
    numeric = np.array(columns)
    assert np.max(np.abs(numeric - numeric.T)) < 1e-8 * np.max(np.abs(numeric))
    top = np.linalg.eigvalsh((numeric + numeric.T) / 2)[-1]
    np.testing.assert_allclose(diagnostics.sharpness(model, x, y, loss=loss, iterations=theta.size), top, rtol=RTOL)


def test_lanczos_before_the_krylov_space_is_exhausted():
    # A 60 x 60 symmetric matrix with a known spectrum, 20 steps: the Ritz value is a lower
    # bound of the largest eigenvalue (Cauchy interlacing), within the residual bound of an
    # eigenvalue, and with a clear gap it is accurate.
    rng = np.random.default_rng(11)
    spectrum = np.concatenate([[10.0], rng.uniform(-4.0, 4.0, size=59)])
    basis, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    matrix = basis @ np.diag(spectrum) @ basis.T
    estimate = hessian.top_eigenpair(lambda parts: [matrix @ parts[0]], [(60,)], iterations=20)
    assert estimate.iterations == 20
    assert estimate.value <= 10.0 + 1e-12
    assert 10.0 - estimate.value <= estimate.residual + 1e-12
    np.testing.assert_allclose(
        np.linalg.norm(matrix @ estimate.vector[0] - estimate.value * estimate.vector[0]),
        estimate.residual,
        rtol=1e-6,
        atol=1e-12,
    )
    np.testing.assert_allclose(estimate.value, 10.0, rtol=1e-6)


def test_non_finite_weights_give_nan(float64):
    x, y = data(4, 2, 1, seed=12)
    model = dense_model(2, 1, seed=13)
    model.compile(loss="mse")
    kernel, bias = weights(model)
    model.set_weights([np.full_like(kernel, np.nan), bias])
    assert np.isnan(diagnostics.sharpness(model, x, y, loss=to.LpLoss(4)))


@pytest.mark.parametrize(
    "change, name",
    [
        ({"model": keras.layers.Dense(1)}, "model"),
        ({"loss": None, "compile": False}, "loss"),
        ({"loss": "no_such_loss"}, "loss"),
        ({"loss": 3}, "loss"),
        ({"iterations": 0}, "iterations"),
        ({"seed": -1}, "seed"),
        ({"y": np.zeros((5, 1))}, "x"),
        ({"x": None}, "x"),
    ],
)
def test_bad_arguments(change, name):
    x, y = data(4, 2, 1, seed=14)
    model = dense_model(2, 1, seed=15)
    if change.pop("compile", True):
        model.compile(loss="mse")
    arguments = {"model": model, "x": x, "y": y, "loss": None, "iterations": 5, "seed": 0, **change}
    with pytest.raises(ValueError, match=f"`{name}`"):
        diagnostics.sharpness(**arguments)


# --- the callback -------------------------------------------------------------------------------


class Recorder(keras.callbacks.Callback):
    """After every step: the logs this callback is given and the weights."""

    def __init__(self):
        super().__init__()
        self.logs, self.weights = {}, {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.logs[step] = dict(logs)
        self.weights[step] = self.model.get_weights()


def l4_top(x, y, kernel, bias):
    n, m = y.shape
    return np.linalg.eigvalsh(linear_hessian(x, 3.0 * (x @ kernel + bias - y) ** 2 / (n * m)))[-1]


def test_callback_logs_rate_times_sharpness_every_k_steps(float64):
    from tf_overparam.callbacks import SharpnessLogger

    n, d, m, rate = 8, 3, 1, 0.05
    x, y = data(n, d, m, seed=16)
    model = dense_model(d, m, seed=17)
    model.compile(optimizer=keras.optimizers.SGD(rate), loss=to.LpLoss(4))
    logger, recorder = SharpnessLogger(x, y, every=2), Recorder()
    model.fit(x, y, batch_size=n, epochs=5, shuffle=False, verbose=0, callbacks=[logger, recorder])
    assert logger.history["step"] == [2, 4]
    assert [s for s, logs in recorder.logs.items() if "lr_x_sharpness" in logs] == [2, 4]
    for step in (2, 4):
        expected = rate * l4_top(x, y, *recorder.weights[step])
        np.testing.assert_allclose(recorder.logs[step]["lr_x_sharpness"], expected, rtol=RTOL)
        np.testing.assert_allclose(recorder.logs[step]["sharpness"], expected / rate, rtol=RTOL)
    # The weights move, so does the l4 curvature: the values are not one constant.
    assert abs(logger.history["sharpness"][0] - logger.history["sharpness"][1]) > 1e-3 * logger.history["sharpness"][0]


def test_callback_in_epoch_mode_reaches_the_history(float64):
    from tf_overparam.callbacks import SharpnessLogger

    n, d, m, rate = 6, 2, 1, 0.02
    x, y = data(n, d, m, seed=18)
    model = dense_model(d, m, seed=19)
    model.compile(optimizer=keras.optimizers.SGD(rate), loss=to.LpLoss(4))
    recorder = Recorder()
    history = model.fit(x, y, batch_size=n, epochs=2, verbose=0, callbacks=[SharpnessLogger(x, y), recorder])
    expected = [rate * l4_top(x, y, *recorder.weights[step]) for step in (1, 2)]
    np.testing.assert_allclose(history.history["lr_x_sharpness"], expected, rtol=RTOL)


def test_callback_bad_arguments():
    from tf_overparam.callbacks import SharpnessLogger

    with pytest.raises(ValueError, match="`every`"):
        SharpnessLogger(np.zeros((2, 1)), np.zeros((2, 1)), every=0)
    with pytest.raises(ValueError, match="`iterations`"):
        SharpnessLogger(np.zeros((2, 1)), np.zeros((2, 1)), iterations=0)
    # The batch is checked when training begins: x and y of different sizes fail there.
    model = dense_model(1, 1, seed=24)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="`y`|`x`"):
        model.fit(
            np.zeros((2, 1)),
            np.zeros((2, 1)),
            verbose=0,
            callbacks=[SharpnessLogger(np.zeros((2, 1)), np.zeros((3, 1)))],
        )
