"""Moved out of the library: `experiments.engine.fullbatch` in the repository's experiments.

The full-batch engine serves the experiments only and is TensorFlow code, so it no longer ships
in the `tf_overparam` wheel, which needs Keras, NumPy and one backend alone.
"""

raise ImportError(
    "tf_overparam.fullbatch moved to experiments.engine.fullbatch (the experiments' engine, TensorFlow only): run from a "
    "checkout of the repository with `pip install -e .[experiments]` and import experiments.engine.fullbatch."
)
