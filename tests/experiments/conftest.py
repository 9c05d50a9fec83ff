"""The experiments' and benchmarks' tests: TensorFlow only.

The experiments run on TensorFlow (the full-batch engine is `tf.function` code, the MNIST input
pipeline is `tf.data`), so on another backend this folder is not collected, and the run's summary
says so.
"""

import keras

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"

# pytest reads this name: the folder's test files are skipped whole on another backend.
collect_ignore_glob = [] if ON_TENSORFLOW else ["test_*.py"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ON_TENSORFLOW:
        terminalreporter.section(f"not run on {keras.backend.backend()}")
        terminalreporter.line("tests/experiments: the experiments and benchmarks run on TensorFlow")
