"""The library's tests: every backend of the suite's runs (TensorFlow, then JAX).

A test here that needs TensorFlow itself (tf.distribute, tf.summary) carries
`@pytest.mark.tf_only("why")` (tests/conftest.py) and is skipped on another backend.
"""

import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture
def saved_models_dir():
    """The `.keras` files saved by earlier releases, with their inputs and expected outputs."""
    return DATA
