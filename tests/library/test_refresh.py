"""Tests for `tf_overparam.refresh`: the depth-2 Newton-Schulz refresh of `EndToEnd(refresh_every=k)`
spread over a kernel's window, against NumPy's square roots of the snapshot kernel
(tests/_reference.py) and a NumPy simulation of the schedule written out by hand."""

import keras
import numpy as np
from _backend import assert_allclose_through_keras
from _reference import reference_direction, reference_square_roots

import tf_overparam as to
from tf_overparam.optimizers import EndToEnd
from tf_overparam.preconditioning import NEWTON_SCHULZ_MIN_COLUMNS
from tf_overparam.refresh import newton_schulz_steps_per_step, spread_steps

WIDE = NEWTON_SCHULZ_MIN_COLUMNS  # the large kernels' sides: their refreshes take Newton-Schulz
ETA = 0.1


def test_the_spread_fits_the_iteration_budget_in_the_window():
    # Budget 8 + 3 = 11 Newton-Schulz steps, over at most k - 1 steps after the snapshot:
    # ceil(11 / (k - 1)) steps per step, and ceil(11 / that) steps of the window.
    assert [(newton_schulz_steps_per_step(k), spread_steps(k)) for k in (2, 3, 4, 10, 12, 100)] == [
        (11, 1),
        (6, 2),
        (4, 3),
        (2, 6),
        (1, 11),
        (1, 11),
    ]


def _setup(seed=0):
    """x, y, and the kernels of x W1 W2 W3: W1 (4, WIDE), whose refresh takes the eigh; W2 and
    W3 (WIDE, WIDE) with singular values from 0.6 to 1 (Newton-Schulz converges) and from 1e-3
    to 1 (it declines, and the eigh is taken)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 4))
    y = x @ rng.normal(size=(4, WIDE))

    def conditioned(smallest):
        left, right = (np.linalg.qr(rng.normal(size=(WIDE, WIDE)))[0] for _ in range(2))
        return (left * np.geomspace(smallest, 1.0, WIDE)) @ right.T

    return x, y, [rng.normal(size=(4, WIDE)) * 0.5, conditioned(0.6), conditioned(1e-3)]


def _simulate(weights, x, y, used):
    """Full-batch SGD(ETA) steps of x W1 W2 W3 with loss (1/2) mean (out - y)^2, gradients by hand:
    at step t kernel i steps by eq. 24 with the preconditioner of its value at step `used[i][t]`."""
    kernels = [w.copy() for w in weights]
    before = []
    for t in range(len(used[0])):
        before.append([w.copy() for w in kernels])
        inputs = [x, x @ kernels[0], x @ kernels[0] @ kernels[1]]
        back = (inputs[2] @ kernels[2] - y) / y.size
        grads = [None] * 3
        for i in (2, 1, 0):
            grads[i] = inputs[i].T @ back
            back = back @ kernels[i].T
        kernels = [
            w - ETA * reference_direction(before[u[t]][i], g, 2)
            for i, (w, g, u) in enumerate(zip(kernels, grads, used))
        ]
    return kernels, before


# k = 3 over 7 steps (t = 0..6). W1 is kernel 0 (phase 0), refreshed in one step at 0, 3, 6. W2
# (phase 1) and W3 (phase 2) are refreshed whole at step 0, then take snapshots at t = 1 mod 3
# and t = 2 mod 3, each advanced over the next spread_steps(3) = 2 steps and applied from the
# second: W2 applies P(W_1) at 3-5 and P(W_4) at 6; W3 applies P(W_2) at 4-6. Refreshed in one
# step, they would apply P(W_1) at 1-3 and P(W_4) at 4-6, and P(W_2) at 2-4 and P(W_5) at 5-6.
SPREAD_USES = [[0, 0, 0, 3, 3, 3, 6], [0, 0, 0, 1, 1, 1, 4], [0, 0, 0, 0, 2, 2, 2]]
ONE_STEP_USES = [[0, 0, 0, 3, 3, 3, 6], [0, 1, 1, 1, 4, 4, 4], [0, 0, 2, 2, 2, 5, 5]]


def _model(weights):
    """x W1 W2 W3 in Keras' floatx, trained by `EndToEnd(SGD(ETA), depth=2, refresh_every=3)`."""
    model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(WIDE, use_bias=False) for _ in range(3)])
    model.set_weights(weights)
    model.compile(EndToEnd(keras.optimizers.SGD(ETA), depth=2, refresh_every=3), loss=to.LpLoss(2))
    return model


def _slot(model, layer, suffix):
    name = model.layers[layer].kernel.path.replace("/", "_") + suffix
    (variable,) = [v for v in model.optimizer.variables if v.name == name]
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _check_kept(model, layer, snapshot, tolerance):
    """The kept preconditioner of `layer` is P(W) of the snapshot W: its kernel is `snapshot`
    (rounding aside) and its roots are the square roots of A = W^T W (the kernels are square: no
    transpose) to `tolerance`, relative."""
    kernel = _slot(model, layer, "_kernel")
    assert_allclose_through_keras(kernel, snapshot, rtol=1e-10, atol=1e-12)
    for suffix, expected in zip(("_root", "_inverse_root"), reference_square_roots(kernel.T @ kernel)):
        error = np.linalg.norm(_slot(model, layer, suffix) - expected) / np.linalg.norm(expected)
        assert error <= tolerance, (layer, suffix, error)


def test_spread_refreshes_step_by_their_schedule_keep_the_snapshots_roots_and_save(float64, tmp_path):
    x, y, weights = _setup()
    model = _model(weights)
    for _ in range(5):  # after step 4 W2's snapshot of step 4 is pending
        model.train_on_batch(x, y)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for m in (model, loaded):
        for _ in range(2):
            m.train_on_batch(x, y)
    expected, before = _simulate(weights, x, y, SPREAD_USES)
    for a, b, e in zip(model.get_weights(), loaded.get_weights(), expected, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
        assert_allclose_through_keras(a, e, rtol=1e-10, atol=1e-12)
    # After step 6: W2 keeps P(W_4) by Newton-Schulz (converged: its last residual within
    # sqrt(eps)), W3 P(W_2) by the eigh (the iteration declined: residual -inf).
    _check_kept(loaded, 1, before[4][1], 1e-12)
    _check_kept(loaded, 2, before[2][2], 1e-9)
    assert 0 <= _slot(loaded, 1, "_pending_residual") <= np.sqrt(np.finfo("float64").eps)
    assert _slot(loaded, 2, "_pending_residual") == -np.inf
    # Not the one-step schedule: W2 and W3 moved differently.
    one_step, _ = _simulate(weights, x, y, ONE_STEP_USES)
    for i in (1, 2):
        assert np.abs(model.get_weights()[i] - one_step[i]).max() > 1e-4 * np.abs(one_step[i]).max()


def test_spread_refresh_in_float32_keeps_the_snapshots_roots():
    x, y, weights = _setup()
    model = _model([w.astype("float32") for w in weights])
    before = []
    for _ in range(7):
        before.append([np.asarray(w, np.float64) for w in model.get_weights()])
        model.train_on_batch(x.astype("float32"), y.astype("float32"))
    _check_kept(model, 1, before[4][1], 2e-5)
