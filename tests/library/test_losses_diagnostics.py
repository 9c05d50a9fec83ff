"""Tests for tf_overparam.losses.LpLoss and tf_overparam.diagnostics."""

import math

import keras
import numpy as np
import pytest
from _backend import gradients, keras_float64_rtol  # tests/ is on sys.path (rootdir-relative import)

import tf_overparam as to
from tf_overparam.diagnostics import chain_balancedness

# y_pred - y_true = [[-1, 2], [0.5, -3]]: negative residuals, so |.| matters for odd p.
Y_TRUE = np.array([[1.0, -2.0], [0.5, 4.0]])
Y_PRED = np.array([[0.0, 0.0], [1.0, 1.0]])

# (1/p) mean_k |r|^p per example, then mean over the batch, by hand:
#   p=2: rows (1 + 4)/2 = 2.5 and (0.25 + 9)/2 = 4.625 -> /2 -> 1.25, 2.3125 -> 1.78125
#   p=3: rows (1 + 8)/2 = 4.5 and (0.125 + 27)/2 = 13.5625 -> /3 -> 1.5, 4.5208333 -> 3.0104166...
#   p=4: rows (1 + 16)/2 = 8.5 and (0.0625 + 81)/2 = 40.53125 -> /4 -> 2.125, 10.1328125 -> 6.12890625
HAND = {2: (1.25, 2.3125), 3: (1.5, 13.5625 / 3), 4: (2.125, 10.1328125), 1: (1.5 / 1, 1.75 / 1)}


def test_lp_loss_hand_computed_values():
    for p, per_example in HAND.items():
        loss = to.LpLoss(p, dtype="float64")
        value = float(loss(Y_TRUE, Y_PRED))
        assert value == pytest.approx(np.mean(per_example), rel=1e-14), p
        # Per-example values and sample weights ("sum_over_batch_size": sum(w l) / batch).
        unreduced = to.LpLoss(p, reduction=None, dtype="float64")(Y_TRUE, Y_PRED)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(unreduced), per_example, rtol=1e-14)
        weighted = float(loss(Y_TRUE, Y_PRED, sample_weight=np.array([2.0, 0.0])))
        assert weighted == pytest.approx(2.0 * per_example[0] / 2, rel=1e-14), p


def test_lp_loss_p3_is_not_the_signed_cube():
    signed = np.mean(np.mean((Y_PRED - Y_TRUE) ** 3, axis=-1)) / 3  # what a loss without |.| gives
    assert float(to.LpLoss(3, dtype="float64")(Y_TRUE, Y_PRED)) != pytest.approx(signed, rel=1e-3)


def test_lp_loss_p2_is_half_mse():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    half_mse = 0.5 * float(keras.losses.MeanSquaredError(dtype="float64")(y_true, y_pred))
    assert float(to.LpLoss(2, dtype="float64")(y_true, y_pred)) == pytest.approx(
        half_mse, rel=keras_float64_rtol(1e-13)
    )
    assert float(to.LpLoss(2, dtype="float64")(y_true, y_pred)) == pytest.approx(
        0.5 * np.mean((y_pred - y_true) ** 2), rel=1e-13
    )


def test_lp_loss_gradient_is_sign_times_abs_residual_power():
    for p in [2, 3, 4]:
        (grad,) = gradients(lambda y_pred, p=p: to.LpLoss(p, dtype="float64")(Y_TRUE, y_pred), Y_PRED)
        residual = Y_PRED - Y_TRUE
        # d/dr (1/p)|r|^p = sign(r)|r|^{p-1}, divided by the 4 averaged entries.
        expected = np.sign(residual) * np.abs(residual) ** (p - 1) / residual.size
        np.testing.assert_allclose(grad, expected, rtol=1e-14, err_msg=str(p))


def test_lp_loss_rejects_p_below_one():
    for p in [0.5, 0, -2, True, "4", None]:
        with pytest.raises(ValueError, match="`p`"):
            to.LpLoss(p)


def test_lp_loss_serialization_round_trip():
    loss = to.LpLoss(4)
    assert loss.name == "l4_loss"
    assert loss.get_config()["p"] == 4.0
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, to.LpLoss) and clone.p == 4.0 and clone.name == "l4_loss"
    assert float(clone(Y_TRUE, Y_PRED)) == pytest.approx(np.mean(HAND[4]), rel=1e-6)
    # Also through a model's compile config.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile("sgd", loss=to.LpLoss(3))
    restored = keras.Sequential.from_config(model.get_config())
    restored.compile_from_config(model.get_compile_config())
    assert isinstance(restored.loss, to.LpLoss) and restored.loss.p == 3.0


# --- diagnostics --------------------------------------------------------------------------------

# A hand-made chain (Keras layout, F_j of shape (n_{j-1}, n_j)):
#   F1 = [[1,0],[0,1],[1,1]]: F1^T F1 = [[2,1],[1,2]];  F2 = [[1],[2]]: F2 F2^T = [[1,2],[2,4]]
#   gap 1: [[1,2],[2,4]] - [[2,1],[1,2]] = [[-1,1],[1,2]], Frobenius sqrt(7)
#   F3 = [[3]]: F3 F3^T = 9, F2^T F2 = 5: gap 2 = 4
#   absolute = max(sqrt 7, 4) = 4; Gram norms 5, sqrt(10), 9, 5 -> relative = 4 / 9
HAND_CHAIN = [np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([[1.0], [2.0]]), np.array([[3.0]])]


def test_balancedness_of_hand_made_chain():
    result = to.diagnostics.balancedness(HAND_CHAIN)
    assert result.absolute == pytest.approx(4.0, rel=1e-14)
    assert result.relative == pytest.approx(4.0 / 9.0, rel=1e-14)
    two = to.diagnostics.balancedness(HAND_CHAIN[:2])
    assert two.absolute == pytest.approx(math.sqrt(7.0), rel=1e-14)
    assert two.relative == pytest.approx(math.sqrt(7.0) / 5.0, rel=1e-14)
    assert to.diagnostics.balancedness(HAND_CHAIN[:1]).absolute == 0.0


def test_balancedness_of_layer_and_batched_chain():
    layer = to.OverparamDense(1, depth=3, hidden_units=[2, 1], use_bias=False)
    layer.build((None, 3))
    for variable, value in zip(layer.factors, HAND_CHAIN):
        variable.assign(value.astype("float32"))
    assert to.diagnostics.balancedness(layer).absolute == pytest.approx(4.0, rel=1e-7)
    # Batched: a balanced chain (diag(2,1) twice, Grams equal) beside the hand chain's first pair.
    balanced = [np.diag([2.0, 1.0]), np.diag([2.0, 1.0])]
    first = np.stack([HAND_CHAIN[0][:2], balanced[0]])
    second = np.stack([np.array([[1.0], [2.0]]) @ np.ones((1, 2)), balanced[1]])
    absolute, relative = chain_balancedness([keras.ops.convert_to_tensor(first), keras.ops.convert_to_tensor(second)])
    # Batch 0 by hand: F1^T F1 = I, F2 F2^T = [[2,4],[4,8]]: gap [[1,4],[4,7]], sqrt(82); scale sqrt(100)=10.
    np.testing.assert_allclose(np.asarray(absolute), [math.sqrt(82.0), 0.0], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(relative), [math.sqrt(82.0) / 10.0, 0.0], rtol=1e-14)


def test_end_to_end_singular_values_match_numpy_svd_of_product():
    layer = to.OverparamDense(
        3, depth=3, hidden_units=[4, 2], dtype="float64", factor_initializer=keras.initializers.RandomNormal(seed=2)
    )
    layer.build((None, 5))
    product = layer.factors[0].numpy() @ layer.factors[1].numpy() @ layer.factors[2].numpy()
    values = to.diagnostics.end_to_end_singular_values(layer)
    np.testing.assert_allclose(values, np.linalg.svd(product, compute_uv=False), rtol=1e-12, atol=1e-14)
    assert values.dtype == np.float64 and values.shape == (3,)
    assert values[2] < 1e-12  # the width-2 bottleneck: rank 2
    # The hand chain: product [[3],[6],[9]], singular value 3 sqrt(14).
    np.testing.assert_allclose(to.diagnostics.end_to_end_singular_values(HAND_CHAIN), [3 * math.sqrt(14)], rtol=1e-14)


def test_diagnostics_refuse_plain_layers_and_non_finite_factors():
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    for function in (to.diagnostics.balancedness, to.diagnostics.end_to_end_singular_values):
        with pytest.raises(ValueError, match="plain Dense with no factor chain"):
            function(dense)
    layer = to.OverparamDense(2, depth=2)
    layer.build((None, 3))
    layer.factors[1].assign(np.full((2, 2), np.nan, "float32"))
    for function in (to.diagnostics.balancedness, to.diagnostics.end_to_end_singular_values):
        with pytest.raises(ValueError, match="non-finite"):
            function(layer)
    with pytest.raises(ValueError, match="non-finite"):
        to.diagnostics.balancedness([np.ones((2, 2)), np.array([[np.inf], [0.0]])])
    with pytest.raises(ValueError, match="list of factor matrices"):
        to.diagnostics.balancedness(3.0)


def test_spectral_norm_is_the_largest_singular_value_of_the_matrix_view():
    rng = np.random.default_rng(0)
    for shape in [(30, 4), (4, 30), (3, 3, 2, 5)]:
        kernel = rng.normal(size=shape)
        expected = np.linalg.svd(kernel.reshape(-1, shape[-1]), compute_uv=False)[0]
        assert to.diagnostics.spectral_norm(kernel) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="non-finite"):
        to.diagnostics.spectral_norm(np.array([[np.nan, 1.0]]))


def test_effective_learning_rate_is_the_eq27_factor_for_scalars_and_arrays():
    # eta * s^(2 - 2/N): depth 1 -> eta; depth 2 -> eta s; depth 4 -> eta s^1.5.
    assert to.diagnostics.effective_learning_rate(0.1, 4.0, 1) == pytest.approx(0.1)
    assert to.diagnostics.effective_learning_rate(0.1, 4.0, np.int64(2)) == pytest.approx(0.4)
    np.testing.assert_allclose(
        to.diagnostics.effective_learning_rate([0.1, 0.2], [4.0, 9.0], 4), [0.1 * 8.0, 0.2 * 27.0], rtol=1e-14
    )
    with pytest.raises(ValueError, match="depth"):
        to.diagnostics.effective_learning_rate(0.1, 4.0, 0)


def test_lp_loss_rejects_non_finite_p_and_accepts_numpy_numbers():
    for p in [math.inf, -math.inf, math.nan, np.float64("inf")]:
        with pytest.raises(ValueError, match="`p` must be a finite number"):
            to.LpLoss(p)
    assert to.LpLoss(np.int64(4)).p == 4.0
    assert to.LpLoss(np.float32(3.0)).p == 3.0


def test_lp_value_and_slope_by_hand():
    from tf_overparam.losses import abs_power, lp_loss_slope, lp_loss_values

    r = np.array([-2.0, -0.5, 0.0, 1.5])
    for p in [1, 2, 3, 4, 2.5]:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(lp_loss_values(r, p)), np.abs(r) ** p / p, rtol=1e-12)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(lp_loss_slope(r, p)), np.sign(r) * np.abs(r) ** (p - 1), rtol=1e-12
        )
    # Hand values: |-2|^3 = 8, signed -> -8; |-2|^0 signed -> sign = -1.
    assert float(abs_power(np.array(-2.0), 3)) == 8.0
    assert float(abs_power(np.array(-2.0), 3, signed=True)) == -8.0
    assert float(abs_power(np.array(-2.0), 0, signed=True)) == -1.0
