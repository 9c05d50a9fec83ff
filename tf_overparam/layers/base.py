"""`OverparamLayer`: the base of every layer whose kernel is a product of factors."""

import math
import warnings

import keras
from keras import ops

from tf_overparam import backend
from tf_overparam import initializers as chain_initializers
from tf_overparam._keras_compat import OwnLossesMixin
from tf_overparam.chain import chain_product
from tf_overparam.validation import check_depth

_quantize_warned = False  # `OverparamLayer.quantize` warns once per process


def cheaper_order(count, threshold, below, above):
    """`below()` while `count` is under `threshold`, else `above()`: two computations of the
    same outputs in a different order (the chain applied to the inputs, or the folded kernel),
    chosen by the cost threshold of `tf_overparam.chain.inputs_first_threshold`.

    `count` (rows, or output positions) is an int when the shapes are known, compared now; a
    traced integer scalar when they are not (a TF graph's unknown batch), compared at run time
    with `keras.ops.cond`. For an integer count, count < threshold <=> count < ceil(threshold).
    """
    if math.isinf(threshold):
        return below()
    if isinstance(count, int):
        return below() if count < threshold else above()
    return ops.cond(ops.less(count, min(math.ceil(threshold), 2**31 - 1)), below, above)


class OverparamLayer(OwnLossesMixin, keras.layers.Layer):
    """Base class of a layer whose kernel is the product of `depth` factors (eq. 10).

    The kernel of the plain layer (`plain_class`), viewed as a matrix (n_0, n_N), is the
    end-to-end product F_1 F_2 ... F_N of factors F_j of shape (n_{j-1}, n_j): for `Dense` the
    kernel itself, for a convolution kernel (kh, kw, cin, cout) the matrix (kh*kw*cin, cout).
    The base owns what every such layer shares:

    - the factor variables `factors` (float32 under mixed precision, `autocast=False`) and
      their chain initialisation (the whole chain is drawn by the first factor's initializer);
    - the bias, activation, regularizers and constraint, as the plain layer has them;
    - `kernel`: the end-to-end kernel in the plain layer's shape, computed on demand, with a
      clear error before `build`;
    - the end-to-end penalty `kernel_regularizer` (collected with the layer's own losses, as the
      plain layer collects its kernel penalty) and the per-factor `factor_regularizer`;
    - `to_plain()`: the plain layer computing the same function (used by `collapse`);
    - the shared part of `get_config`.

    A subclass author implements:

    - `plain_class` (class attribute): the plain Keras layer it overparameterizes;
    - `chain_only_keys` (class attribute): its config keys the plain layer does not have;
    - `hidden_argument` (class attribute): the name of its hidden-width argument
      ("hidden_units"; a convolution might say "hidden_filters"), which `overparameterize`
      fills from its own `hidden_units`; the attribute of that name holds the depth - 1
      resolved widths (`tf_overparam.chain.resolve_hidden_units`) from construction on;
    - `factor_shapes(input_shape)`: the factor shapes, input side first (2-D for a matrix
      chain, see `tf_overparam.chain.chain_shapes`);
    - `kernel_shape(input_shape)`: the plain layer's kernel shape; the matrix view is
      (prod(kernel_shape[:-1]), kernel_shape[-1]);
    - `output_units`: the bias size (units or filters);
    - `apply_chain(inputs, factors)`: the pre-bias outputs from the inputs and the factors
      (already cast to the compute dtype);
    - `compute_output_shape(input_shape)`, as the plain layer;
    - `get_config()`: `super().get_config()` plus its own keys;
    - if the defaults do not fit, the classmethods `plain_config(config)` (default: drop
      `chain_only_keys`, zero kernel initializer) and `overparam_config(plain_config, depth,
      factor_initializer, **chain_kwargs)` (default: drop the kernel initializer, constraint,
      LoRA and quantization keys, add the chain's): the config translation both ways, which
      the registry uses;
    - optionally `end_to_end_kernel(factors)` when the kernel is not the reshaped matrix
      product (a spatial chain), `draw_chain(shapes)` for non-matrix factors, and `build`
      (call `super().build(input_shape)`, then set `input_spec`).

    Register the subclass with `tf_overparam.layers.registry.register` so that
    `overparameterize`, `collapse`, the callbacks and the preconditioning rule know it.
    """

    plain_class = None
    hidden_argument = "hidden_units"
    chain_only_keys = ("depth", "factor_initializer", "factor_regularizer")

    def __init__(
        self,
        depth=2,
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
        self.depth = check_depth(depth)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.factor_initializer = chain_initializers.get(factor_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.factor_regularizer = keras.regularizers.get(factor_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.factors = []
        self.bias = None

    # --- what a subclass supplies -------------------------------------------------------

    @property
    def output_units(self):
        raise NotImplementedError

    def factor_shapes(self, input_shape):
        raise NotImplementedError

    def kernel_shape(self, input_shape):
        raise NotImplementedError

    def apply_chain(self, inputs, factors):
        raise NotImplementedError

    @classmethod
    def plain_config(cls, config):
        """The plain layer's config of the same function as this layer's `config`."""
        config = {k: v for k, v in config.items() if k not in cls.chain_only_keys}
        config["kernel_initializer"] = "zeros"
        return config

    @classmethod
    def overparam_config(cls, plain_config, depth=2, factor_initializer="near_zero", **chain_kwargs):
        """This layer's config replacing a plain layer's config (kernel constraint dropped)."""
        dropped = ("kernel_initializer", "kernel_constraint", "lora_rank", "lora_alpha", "quantization_config")
        config = {k: v for k, v in plain_config.items() if k not in dropped}
        config.update(
            depth=depth,
            factor_initializer=keras.initializers.serialize(chain_initializers.get(factor_initializer)),
            **chain_kwargs,
        )
        return config

    def draw_chain(self, shapes):
        """Initial values of the factors (a list, input side first)."""
        return chain_initializers.initialize_chain(self.factor_initializer, shapes, dtype=self.variable_dtype)

    def end_to_end_kernel(self, factors):
        """The kernel of the plain layer from the factors: the matrix product, reshaped."""
        return ops.reshape(chain_product(factors), self._kernel_shape)

    # --- shared machinery ---------------------------------------------------------------

    def build(self, input_shape):
        self._built_input_shape = tuple(input_shape)
        shapes = [tuple(int(n) for n in shape) for shape in self.factor_shapes(input_shape)]
        self._kernel_shape = tuple(int(n) for n in self.kernel_shape(input_shape))
        chain = []

        def initial_value(j, dtype):
            # The whole chain is drawn at once, by the first factor's initializer, and kept for
            # the others. Keras runs initializers eagerly when it creates the variables, and
            # also inside a traced call that only infers shapes (a subclassed model's first
            # call builds its layers there): a draw made in a graph is not kept.
            values = chain or self.draw_chain(shapes)
            if not chain and backend.is_concrete(values[0]):
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
                shape=(self.output_units,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            if self.use_bias
            else None
        )

    def _check_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` of layer {self.name!r} does not exist before the layer is built; "
                "call the layer on inputs (or `layer.build(input_shape)`) first."
            )

    @property
    def kernel(self):
        """The end-to-end kernel, shaped like the plain layer's kernel (computed on demand)."""
        self._check_built("kernel")
        return self.end_to_end_kernel([ops.convert_to_tensor(f) for f in self.factors])

    @property
    def kernel_matrix(self):
        """The end-to-end kernel as the matrix (n_0, n_N) the chain multiplies out to."""
        kernel = self.kernel
        return ops.reshape(kernel, (-1, kernel.shape[-1]))

    def call(self, inputs):
        factors = [ops.cast(f, self.compute_dtype) for f in self.factors]
        outputs = self.apply_chain(inputs, factors)
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs

    def extra_own_losses(self):
        # The end-to-end penalty is computed from the current factors whenever losses are
        # collected, as Dense computes its kernel penalty (`add_loss` in `call` would be missing
        # before the first call and leave a traced tensor behind after `fit`).
        if self.kernel_regularizer is not None and self.built:
            return [self.kernel_regularizer(self.kernel)]
        return []

    def quantize(self, mode=None, type_check=True, config=None):
        """Leaves the chain in float, with one warning per process: `keras.Model.quantize` calls
        this for every layer, and a chain's factors have no quantized form. Quantize the
        `collapse`d model instead, whose kernels are the end-to-end kernels."""
        global _quantize_warned
        if not _quantize_warned:
            _quantize_warned = True
            warnings.warn(
                f"Overparameterized layers ({type(self).__name__} {self.name!r} and any others) are not quantized and "
                "stay in float: call `tf_overparam.collapse(model)` first and quantize the collapsed model, whose "
                "kernels are the end-to-end kernels.",
                UserWarning,
                stacklevel=2,
            )

    def to_plain(self):
        """A `plain_class` layer computing the same function (kernel = end-to-end kernel)."""
        self._check_built("to_plain()")
        plain = self.plain_class.from_config(self.plain_config(self.get_config()))
        plain.build(self._built_input_shape)
        # Copies, not this layer's arrays: JAX's fit donates (frees) a model's buffers.
        plain.kernel.assign(ops.copy(ops.cast(self.kernel, plain.kernel.dtype)))
        if self.use_bias:
            plain.bias.assign(ops.copy(self.bias))
        return plain

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "depth": self.depth,
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
