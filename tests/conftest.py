"""Shared fixtures: where the real data sets are, and a clean Keras state per test; and the
backend of the run.

The suite runs twice (README, .ci/run): on TensorFlow, then with `KERAS_BACKEND=jax`.
`tests/library` runs on every backend; `tests/experiments` on TensorFlow only (its own
conftest.py). A library test that needs TensorFlow carries `@pytest.mark.tf_only("why")` and is
skipped on another backend. On JAX, 64-bit types are
enabled before Keras is imported, so that the float64 checks run in float64 (JAX would quietly
compute them in float32).
"""

import os
import pathlib

import pytest

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402 - after the JAX precision switch

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


@pytest.fixture(scope="session")
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


# --- the backend of the run ---------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "tf_only(reason): runs on the TensorFlow backend only")


def pytest_report_header(config):
    return f"Keras backend: {keras.backend.backend()}"


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == "tensorflow":
        return
    for item in items:
        for marker in item.iter_markers("tf_only"):
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"TensorFlow only: {reason}"))


def pytest_sessionfinish(session, exitstatus):
    # A backend run in which no test passed proves nothing: fail it rather than let it look
    # green (every test skipped) or exit 5 (nothing collected).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if keras.backend.backend() != "tensorflow" and reporter is not None and exitstatus in (0, 5):
        if not reporter.stats.get("passed"):
            reporter.write_line(f"no test passed on the {keras.backend.backend()} backend", red=True)
            session.exitstatus = 1
