"""`OverparamDense`: a `Dense` layer whose kernel is a product of `depth` factor matrices."""

import keras
import tensorflow as tf
from keras import ops

from tf_overparam import initializers as chain_initializers
from tf_overparam.factorization import chain_product

PACKAGE = "tf_overparam"


def check_depth(depth):
    """Returns `depth` as an int >= 1, or raises a `ValueError` naming it."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`depth` must be an int >= 1, got {depth!r}.")
    return depth


def resolve_hidden_units(hidden_units, depth, units):
    """The list of depth - 1 hidden widths; `None` means `units` for every hidden layer."""
    if hidden_units is None:
        return [units] * (depth - 1)
    if isinstance(hidden_units, int) and not isinstance(hidden_units, bool):
        hidden_units = [hidden_units] * (depth - 1)
    hidden_units = list(hidden_units)
    if len(hidden_units) != depth - 1 or not all(
        isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden_units
    ):
        raise ValueError(
            "`hidden_units` must be a positive int or a list of depth - 1 = "
            f"{depth - 1} positive ints, got {hidden_units!r}."
        )
    return hidden_units


@keras.saving.register_keras_serializable(package=PACKAGE)
class OverparamDense(keras.layers.Layer):
    """A drop-in `Dense` whose kernel is the product of `depth` factors (eq. 10).

    `output = activation(inputs @ (F_1 F_2 ... F_N) + bias)`, with factor F_j of shape
    (n_{j-1}, n_j), n_0 = inputs and n_N = units. The layer computes the same family of
    functions as `Dense`; only the optimisation landscape changes (implicit acceleration,
    Arora, Cohen & Hazan 2018). Depth 1 is exactly a `Dense`.

    The factors stay float32 and their product is taken in float32 under a mixed-precision
    policy; it is cast to the compute dtype only for the final matmul.

    Args:
        units: positive int, the output width.
        depth: int >= 1, the number of factors N.
        hidden_units: positive int or list of depth - 1 positive ints, the hidden widths;
            default `units` for each (scalar hidden layers for a single output).
        activation: activation function, as for `Dense`.
        use_bias: bool, whether to add a bias.
        factor_initializer: initializer of the chain. A `ChainInitializer`
            (`tf_overparam.initializers.Identity`, `Balanced`) draws the whole chain; a plain
            Keras initializer draws each factor independently. Default `NearZero()`.
        bias_initializer: initializer of the bias.
        kernel_regularizer: regularizer applied to the end-to-end kernel, as `Dense` applies it
            to its kernel (so the penalty, and `to_dense`, see the same function).
        factor_regularizer: regularizer applied to each factor separately: `L2(lambda / 2)`
            on every factor is the per-factor weight decay lambda of eq. 11.
        bias_regularizer, activity_regularizer, bias_constraint: as for `Dense`.
        **kwargs: base `Layer` arguments (name, dtype, ...).

    Example:

    >>> layer = OverparamDense(1, depth=3)
    >>> layer(keras.ops.ones((2, 5))).shape
    (2, 1)
    >>> [tuple(f.shape) for f in layer.factors]
    [(5, 1), (1, 1), (1, 1)]
    """

    def __init__(
        self,
        units,
        depth=2,
        hidden_units=None,
        activation=None,
        use_bias=True,
        factor_initializer="near_zero",
        bias_initializer="zeros",
        kernel_regularizer=None,
        factor_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units <= 0:
            raise ValueError(f"`units` must be a positive int, got {units!r}.")
        self.units = units
        self.depth = check_depth(depth)
        self.hidden_units = resolve_hidden_units(hidden_units, depth, units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.factor_initializer = chain_initializers.get(factor_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.factor_regularizer = keras.regularizers.get(factor_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError("The last dimension of the inputs to `OverparamDense` must be known.")
        widths = [input_dim, *self.hidden_units, self.units]
        shapes = list(zip(widths[:-1], widths[1:]))
        chain = []

        def initial_value(j, dtype):
            # The whole chain is drawn at once, by the first factor's initializer, and kept for
            # the others. Keras runs initializers eagerly when it creates the variables, and
            # also inside a traced call that only infers shapes (a subclassed model's first
            # call builds its layers there): a draw made in a graph is not kept.
            values = chain or chain_initializers.initialize_chain(
                self.factor_initializer, shapes, dtype=self.variable_dtype
            )
            if not chain and tf.executing_eagerly():
                chain.extend(values)
            return ops.cast(values[j], dtype)

        self.factors = [
            self.add_weight(
                name=f"factor_{j + 1}",
                shape=shape,
                initializer=lambda shape, dtype, j=j: initial_value(j, dtype),
                regularizer=self.factor_regularizer,
                autocast=False,
            )
            for j, shape in enumerate(shapes)
        ]
        self.bias = (
            self.add_weight(
                name="bias",
                shape=(self.units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    @property
    def kernel(self):
        """The end-to-end kernel F_1 ... F_N, shaped like `Dense.kernel` (inputs, units)."""
        return chain_product([ops.convert_to_tensor(f) for f in self.factors])

    def call(self, inputs):
        outputs = ops.matmul(inputs, ops.cast(self.kernel, self.compute_dtype))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs

    def _get_own_losses(self):
        # The end-to-end penalty is computed from the current factors whenever losses are
        # collected, as Dense computes its kernel penalty (`add_loss` in `call` would be missing
        # before the first call and leave a traced tensor behind after `fit`).
        losses = super()._get_own_losses()
        if self.kernel_regularizer is not None and self.built:
            losses.append(self.kernel_regularizer(self.kernel))
        return losses

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def to_dense(self):
        """A `keras.layers.Dense` computing the same function (kernel = end-to-end kernel)."""
        dense = keras.layers.Dense.from_config(dense_config(self.get_config()))
        dense.build((None, self.factors[0].shape[0]))
        # Copies, not the layer's own arrays: JAX's fit donates (frees) a model's buffers.
        dense.kernel.assign(ops.copy(ops.cast(self.kernel, dense.kernel.dtype)))
        if self.use_bias:
            dense.bias.assign(ops.copy(self.bias))
        return dense

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "depth": self.depth,
                "hidden_units": list(self.hidden_units),
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "factor_initializer": keras.initializers.serialize(self.factor_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "factor_regularizer": keras.regularizers.serialize(self.factor_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            }
        )
        return config


_CHAIN_ONLY_KEYS = ("depth", "hidden_units", "factor_initializer", "factor_regularizer")


def dense_config(overparam_config):
    """The `Dense` config of the same function as an `OverparamDense` config."""
    config = {k: v for k, v in overparam_config.items() if k not in _CHAIN_ONLY_KEYS}
    config["kernel_initializer"] = "zeros"
    return config


def overparam_config(dense_config, depth, hidden_units=None, factor_initializer="near_zero"):
    """The `OverparamDense` config replacing a `Dense` config (kernel constraint dropped)."""
    config = {
        k: v
        for k, v in dense_config.items()
        if k not in ("kernel_initializer", "kernel_constraint", "lora_rank", "lora_alpha", "quantization_config")
    }
    config.update(
        depth=depth,
        hidden_units=hidden_units,
        factor_initializer=keras.initializers.serialize(chain_initializers.get(factor_initializer)),
    )
    return config
