"""Writes the 0.2.0 `.keras` files of tests/library/test_saved_models.py (run once, with 0.2.0).

    KERAS_BACKEND=tensorflow PYTHONPATH=. python tests/library/data/generate_v0_2_0.py

Each model is saved with the inputs it was evaluated on and the outputs 0.2.0 computed; the
compiled `EndToEndModel` also with the outputs after one more training step on saved targets,
which needs the optimizer's state (momentum) to load with the model.
"""

import pathlib

import keras
import numpy as np

import tf_overparam as to

DATA = pathlib.Path(__file__).resolve().parent


def _save(model, name, inputs):
    model.save(DATA / f"{name}_v0_2_0.keras")
    np.save(DATA / f"{name}_v0_2_0_inputs.npy", inputs)
    np.save(DATA / f"{name}_v0_2_0_outputs.npy", keras.ops.convert_to_numpy(model(inputs)))


def dense_chain():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    hidden = to.OverparamDense(4, depth=3, hidden_units=[6, 3], activation="tanh", name="fc1")(inputs)
    outputs = to.OverparamDense(
        2,
        depth=2,
        factor_initializer=to.initializers.Balanced(to.initializers.NearZero(0.5, seed=2), seed=3),
        kernel_regularizer=keras.regularizers.L2(0.01),
        name="fc2",
    )(hidden)
    model = keras.Model(inputs, outputs)
    for factor in model.get_layer("fc1").factors:
        factor.assign(factor * 30.0)  # away from near zero, so the outputs say something
    _save(model, "overparam_dense", np.random.default_rng(0).normal(size=(3, 5)).astype("float32"))
    np.save(DATA / "overparam_dense_v0_2_0_losses.npy", [float(keras.ops.convert_to_numpy(v)) for v in model.losses])


def conv_chains():
    keras.utils.set_random_seed(2)
    init = keras.initializers.RandomNormal(stddev=0.3, seed=4)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            to.OverparamConv2D(3, 3, padding="same", hidden_filters=4, factor_initializer=init, name="channel"),
            to.OverparamConv2D(
                2, 3, strides=2, kernel_sizes=(2, 2), factor_initializer=init, activation="relu", name="spatial"
            ),
        ]
    )
    _save(model, "overparam_conv2d", np.random.default_rng(1).normal(size=(2, 6, 6, 2)).astype("float32"))


def end_to_end_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="tanh", name="hidden")(inputs)
    model = to.EndToEndModel(inputs, keras.layers.Dense(2, name="out")(hidden), depth=3, weight_decay=0.01)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)  # momentum is now non-zero
    _save(model, "end_to_end_model", x)
    np.save(DATA / "end_to_end_model_v0_2_0_targets.npy", y)
    model.train_on_batch(x, y)
    np.save(DATA / "end_to_end_model_v0_2_0_outputs_after_step.npy", keras.ops.convert_to_numpy(model(x)))


if __name__ == "__main__":
    dense_chain()
    conv_chains()
    end_to_end_model()
