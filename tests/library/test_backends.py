"""The library on Keras' other backends: the README's JAX example without TensorFlow, `.keras`
files moving between TensorFlow and JAX, the benchmark without TensorFlow, and copies that
outlive JAX's donated buffers.

The tests that start fresh Python processes with the backends they need run once, in the JAX
run of the suite (tests/conftest.py).
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"

# Tests that start fresh processes with the backends they need run once, in the JAX run.
in_the_jax_run = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="runs in the JAX run; it starts the backends it needs itself"
)
needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed (a JAX-only install)"
)

# Put first on sys.meta_path, it makes `import tensorflow` fail as if TensorFlow were not
# installed, so that a script proves it never needs it.
BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import sys

    class _NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorboard", "tensorflow_datasets"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _NoTensorFlow())
    """
)


def _run(script, backend, cwd, timeout=300):
    """Runs `script` in a fresh interpreter on `backend`; returns its stdout."""
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # JAX without x64 (its default) computes in float32 only: the library asks for no float64
    # there (a request would be truncated, with this warning).
    assert "Explicitly requested dtype float64" not in result.stderr, result.stderr[-4000:]
    return result.stdout


def _jax_example():
    blocks = re.findall(r"<!-- jax-example -->\n```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README has one JAX example, marked <!-- jax-example -->"
    return blocks[0]


@in_the_jax_run
def test_readme_jax_example_runs_without_tensorflow(tmp_path):
    script = (
        BLOCK_TENSORFLOW
        + _jax_example()
        + textwrap.dedent(
            """
        import json, sys
        import numpy as np
        import tf_overparam

        probe = rng.normal(size=(32, 16)).astype("float32")
        print(json.dumps({
            "backend": keras.backend.backend(),
            "tensorflow_imported": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"),
            "loss": history.history["loss"],
            "zero_loss": float(np.mean(y.astype(np.float64) ** 2)),
            "model": model.predict(probe, verbose=0).tolist(),
            "plain": plain.predict(probe, verbose=0).tolist(),
            "reloaded": reloaded.predict(probe, verbose=0).tolist(),
            "plain_layers": [type(layer).__name__ for layer in plain.layers],
            "reloaded_layers": [type(layer).__name__ for layer in reloaded.layers],
            "shallow_loss": shallow_history.history["loss"],
            "shallow_optimizer": type(shallow.optimizer).__name__,
        }))
        """
        )
    )
    result = json.loads(_run(script, "jax", tmp_path).splitlines()[-1])
    assert result["backend"] == "jax"
    assert result["tensorflow_imported"] == []
    # It trained: the mean squared error fell far below that of the zero predictor, mean(y^2).
    assert result["loss"][-1] < 0.1 * result["zero_loss"], result["loss"]
    assert result["plain_layers"] == ["Dense"] and result["reloaded_layers"] == ["OverparamDense"]
    # The EndToEnd optimizer trained the plain Dense as well.
    assert result["shallow_optimizer"] == "EndToEnd"
    assert result["shallow_loss"][-1] < 0.1 * result["zero_loss"], result["shallow_loss"]
    out = np.asarray(result["model"])
    # The reloaded model holds the same weights: the same function bit for bit.
    np.testing.assert_array_equal(np.asarray(result["reloaded"]), out)
    # Collapsed: one matmul with the product instead of three, equal to float32 rounding.
    assert np.max(np.abs(np.asarray(result["plain"]) - out)) <= 1e-5 * np.max(np.abs(out))


SAVE = textwrap.dedent(
    """
    import keras, numpy as np
    import tf_overparam as to

    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype("float32")
    inputs = keras.Input((6,))
    hidden = to.OverparamDense(
        5, depth=3, hidden_units=[7, 4], activation="tanh",
        factor_initializer=to.initializers.Balanced(keras.initializers.RandomNormal(stddev=0.5, seed=1), seed=2),
        kernel_regularizer=keras.regularizers.L2(0.01), bias_initializer="ones",
    )(inputs)
    outputs = to.OverparamDense(2, depth=2, factor_initializer=to.initializers.Identity(0.9))(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), loss=to.LpLoss(4))
    model.fit(x, rng.normal(size=(16, 2)).astype("float32"), epochs=2, verbose=0)  # away from the init
    model.save("model.keras")
    np.save("x.npy", x)
    np.save("saved_outputs.npy", model.predict(x, verbose=0))

    # Both forms of OverparamConv2D: a channel chain (strided, 'same') and a spatial chain.
    images = rng.normal(size=(4, 9, 9, 2)).astype("float32")
    random = keras.initializers.RandomNormal(stddev=0.4, seed=5)
    conv = keras.Sequential([
        keras.Input((9, 9, 2)),
        to.OverparamConv2D(4, 3, strides=2, padding="same", depth=3, factor_initializer=random, activation="relu"),
        to.OverparamConv2D(3, 4, kernel_sizes=(3, 2), padding="valid", factor_initializer=random),
    ])
    conv.save("conv.keras")
    np.save("images.npy", images)
    np.save("saved_conv_outputs.npy", conv.predict(images, verbose=0))
    np.savez("saved_conv_weights.npz", *[np.asarray(w) for w in conv.get_weights()])
    """
)

LOAD = textwrap.dedent(
    """
    import keras, numpy as np
    import tf_overparam as to

    model = keras.saving.load_model("model.keras")
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["OverparamDense"] * 2
    assert model.layers[1].hidden_units == [7, 4] and model.loss.p == 4.0
    np.save("loaded_outputs.npy", model.predict(np.load("x.npy"), verbose=0))
    np.savez("loaded_weights.npz", *[np.asarray(w) for w in model.get_weights()])

    conv = keras.saving.load_model("conv.keras")
    assert [type(layer).__name__ for layer in conv.layers] == ["OverparamConv2D"] * 2
    assert conv.layers[1].kernel_sizes is not None and conv.layers[0].strides == (2, 2)
    np.save("loaded_conv_outputs.npy", conv.predict(np.load("images.npy"), verbose=0))
    np.savez("loaded_conv_weights.npz", *[np.asarray(w) for w in conv.get_weights()])
    """
)


def _numpy_forward(weights, x):
    """The saved model in float64 NumPy: tanh(x F1 F2 F3 + b1) G1 G2 + b2."""
    f1, f2, f3, b1, g1, g2, b2 = (np.asarray(w, np.float64) for w in weights)
    hidden = np.tanh(x @ (f1 @ f2 @ f3) + b1)
    return hidden @ (g1 @ g2) + b2


@in_the_jax_run
@needs_tensorflow
@pytest.mark.parametrize("saved_on, loaded_on", [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_keras_file_loads_on_the_other_backend_with_equal_outputs(tmp_path, saved_on, loaded_on):
    _run(SAVE, saved_on, tmp_path)
    _run(LOAD, loaded_on, tmp_path)
    saved, loaded = np.load(tmp_path / "saved_outputs.npy"), np.load(tmp_path / "loaded_outputs.npy")
    weights = np.load(tmp_path / "loaded_weights.npz")
    weights = [weights[f"arr_{i}"] for i in range(len(weights.files))]
    assert [w.shape for w in weights] == [(6, 7), (7, 4), (4, 5), (5,), (5, 2), (2, 2), (2,)]
    # Two float32 computations of one function, on two backends: equal to float32 rounding.
    scale = np.max(np.abs(saved))
    assert np.max(np.abs(loaded - saved)) <= 1e-5 * scale
    # And both are the function the loaded weights define, computed in float64 NumPy.
    expected = _numpy_forward(weights, np.load(tmp_path / "x.npy").astype(np.float64))
    assert np.max(np.abs(loaded - expected)) <= 1e-5 * scale
    assert np.max(np.abs(saved - expected)) <= 1e-5 * scale
    # The convolutions: the same weights, bit for bit, and the same outputs to float32 rounding.
    saved_weights, loaded_weights = (np.load(tmp_path / f"{kind}_conv_weights.npz") for kind in ("saved", "loaded"))
    assert saved_weights.files == loaded_weights.files and len(saved_weights.files) == 3 + 1 + 2 + 1
    for name in saved_weights.files:
        np.testing.assert_array_equal(loaded_weights[name], saved_weights[name])
    saved, loaded = np.load(tmp_path / "saved_conv_outputs.npy"), np.load(tmp_path / "loaded_conv_outputs.npy")
    assert saved.shape == (4, 2, 2, 3)  # 9 -> 5 (stride 2, same), then a 4x4 valid kernel: 2
    assert np.max(np.abs(loaded - saved)) <= 1e-5 * np.max(np.abs(saved))


# The CNN's parameters by hand: conv 5x5x1x32 + 32, conv 5x5x32x64 + 64, dense 3136x512 + 512,
# dense 512x10 + 10; the depth-2 twin adds a 512x512 and a 10x10 factor.
CNN_PARAMETERS = (5 * 5 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (3136 * 512 + 512) + (512 * 10 + 10)
TWIN_EXTRA = 512 * 512 + 10 * 10


@in_the_jax_run
@pytest.mark.parametrize("backend", ["jax", pytest.param("tensorflow", marks=needs_tensorflow)])
def test_backend_benchmark_quick_run(tmp_path, backend):
    """`python -m benchmarks.run --backend NAME --quick --precision`, on JAX with TensorFlow blocked."""
    script = (BLOCK_TENSORFLOW if backend != "tensorflow" else "") + textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["benchmarks.run", "--backend", {backend!r}, "--quick", "--precision", "--out", "out"]
        runpy.run_module("benchmarks.run", run_name="__main__")
        """
    )
    _run(script, backend, tmp_path, timeout=600)
    results = json.loads((tmp_path / "out" / f"results-{backend}.json").read_text())
    assert results["machine"]["backend"] == backend and results["machine"]["device_count"] >= 1
    assert results["modules_loaded"]["tensorflow"] == (backend == "tensorflow")
    cnn = results["cnn"]
    assert cnn["models"]["plain"]["parameters"] == CNN_PARAMETERS
    assert cnn["models"]["overparameterized"]["parameters"] == CNN_PARAMETERS + TWIN_EXTRA
    for kind in ("train", "predict"):
        twin, plain = (cnn["models"][name][kind] for name in ("overparameterized", "plain"))
        for timing in (twin, plain):
            assert timing["seconds_per_step"] * timing["steps"] == pytest.approx(sorted(timing["seconds"])[1])
        assert cnn["ratios"]["overparameterized"][f"{kind}_time_vs_plain"] == pytest.approx(
            twin["seconds_per_step"] / plain["seconds_per_step"]
        )
    direction = results["direction"]
    assert set(direction["kernels"]) == {"64x32", "128x64"}
    for cases in direction["kernels"].values():
        assert cases["direction_vs_matmul"] == pytest.approx(
            cases["end_to_end"]["seconds_per_step"] / cases["matmul"]["seconds_per_step"]
        )
    # The float32 direction against a float64 SVD evaluation, per matmul precision (on a CPU the
    # precisions agree): within the 1e-3 that float32 keeps at condition 1e3, depths 2 and 4.
    precision = results["precision"]
    assert len(precision["precisions"]) == 2
    assert [(row["kernel"], row["depth"]) for row in precision["rows"]] == [("64x32", 2), ("64x32", 4)]
    for row in precision["rows"]:
        assert set(row["errors"]) == set(precision["precisions"])
        assert all(0 < error < 1e-3 for error in row["errors"].values()), row
    for cost in precision["cost"].values():  # the direction's cost in matmuls, per precision
        for cases in cost["kernels"].values():
            assert cases["direction_vs_matmul"] == pytest.approx(
                cases["end_to_end"]["seconds_per_step"] / cases["matmul"]["seconds_per_step"]
            )
    # A second run into the same folder refuses to overwrite the first.
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    again = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--backend", backend, "--quick", "--out", "out"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_converted_models_own_their_arrays_and_train_apart():
    # JAX's fit donates a model's buffers (frees them for the updated ones): a converted copy that
    # shared an array with its source would find it deleted once the source trains.
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    import tf_overparam as to

    plain = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="relu", bias_initializer="ones"), keras.layers.Dense(3)]
    )
    deep = to.overparameterize(plain, depth=2, preserve_function=True)
    folded = to.collapse(deep)
    before = {
        name: keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        for name, model in (("deep", deep), ("folded", folded))
    }
    for model in (plain, deep, folded):  # each trains; the others keep their own weights
        model.compile(keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        if model is plain:
            for name, other in (("deep", deep), ("folded", folded)):
                np.testing.assert_array_equal(other.predict(x, verbose=0), before[name])
