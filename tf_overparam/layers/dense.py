"""`OverparamDense`: a `Dense` layer whose kernel is a product of `depth` factor matrices."""

import math

import keras
from keras import ops

from tf_overparam.chain import (
    apply_chain,
    chain_shapes,
    chain_widths,
    inputs_first_threshold,
)
from tf_overparam.layers import registry
from tf_overparam.layers.base import OverparamLayer, cheaper_order
from tf_overparam.validation import PACKAGE, check_hidden_widths, check_positive_int


@registry.register
@keras.saving.register_keras_serializable(package=PACKAGE)
class OverparamDense(OverparamLayer):
    """A drop-in `Dense` whose kernel is the product of `depth` factors (eq. 10).

    `output = activation(inputs @ (F_1 F_2 ... F_N) + bias)`, with factor F_j of shape
    (n_{j-1}, n_j), n_0 = inputs and n_N = units. The layer computes the same family of
    functions as `Dense`; only the optimisation landscape changes (implicit acceleration,
    Arora, Cohen & Hazan 2018). Depth 1 is exactly a `Dense`.

    **Order of the products.** With R rows of inputs (the product of all input dims but the
    last), applying the factors to the inputs one at a time, ((x F_1) F_2) ... F_N, costs
    R * sum_j n_{j-1} n_j multiply-adds; forming the end-to-end kernel first costs the chain
    product (`chain.chain_product_flops`) plus R * n_0 n_N. The layer takes the cheaper order:
    inputs first when R is below `chain.inputs_first_threshold(widths)`. For two factors that
    threshold is n_0 n_1 n_2 / (n_0 n_1 + n_1 n_2 - n_0 n_2), e.g. 3136 rows for a
    3136x512x512 chain; it is infinite when the hidden widths are narrow (inputs first always
    wins). When R is unknown while tracing (a TF graph of `model.fit` has batch `None`), the
    choice is made at run time by `keras.ops.cond`, which runs only the branch it picks (a
    fixed rule for the unknown case would pay the worse order at one end of the batch sizes);
    on JAX shapes are always known. The end-to-end kernel is formed only when something needs
    it: `kernel`, `to_dense`, the `kernel_regularizer` penalty, the diagnostics.

    The factors stay float32 under a mixed-precision policy; the layer casts them to the
    compute dtype for the products with the inputs (the end-to-end kernel is formed in float32
    and cast), so outputs match `inputs @ (F_1 ... F_N)` within the compute dtype's rounding.

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

    plain_class = keras.layers.Dense
    chain_only_keys = ("depth", "hidden_units", "factor_initializer", "factor_regularizer")

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
        super().__init__(
            depth=depth,
            activation=activation,
            use_bias=use_bias,
            factor_initializer=factor_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            factor_regularizer=factor_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.units = check_positive_int(units, "units")
        self.hidden_units = check_hidden_widths(hidden_units, self.depth, self.units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    @property
    def output_units(self):
        return self.units

    def _input_dim(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError("The last dimension of the inputs to `OverparamDense` must be known.")
        return int(input_dim)

    def factor_shapes(self, input_shape):
        return chain_shapes(self._input_dim(input_shape), self.hidden_units, self.units)

    def kernel_shape(self, input_shape):
        return (self._input_dim(input_shape), self.units)

    def build(self, input_shape):
        super().build(input_shape)
        input_dim = self._input_dim(input_shape)
        self._threshold = inputs_first_threshold(chain_widths(input_dim, self.hidden_units, self.units))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})

    def apply_chain(self, inputs, factors):
        if len(factors) == 1:
            return ops.matmul(inputs, factors[0])

        def kernel_first():
            # The product is formed from the float32 factors and cast once: one rounding.
            return ops.matmul(inputs, ops.cast(self.kernel, factors[0].dtype))

        leading = inputs.shape[:-1]
        rows = math.prod(leading) if all(n is not None for n in leading) else ops.size(inputs) // inputs.shape[-1]
        return cheaper_order(rows, self._threshold, lambda: apply_chain(inputs, factors), kernel_first)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def to_dense(self):
        """A `keras.layers.Dense` computing the same function (kernel = end-to-end kernel)."""
        return self.to_plain()

    @classmethod
    def overparam_config(cls, plain_config, depth=2, hidden_units=None, factor_initializer="near_zero"):
        return super().overparam_config(
            plain_config, depth=depth, factor_initializer=factor_initializer, hidden_units=hidden_units
        )

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units, "hidden_units": list(self.hidden_units)})
        return config


def dense_config(overparam_config):
    """The `Dense` config of the same function as an `OverparamDense` config
    (`OverparamDense.plain_config`)."""
    return OverparamDense.plain_config(overparam_config)


def overparam_config(dense_config, depth, hidden_units=None, factor_initializer="near_zero"):
    """The `OverparamDense` config replacing a `Dense` config (`OverparamDense.overparam_config`)."""
    return OverparamDense.overparam_config(
        dense_config, depth=depth, hidden_units=hidden_units, factor_initializer=factor_initializer
    )
