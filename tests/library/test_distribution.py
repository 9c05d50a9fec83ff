"""`EndToEnd` under Keras' distribution API: `keras.distribution.DataParallel` on two host devices
(JAX) gives one device's trajectory."""

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Runs 5 full-batch steps of a small CNN with `EndToEnd` (method fixed, so both runs take the same
# path), once on one device and once under DataParallel on two, in float32 and in float64, and
# saves the weights.
_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import keras
    import numpy as np
    from tf_overparam.optimizers import EndToEnd

    out = sys.argv[1]
    assert len(jax.devices()) == 2, jax.devices()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 2)), rng.normal(size=(8, 3))
    results = {}
    for dtype in ["float32", "float64"]:
        for devices in [1, 2]:
            keras.backend.clear_session()
            keras.config.set_floatx(dtype)
            keras.config.set_dtype_policy(dtype)
            distribution = keras.distribution.DataParallel(devices=jax.devices()) if devices == 2 else None
            keras.distribution.set_distribution(distribution)
            keras.utils.set_random_seed(1)
            model = keras.Sequential(
                [
                    keras.Input((6, 6, 2)),
                    keras.layers.Conv2D(4, 3, activation="tanh"),
                    keras.layers.Flatten(),
                    keras.layers.Dense(5, activation="tanh"),
                    keras.layers.Dense(3),
                ]
            )
            optimizer = EndToEnd(keras.optimizers.SGD(0.1, momentum=0.5), depth=3, weight_decay=0.01, method="eigh", model=model)
            model.compile(optimizer, loss="mse")
            model.fit(x.astype(dtype), y.astype(dtype), batch_size=8, epochs=5, shuffle=False, verbose=0)
            kernel = model.layers[-1].kernel.value
            results[f"{dtype}_{devices}_devices_holding_the_kernel"] = len(kernel.sharding.device_set)
            for i, weight in enumerate(model.get_weights()):
                results[f"{dtype}_{devices}_{i}"] = weight
    np.savez(out, **results)
    """
)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs JAX in a subprocess: once, in the suite's JAX run")
def test_data_parallel_on_two_host_devices_matches_one_device(tmp_path):
    script = tmp_path / "data_parallel.py"
    script.write_text(_SCRIPT)
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        # Two CPU devices: read when JAX starts, so set before the subprocess imports it.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for dtype, rtol in [("float32", 1e-6), ("float64", 1e-12)]:
        assert int(out[f"{dtype}_1_devices_holding_the_kernel"]) == 1
        assert int(out[f"{dtype}_2_devices_holding_the_kernel"]) == 2  # replicated: the two-device path ran
        for i in range(6):
            one, two = out[f"{dtype}_1_{i}"], out[f"{dtype}_2_{i}"]
            assert one.dtype == np.dtype(dtype)
            error = np.linalg.norm(two - one) / np.linalg.norm(one)
            assert error <= rtol, (dtype, i, error)
