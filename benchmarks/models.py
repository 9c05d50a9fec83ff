"""The models the benchmarks time: the tutorial CNN's variants (`cnn_models`), the kernels
of the update-rule section (`benchmark_kernel`) and the models of
the side-by-side comparison (`side_by_side_model`), built on the current Keras backend."""

import warnings

import keras
import numpy as np

DEPTH = 2  # depth of the overparameterized twins and of the emulated chains


def cnn():
    """The MNIST tutorial CNN's layers (conv 5x5x32, pool, conv 5x5x64, pool, dense 3136 -> 512
    relu, dense 512 -> 10, logits out) with no dropout and no L2 penalty: the shapes of
    `experiments.mnist_cnn.build_cnn`, without TensorFlow or the experiment's code."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool1"),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(512, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ],
        name="cnn",
    )


def tutorial_cnn(penalized=True):
    """The experiment's own tutorial CNN (`experiments.mnist_cnn.build_cnn`: dropout, and with
    `penalized` its L2 penalty on the dense layers)."""
    from experiments import mnist_cnn

    return mnist_cnn.build_cnn(mnist_cnn.Config() if penalized else mnist_cnn.Config(l2=0.0))


def compiled(model, optimizer=None):
    """`model` compiled for integer labels and logits; momentum SGD unless `optimizer`."""
    model.compile(
        optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _twin(model):
    from tf_overparam.models import overparameterize

    with warnings.catch_warnings():  # the convolutions stay plain, as in the paper's twin
        warnings.filterwarnings("ignore", message="overparameterize left these layers unchanged")
        return overparameterize(model, depth=DEPTH)


def _end_to_end_cnn(build):
    from tf_overparam.optimizers import EndToEnd

    optimizer = EndToEnd(keras.optimizers.SGD(0.01, momentum=0.9), depth=DEPTH, variables=["*fc*/kernel"])
    return compiled(build(True), optimizer)


# name -> how it is made from `build(penalized)`; each baseline is the plain CNN with the same
# objective.
CNN_VARIANTS = {
    "plain": lambda build: compiled(build(True)),
    "overparameterized": lambda build: compiled(_twin(build(True))),
    "collapsed": lambda build: compiled(_collapsed(_twin(build(True)))),
    "plain, EndToEnd optimizer": _end_to_end_cnn,
    "plain, no L2": lambda build: compiled(build(False)),
    "overparameterized, no L2": lambda build: compiled(_twin(build(False))),
}
CNN_BASELINES = {"plain, no L2": "plain, no L2", "overparameterized, no L2": "plain, no L2"}


def _collapsed(model):
    from tf_overparam.models import collapse

    return collapse(model)


def cnn_models(variants, build=tutorial_cnn):
    """The CNN in the given `variants` (names of `CNN_VARIANTS`), compiled (momentum SGD,
    cross-entropy), from `build(penalized)`: the plain CNN; its depth-2 twin
    (`overparameterize`); the twin collapsed; the plain CNN trained by `EndToEnd(depth=2)` on its
    dense kernels (the twin's dynamics without its factors); "no L2": without the tutorial's L2
    penalty on the dense layers (which on the twin acts on the end-to-end kernel and so needs the
    product F_1 F_2 every step)."""
    keras.utils.set_random_seed(0)
    return {name: CNN_VARIANTS[name](build) for name in variants}


def benchmark_kernel(rng, shape, condition):
    """N(0, 0.01) entries, or (with `condition`) singular values log-spaced from that Gaussian's
    largest, 0.1 (sqrt(a) + sqrt(b)), down by the factor `condition`, in random bases."""
    if condition is None:
        return rng.normal(scale=0.1, size=shape)
    rank = min(shape)
    left, _ = np.linalg.qr(rng.normal(size=(shape[0], rank)))
    right, _ = np.linalg.qr(rng.normal(size=(shape[1], rank)))
    values = 0.1 * (np.sqrt(shape[0]) + np.sqrt(shape[1])) * np.logspace(0, -np.log10(condition), rank)
    return (left * values) @ right.T


# ----------------------------------------------------------------------------- side by side


def tiny_cnn():
    """A small CNN (conv 3x3x8, pool, dense 16, dense 10) for the quick side-by-side run."""
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(16, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ],
        name="tiny_cnn",
    )


def _application(name, image_size, classes):
    def build():
        return getattr(keras.applications, name)(
            weights=None, input_shape=(image_size, image_size, 3), classes=classes, classifier_activation=None
        )

    return build


def side_by_side_model(name, image_size, classes):
    """(a function building the model, its input shape) for a side-by-side model name: "tutorial
    CNN", "tiny CNN", or a `keras.applications` model ("ResNet50", "MobileNetV2", ...) with
    `weights=None`, `image_size` square RGB inputs, `classes` logits."""
    if name == "tutorial CNN":
        return cnn, (28, 28, 1), 10
    if name == "tiny CNN":
        return tiny_cnn, (12, 12, 1), 10
    if not hasattr(keras.applications, name):
        raise ValueError(
            f"unknown side-by-side model {name!r}: 'tutorial CNN', 'tiny CNN' or a keras.applications name"
        )
    return _application(name, image_size, classes), (image_size, image_size, 3), classes
