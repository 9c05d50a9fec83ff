"""`EndToEndModel`: trains single-matrix `Dense` layers by the end-to-end update rule (eq. 24)."""

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

from tf_overparam.layers import check_depth
from tf_overparam.preconditioning import end_to_end_direction


@keras.saving.register_keras_serializable(package="tf_overparam")
class EndToEndModel(keras.Model):
    """A `keras.Model` whose training step emulates depth-`depth` chains in its `Dense` layers.

    In `train_step` the gradient G of every 2-D kernel W of the model's `Dense` layers is
    replaced by `end_to_end_direction(W, G, depth) + weight_decay * depth * W`, so that with
    `keras.optimizers.SGD(eta)` each step is exactly eq. 24 (eq. 10 of the paper):

        W <- (1 - eta lambda N) W - eta sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}.

    That is what plain gradient descent on a balanced depth-N chain does to its end-to-end
    matrix, up to O(eta^2) per step. Other variables (biases, other layers) get their plain
    gradient and no weight decay. Another optimizer (Adam, AdaGrad, ...) receives the
    preconditioned gradient as if it were the gradient: its own scaling then acts on top of
    the preconditioner, which is not the same as running it on the deep chain.

    The step otherwise is Keras' own: `optimizer.scale_loss` (mixed precision), metrics,
    `sample_weight`, `steps_per_execution` and `tf.distribute` strategies behave as with a
    plain `keras.Model` (the direction is linear in G, so per-replica directions sum to the
    direction of the summed gradient). Use it like `keras.Model`, as a Functional model or as
    a subclass.

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
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be a float >= 0, got {weight_decay!r}.")
        self.weight_decay = float(weight_decay)

    def preconditioned_kernels(self):
        """The kernel variables the update rule applies to: the 2-D kernels of `Dense` layers."""
        return [
            layer.kernel
            for layer in self._flatten_layers(include_self=False)
            if type(layer) is keras.layers.Dense and len(layer.kernel.shape) == 2
        ]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            batch_size = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            self._loss_tracker.update_state(unscale_loss_for_distribution(loss), sample_weight=batch_size)
            scaled_loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(self._precondition(gradients, variables, self.optimizer.scale_loss(tf.ones_like(loss))), variables))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _precondition(self, gradients, variables, loss_scale):
        kernels = {id(kernel) for kernel in self.preconditioned_kernels()}
        if not kernels:
            raise ValueError(
                "`EndToEndModel` found no 2-D kernel of a `keras.layers.Dense` layer to apply the "
                "end-to-end update to; build the model from Dense layers (OverparamDense layers "
                "are trained as deep chains and are not preconditioned)."
            )
        # Each replica's gradient carries 1/replicas of the loss; the decay term must too.
        decay_scale = self.weight_decay * self.depth / self.distribute_strategy.num_replicas_in_sync
        preconditioned = []
        for gradient, variable in zip(gradients, variables):
            if gradient is not None and id(variable) in kernels:
                kernel = tf.convert_to_tensor(variable)
                gradient = end_to_end_direction(kernel, gradient, self.depth)
                if decay_scale:
                    gradient += tf.cast(decay_scale * loss_scale, kernel.dtype) * kernel
            preconditioned.append(gradient)
        return preconditioned

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, weight_decay=self.weight_decay)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        depth, weight_decay = config.pop("depth", 2), config.pop("weight_decay", 0.0)
        model = super().from_config(config, custom_objects=custom_objects)
        model.depth, model.weight_decay = check_depth(depth), float(weight_decay)
        return model


@keras.saving.register_keras_serializable(package="tf_overparam")
class FunctionalEndToEndModel(EndToEndModel, Functional):
    """The Functional form of `EndToEndModel`: what `EndToEndModel(inputs, outputs, ...)` returns."""
