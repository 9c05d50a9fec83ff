"""`OverparamDense` under Keras' own layer test harness (tests/_layer_testing.py)."""

import keras
import pytest

import tf_overparam as to
from tests._layer_testing import run_keras_layer_test


@pytest.mark.parametrize(
    "init_kwargs, input_shape, trainable, losses",
    [
        ({"units": 3, "depth": 1}, (2, 4), 2, 0),
        ({"units": 3, "depth": 2}, (2, 4), 3, 0),
        ({"units": 3, "depth": 3, "hidden_units": [5, 2], "use_bias": False, "activation": "relu"}, (2, 4), 3, 0),
        ({"units": 2, "depth": 2, "factor_initializer": "identity"}, (2, 3, 4), 3, 0),
        (
            {
                "units": 3,
                "depth": 2,
                "factor_initializer": {
                    "class_name": "Balanced",
                    "module": None,
                    "config": {"seed": 0},
                    "registered_name": "tf_overparam>Balanced",
                },
                "kernel_regularizer": "l2",
                "factor_regularizer": "l2",
                "bias_regularizer": "l2",
                "activity_regularizer": "l2",
            },
            (2, 4),
            3,
            # one end-to-end penalty, two factor penalties, the bias penalty, the activity one
            5,
        ),
    ],
)
def test_overparam_dense_passes_keras_layer_harness(init_kwargs, input_shape, trainable, losses):
    run_keras_layer_test(
        to.OverparamDense,
        init_kwargs,
        input_shape=input_shape,
        expected_output_shape=input_shape[:-1] + (init_kwargs["units"],),
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=0,
        expected_num_losses=losses,
        supports_masking=True,
    )


def test_harness_catches_a_wrong_expectation():
    # The helper must fail a test when a check fails (here: a wrong output shape).
    with pytest.raises(AssertionError):
        run_keras_layer_test(to.OverparamDense, {"units": 3}, input_shape=(2, 4), expected_output_shape=(2, 4))
    keras.mixed_precision.set_global_policy("float32")
