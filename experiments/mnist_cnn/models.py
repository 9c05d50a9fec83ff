"""The MNIST experiment's models: the TensorFlow tutorial CNN, its depth-2 twins and the
end-to-end arm, with the tutorial's optimizer and loss."""

import warnings

import keras

import tf_overparam
from experiments.mnist_cnn.protocol import ARMS, END_TO_END_DEPTH, END_TO_END_VARIABLES, EXPANDABLE, stream_seed
from experiments.mnist_cnn.recording import BatchCrossEntropy
from tf_overparam.optimizers import EndToEnd


def build_cnn(config):
    """The tutorial CNN as a Keras Sequential model with logits output (seed `config.seed`)."""

    def normal(stream):
        return keras.initializers.TruncatedNormal(stddev=config.init_stddev, seed=stream_seed(config.seed, stream))

    l2 = keras.regularizers.L2(config.l2 / 2.0) if config.l2 else None  # l2=0: no penalty at all
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(
                32,
                5,
                padding="same",
                activation="relu",
                kernel_initializer=normal("conv1"),
                bias_initializer="zeros",
                name="conv1",
            ),
            keras.layers.MaxPooling2D(2, padding="same", name="pool1"),
            keras.layers.Conv2D(
                64,
                5,
                padding="same",
                activation="relu",
                kernel_initializer=normal("conv2"),
                bias_initializer=keras.initializers.Constant(0.1),
                name="conv2",
            ),
            keras.layers.MaxPooling2D(2, padding="same", name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(
                512,
                activation="relu",
                kernel_initializer=normal("fc1"),
                bias_initializer=keras.initializers.Constant(0.1),
                kernel_regularizer=l2,
                bias_regularizer=l2,
                name="fc1",
            ),
            keras.layers.Dropout(config.dropout, seed=stream_seed(config.seed, "dropout"), name="dropout"),
            keras.layers.Dense(
                10,
                kernel_initializer=normal("fc2"),
                bias_initializer=keras.initializers.Constant(0.1),
                kernel_regularizer=l2,
                bias_regularizer=l2,
                name="fc2",
            ),
        ],
        name="plain",
    )


def build_twin(plain, config, factor_init="tutorial", regularize="end_to_end"):
    """The depth-2 overparameterized copy of `plain` (the layers not expanded and biases copied).

    factor_init: "tutorial" (each factor truncated normal std 0.1, a seed per layer) or
        "balanced" (a balanced factorisation of the plain kernels: the same function).
    regularize: "end_to_end" (the plain layer's L2 on the end-to-end kernel: the same
        objective) or "factors" (that L2 on each factor instead).
    """
    expanded = tuple(getattr(keras.layers, EXPANDABLE[kind]) for kind in config.overparameterize)
    factors_seed = stream_seed(config.seed, "factors")

    def layer_kwargs(layer):  # factor j of layer i: seed + 2 i + j, no seed used twice
        if factor_init != "tutorial":
            return {}
        return {
            "factor_initializer": keras.initializers.TruncatedNormal(
                stddev=config.init_stddev, seed=factors_seed + 2 * plain.layers.index(layer)
            )
        }

    with warnings.catch_warnings():  # the layers not expanded (convolutions by default) stay, as meant
        warnings.filterwarnings("ignore", message="overparameterize left these layers unchanged")
        twin = tf_overparam.overparameterize(
            plain,
            depth=2,
            preserve_function=factor_init == "balanced",
            seed=stream_seed(config.seed, "balanced"),
            layers=expanded,
            layer_kwargs=layer_kwargs,
        )
    if regularize == "factors":
        # Same weights, the penalty moved from the end-to-end kernel to each factor.
        model_config = twin.get_config()
        for layer in model_config["layers"]:
            if "factor_regularizer" in layer["config"]:
                layer["config"]["factor_regularizer"] = layer["config"]["kernel_regularizer"]
                layer["config"]["kernel_regularizer"] = None
        rebuilt = keras.Sequential.from_config(model_config)
        rebuilt.set_weights(twin.get_weights())
        twin = rebuilt
    twin.name = "overparameterized"
    return twin


def build_arm(arm, config):
    """The (uncompiled) model of `arm` at seed `config.seed`."""
    plain = build_cnn(config)
    kind = ARMS[arm]
    model = build_twin(plain, config, factor_init=kind[1], regularize=kind[2]) if isinstance(kind, tuple) else plain
    model.name = arm
    return model


def make_optimizer(config, steps_per_epoch, arm="plain"):
    rate = keras.optimizers.schedules.ExponentialDecay(
        config.resolved_learning_rate, decay_steps=steps_per_epoch, decay_rate=config.decay_rate, staircase=True
    )
    if config.optimizer == "momentum":
        optimizer = keras.optimizers.SGD(rate, momentum=config.momentum)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(rate)
    else:
        optimizer = keras.optimizers.Adam(rate)
    if ARMS[arm] == "end_to_end":
        return EndToEnd(optimizer, depth=END_TO_END_DEPTH, variables=list(END_TO_END_VARIABLES))
    return optimizer


def compile_model(model, config, steps_per_epoch, arm="plain"):
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch, arm),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", BatchCrossEntropy()],
    )
