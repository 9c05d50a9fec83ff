"""Moved out of the library: `experiments.data` in the repository's experiments.

The data loaders (the UCI gas sensor set, MNIST through TensorFlow Datasets) serve the
experiments only, so they no longer ship in the `tf_overparam` wheel.
"""

raise ImportError(
    "tf_overparam.datasets moved to experiments.data (experiments.data.gas_sensor, "
    "experiments.data.mnist): run from a checkout of the repository with "
    "`pip install -e .[experiments]` and import from experiments.data."
)
