"""The experiments' and benchmarks' tests: TensorFlow only.

The experiments run on TensorFlow (the full-batch engine is `tf.function` code, the MNIST input
pipeline is `tf.data`), so on another backend this folder is not collected, and the run's summary
says so.
"""

import keras
import pytest

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"

# pytest reads this name: the folder's test files are skipped whole on another backend.
collect_ignore_glob = [] if ON_TENSORFLOW else ["test_*.py"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ON_TENSORFLOW:
        terminalreporter.section(f"not run on {keras.backend.backend()}")
        terminalreporter.line("tests/experiments: the experiments and benchmarks run on TensorFlow")


@pytest.fixture(scope="session")
def quick_gas_sensor_run(gas_sensor_dir, tmp_path_factory):
    """The run folder of one quick gas sensor run (`--quick`, every default figure), shared by the
    tests that read it: the run takes a minute or more, and what they check does not change it."""
    from experiments import gas_sensor

    out = tmp_path_factory.mktemp("quick_gas_sensor_run")
    return gas_sensor.main(["--quick", "--data-dir", str(gas_sensor_dir), "--out", str(out)])
