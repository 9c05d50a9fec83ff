"""`.keras` files saved by 0.2.0 (tests/library/data/generate_v0_2_0.py) load with equal outputs.

The registered names in those files (`tf_overparam>OverparamDense`, ...) are part of the
format: they stay as they are, whatever the classes' modules become.
"""

import json
import zipfile

import keras
import numpy as np
import pytest

import tf_overparam as to

REGISTERED_NAMES = {
    "overparam_dense": {"tf_overparam>OverparamDense", "tf_overparam>Balanced", "tf_overparam>NearZero"},
    "overparam_conv2d": {"tf_overparam>OverparamConv2D"},
    "end_to_end_model": {"tf_overparam>FunctionalEndToEndModel", "tf_overparam>EndToEnd"},
}


def _load(data, name):
    model = keras.models.load_model(data / f"{name}_v0_2_0.keras")
    return model, np.load(data / f"{name}_v0_2_0_inputs.npy"), np.load(data / f"{name}_v0_2_0_outputs.npy")


@pytest.mark.parametrize("name", sorted(REGISTERED_NAMES))
def test_the_registered_names_of_0_2_0_files_still_resolve(saved_models_dir, name):
    with zipfile.ZipFile(saved_models_dir / f"{name}_v0_2_0.keras") as archive:
        config = archive.read("config.json").decode()
    names = {value for key, value in _pairs(json.loads(config)) if key == "registered_name" and "tf_overparam" in value}
    assert names == REGISTERED_NAMES[name]
    for registered in names:
        assert keras.saving.get_registered_object(registered) is not None, registered


def _pairs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                yield key, value
            else:
                yield from _pairs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pairs(value)


def test_a_dense_chain_model_saved_by_0_2_0_loads_with_equal_outputs_and_penalty(saved_models_dir):
    model, x, outputs = _load(saved_models_dir, "overparam_dense")
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["OverparamDense", "OverparamDense"]
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs, rtol=1e-5, atol=1e-6)
    penalty = [float(keras.ops.convert_to_numpy(v)) for v in model.losses]
    np.testing.assert_allclose(penalty, np.load(saved_models_dir / "overparam_dense_v0_2_0_losses.npy"), rtol=1e-5)
    # The penalty is 0.01 ||F_1 F_2||^2 of fc2's loaded factors (a second computation, in NumPy).
    first, second = (np.asarray(keras.ops.convert_to_numpy(f), np.float64) for f in model.get_layer("fc2").factors)
    np.testing.assert_allclose(penalty, [0.01 * np.sum((first @ second) ** 2)], rtol=1e-5)


def test_a_conv_model_with_both_chain_kinds_saved_by_0_2_0_loads_with_equal_outputs(saved_models_dir):
    model, x, outputs = _load(saved_models_dir, "overparam_conv2d")
    channel, spatial = model.layers
    assert isinstance(channel, to.OverparamConv2D) and not channel.spatial
    assert isinstance(spatial, to.OverparamConv2D) and spatial.spatial and spatial.kernel_sizes == ((2, 2), (2, 2))
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs, rtol=1e-5, atol=1e-6)


def test_a_compiled_end_to_end_model_saved_by_0_2_0_loads_with_its_optimizer_and_state(saved_models_dir):
    model, x, outputs = _load(saved_models_dir, "end_to_end_model")
    assert isinstance(model, to.EndToEndModel) and (model.depth, model.weight_decay) == (3, 0.01)
    assert isinstance(model.optimizer, to.optimizers.EndToEnd) and model.optimizer.depth == 3
    np.testing.assert_allclose(model.predict(x, verbose=0), outputs, rtol=1e-5, atol=1e-6)
    # One more step moves the model as it moved 0.2.0's: the momentum came back with the file
    # (without it the step differs by far more than the tolerance).
    model.train_on_batch(x, np.load(saved_models_dir / "end_to_end_model_v0_2_0_targets.npy"))
    after = np.load(saved_models_dir / "end_to_end_model_v0_2_0_outputs_after_step.npy")
    np.testing.assert_allclose(model.predict(x, verbose=0), after, rtol=1e-4, atol=1e-5)
