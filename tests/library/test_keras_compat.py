"""The private Keras hooks of `tf_overparam._keras_compat`, each checked against the installed
Keras: if Keras changes one, the test named after it fails here."""

import pathlib

import keras
import numpy as np

from tf_overparam import _keras_compat as compat

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[2] / "tf_overparam"


def test_no_module_but_the_compatibility_module_uses_keras_src():
    users = sorted(
        str(path.relative_to(PACKAGE_DIR))
        for path in PACKAGE_DIR.rglob("*.py")
        if "keras.src" in path.read_text() and path.name != "_keras_compat.py"
    )
    assert users == []


def test_functional_is_the_class_of_a_functional_model_and_of_a_functionally_called_subclass():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(inputs)
    assert issubclass(compat.Functional, keras.Model)
    assert type(keras.Model(inputs, outputs)) is compat.Functional

    class Subclass(keras.Model):
        pass

    assert isinstance(Subclass(inputs, outputs), compat.Functional)
    assert not isinstance(keras.Sequential([inputs, keras.layers.Dense(2)]), compat.Functional)


def test_functional_init_arguments_recognises_inputs_and_outputs():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(inputs)
    assert compat.functional_init_arguments((inputs, outputs), {})
    assert compat.functional_init_arguments((inputs,), {"outputs": outputs})
    assert compat.functional_init_arguments((), {"inputs": inputs, "outputs": outputs, "name": "m"})
    assert not compat.functional_init_arguments((), {})
    assert not compat.functional_init_arguments((), {"name": "m"})


class _Penalised(compat.OwnLossesMixin, keras.layers.Layer):
    """Outputs zeros; its own loss is w^2 of its one weight w."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer=keras.initializers.Constant(3.0))

    def call(self, inputs):
        return inputs * 0.0

    def extra_own_losses(self):
        return [keras.ops.square(self.w)]


def test_own_losses_mixin_adds_its_losses_to_model_losses_and_to_training():
    model = keras.Sequential([keras.Input((2,)), _Penalised()])
    assert [float(keras.ops.convert_to_numpy(v)) for v in model.losses] == [9.0]  # before any call
    model.compile(keras.optimizers.SGD(0.125), loss="mse")
    model.fit(np.ones((4, 2)), np.zeros((4, 2)), epochs=1, batch_size=4, verbose=0)
    # The loss is w^2 alone (the outputs match the targets): one step gives w (1 - 2 * 0.125).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.layers[0].w), 3.0 * 0.75, rtol=1e-6)


def test_sublayers_are_the_directly_tracked_layers_in_order():
    class Pair(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.first = keras.layers.Dense(2)
            self.second = keras.Sequential([keras.layers.Dense(1)])

        def call(self, inputs):
            return self.second(self.first(inputs))

    pair = Pair()
    assert compat.sublayers(pair) == [pair.first, pair.second]
    assert compat.sublayers(keras.layers.Dense(2)) == []
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    # A Sequential tracks its InputLayer as well, which `Model.layers` leaves out.
    assert [
        layer for layer in compat.sublayers(model) if not isinstance(layer, keras.layers.InputLayer)
    ] == model.layers
