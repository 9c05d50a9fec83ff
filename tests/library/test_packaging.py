"""Packaging: the distribution installs only the `tf_overparam` package, needs Keras and NumPy
alone, and `import tf_overparam` loads nothing beyond Keras, NumPy and the backend."""

import configparser
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import pytest
import setuptools

import tf_overparam

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HEAVY = ("tensorflow", "tensorboard", "tensorflow_datasets", "matplotlib", "tqdm")


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return config


def _requirements(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _name(requirement):
    for separator in "[<>=!~ ":
        requirement = requirement.split(separator)[0]
    return requirement


def test_only_tf_overparam_packages_are_found_for_the_wheel():
    include = _setup_cfg()["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(where=str(REPO_ROOT), include=include)
    assert "tf_overparam" in packages and "tf_overparam.layers" in packages
    assert all(p == "tf_overparam" or p.startswith("tf_overparam.") for p in packages), packages
    # The checkout does hold other top-level packages, which must stay out.
    assert {"experiments", "benchmarks"} <= set(setuptools.find_packages(where=str(REPO_ROOT)))


def test_version_matches_setup_cfg():
    assert _setup_cfg()["metadata"]["version"] == tf_overparam.__version__


def test_the_library_requires_keras_and_numpy_and_the_extras_say_who_needs_what():
    config = _setup_cfg()
    assert sorted(map(_name, _requirements(config["options"]["install_requires"]))) == ["keras", "numpy"]
    extras = {name: {_name(r) for r in _requirements(text)} for name, text in config["options.extras_require"].items()}
    assert extras["tensorflow"] == {"tensorflow"} and extras["jax"] == {"jax"} and extras["ray"] == {"ray"}
    assert {"tensorflow", "tensorboard", "tensorflow-datasets", "matplotlib", "tqdm"} <= extras["experiments"]
    assert {"mkdocs-material", "mkdocstrings"} <= extras["docs"]
    # `.[jax,test]` is a TensorFlow-free install.
    assert not {"tensorflow", "tensorboard", "tensorflow-datasets"} & (extras["test"] | extras["jax"])
    assert extras["all"] == set().union(*(names for extra, names in extras.items() if extra != "all"))


def _run(script, backend):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    return result


IMPORT_PROBE = textwrap.dedent(
    """
    import json, sys
    import keras

    keras.ops.ones(1)  # the backend, fully loaded
    before = {name.split(".")[0] for name in sys.modules}
    import tf_overparam

    new = {name.split(".")[0] for name in sys.modules} - before
    print(json.dumps({
        "new": sorted(new - set(sys.stdlib_module_names)),
        "all": sorted(before | new),
        "callbacks": "tf_overparam.callbacks" in sys.modules,
    }))
    """
)


def test_import_loads_nothing_beyond_keras_numpy_and_the_backend():
    """In a fresh process on this run's backend: the packages `import tf_overparam` adds to what
    `import keras` loaded (Keras itself loads matplotlib where it is installed)."""
    result = _run(IMPORT_PROBE, keras.backend.backend())
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.splitlines()[-1])
    assert modules["new"] == ["tf_overparam"]
    assert not set(HEAVY) & set(modules["new"])
    if keras.backend.backend() == "jax":
        assert "tensorflow" not in modules["all"]
    assert not modules["callbacks"]  # imported on first use (it needs TensorFlow)


BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import sys

    class _NoTensorFlow:  # `import tensorflow` fails as if TensorFlow were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorboard"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, _NoTensorFlow())
    """
)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs in the JAX run, on a library without TensorFlow")
def test_tensorboard_writers_without_tensorflow_raise_an_import_error_naming_the_extra():
    # The callbacks module itself imports without TensorFlow (SharpnessLogger needs none); what
    # writes through tf.summary says which extra to install when it is used.
    script = BLOCK_TENSORFLOW + textwrap.dedent(
        """
        import numpy as np
        import tf_overparam

        assert "tensorflow" not in sys.modules
        tf_overparam.callbacks.SharpnessLogger(np.zeros((1, 1)), np.zeros((1, 1)))
        try:
            tf_overparam.callbacks.write_chain_summaries([np.eye(2)], 0)
        except ImportError as error:
            print(error)
        """
    )
    result = _run(script, "jax")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install tf_overparam[tensorflow]" in result.stdout
