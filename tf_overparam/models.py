"""`EndToEndModel`: a model whose kernels train by the end-to-end update rule (eq. 24), through the
`tf_overparam.optimizers.EndToEnd` optimizer wrapper."""

import keras

from tf_overparam import conversion
from tf_overparam._deprecation import deprecated_names
from tf_overparam._keras_compat import Functional, functional_init_arguments
from tf_overparam.linear_maps import linear_maps
from tf_overparam.optimizers import EndToEnd
from tf_overparam.validation import PACKAGE, check_depth, check_non_negative_float

__all__ = ["EndToEndModel", "FunctionalEndToEndModel"]

# Deprecated names: the whole-model conversion is `tf_overparam.conversion`.
__getattr__ = deprecated_names(
    __name__,
    {
        name: (f"tf_overparam.conversion.{name}", getattr(conversion, name))
        for name in ("ConversionReport", "collapse", "overparameterize")
    },
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class EndToEndModel(keras.Model):
    """A `keras.Model` whose kernels train as if they were balanced depth-`depth` chains.

    `compile` wraps the given optimizer in `tf_overparam.optimizers.EndToEnd(optimizer, depth,
    weight_decay)`, so the gradient G of every kernel W selected by the default rule (>= 2-D
    variables named "kernel": Dense and its subclasses, Conv kernels as matrices; not
    `OverparamDense` factors, see `is_preconditioned_by_default`) is replaced by
    `end_to_end_direction(W, G, depth) + weight_decay * depth * W`. With
    `keras.optimizers.SGD(eta)` each step is exactly eq. 24 (eq. 10 of the paper):

        W <- (1 - eta lambda N) W - eta sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}.

    That is what plain gradient descent on a balanced depth-N chain does to its end-to-end
    matrix, up to O(eta^2) per step. Other variables get their plain gradient and no weight
    decay. The training step is Keras' own, so mixed precision, metrics, `sample_weight`,
    `steps_per_execution` and `tf.distribute` strategies behave as with a plain `keras.Model`.
    For any other model class use the `EndToEnd` optimizer directly; this class is that, kept
    for its `depth`/`weight_decay` arguments.

    Args:
        depth: int >= 1, the emulated chain depth N; 1 is plain training.
        weight_decay: float >= 0, the per-factor weight decay lambda of eq. 11.

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = EndToEndModel(inputs, keras.layers.Dense(1)(inputs), depth=2)
    >>> model.compile(keras.optimizers.SGD(0.01), loss="mse")
    """

    def __new__(cls, *args, **kwargs):
        # Called with inputs and outputs, `EndToEndModel` returns its Functional form. Left to
        # Keras, the first functional use would rewrite the bases of `EndToEndModel` itself to
        # `Functional`, and every later subclass of it would fail in `super().__init__()`.
        if cls is EndToEndModel and functional_init_arguments(args, kwargs):
            cls = FunctionalEndToEndModel
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, depth=2, weight_decay=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth = check_depth(depth)
        self.weight_decay = check_non_negative_float(weight_decay, "weight_decay")

    def preconditioned_kernels(self):
        """The variables the update rule applies to: `EndToEnd`'s default rule, read from the
        model's layers (`tf_overparam.linear_maps.linear_maps`)."""
        maps = linear_maps(self)
        return [v for v in self.trainable_variables if v.path in maps]

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`, with `optimizer` wrapped in `EndToEnd(optimizer, depth, weight_decay)`
        (an `EndToEnd` given as it is, as when a saved model is loaded)."""
        optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, EndToEnd):
            optimizer = EndToEnd(optimizer, depth=self.depth, weight_decay=self.weight_decay, model=self)
        elif not optimizer.built:
            optimizer.select(self)
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        # Keras skips a custom `compile` on load; this one is safe to call (the saved optimizer
        # is the `EndToEnd` already), as `keras.Model.compile_from_config` would.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, weight_decay=self.weight_decay)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        depth, weight_decay = config.pop("depth", 2), config.pop("weight_decay", 0.0)
        model = super().from_config(config, custom_objects=custom_objects)
        model.depth, model.weight_decay = check_depth(depth), check_non_negative_float(weight_decay, "weight_decay")
        return model


@keras.saving.register_keras_serializable(package=PACKAGE)
class FunctionalEndToEndModel(EndToEndModel, Functional):
    """The Functional form of `EndToEndModel`: what `EndToEndModel(inputs, outputs, ...)` returns."""
