"""Shared fixtures: where the real data sets are, and a clean Keras state per test."""

import os
import pathlib

import keras
import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_data_dir(name, env_var):
    """The directory of a real data set, or a skip (a failure under CI=true)."""
    path = pathlib.Path(os.environ.get(env_var, SHARED_DATA / name))
    if not path.is_dir():
        message = f"data set {name!r} not found at {path} (set {env_var})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def gas_sensor_dir():
    return _shared_data_dir("gas_sensor", "TF_OVERPARAM_GAS_SENSOR_DIR")


@pytest.fixture
def mnist_dir():
    return _shared_data_dir("mnist", "TF_OVERPARAM_MNIST_DIR")


def _reset_keras():
    keras.backend.clear_session()
    keras.backend.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True)
def _clean_keras_state():
    _reset_keras()
    yield
    _reset_keras()


@pytest.fixture
def float64():
    """Keras in float64 (floatx and the dtype policy) for sharp numerical comparisons."""
    keras.backend.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
