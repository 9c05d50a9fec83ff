"""`OverparamConv2D`: a `Conv2D` whose kernel is a chain of factors, in two forms.

Channel chain (default). The kernel (kh, kw, cin, cout) viewed as the matrix (kh*kw*cin, cout)
is the product F_1 ... F_N of matrix factors: the paper's setting applied to a convolution, so
balancedness, eq. 14 and the end-to-end rule (eq. 24) hold for that matrix unchanged
(docs/equations.md).

Spatial chain (`kernel_sizes=(k_1, ..., k_N)`), as minyoungg/overparam and ExpandNets: a chain
of N convolutions with 4-D kernels (k_j, k_j, c_{j-1}, c_j), c_0 = cin, c_N = filters, whose
composition is one convolution with kernel size sum(k_j) - N + 1 (the full 2-D convolution of
the factors, contracting the hidden channels; `compose_kernels`).
"""

import math

import keras
from keras import ops

from tf_overparam import initializers as chain_initializers
from tf_overparam.chain import (
    apply_chain,
    chain_shapes,
    chain_widths,
    inputs_first_threshold,
)
from tf_overparam.layers import registry
from tf_overparam.layers.base import OverparamLayer, cheaper_order
from tf_overparam.layers.conv_arithmetic import compose_kernels, conv_output_size, int_pair, same_padding
from tf_overparam.validation import PACKAGE, check_hidden_widths, check_positive_int


@registry.register
@keras.saving.register_keras_serializable(package=PACKAGE)
class OverparamConv2D(OverparamLayer):
    """A drop-in `Conv2D` (channels_last, groups 1) whose kernel is a chain of `depth` factors.

    **Channel chain** (default, `kernel_sizes=None`): the kernel reshaped to the matrix
    (kh*kw*cin, filters) is F_1 F_2 ... F_N, F_1 of shape (kh*kw*cin, h_1), F_j of shape
    (h_{j-1}, h_j), h_j = `hidden_filters`. This is the paper's chain with n_0 = kh*kw*cin, so
    `Balanced` and `Identity` (matrix identity) initialisation, the balancedness diagnostics,
    eq. 14, the end-to-end rule (eq. 24) and `overparameterize(preserve_function=True)` apply.
    Every stride, padding and dilation of `Conv2D` is supported.

    **Spatial chain** (`kernel_sizes=(k_1, ..., k_N)`, each an int or a pair): N convolutions
    with kernels (*k_j, c_{j-1}, c_j), hidden channels c_j = `hidden_filters` (default
    `filters`), composing to one kernel of size sum(k_j) - N + 1, which must equal
    `kernel_size` (so `kernel_size` keeps its `Conv2D` meaning and `to_conv2d` its shape). The
    chain is run exactly as the folded convolution: the inputs are padded once with the folded
    kernel's padding ('valid': none; 'same': TF's rule for the folded size), the inner
    convolutions are 'valid' with stride 1, and only the last one has the stride; every
    convolution has the dilation. The depth is len(kernel_sizes). Supported initializers: any
    plain Keras initializer (each 4-D factor drawn independently; the default `NearZero`) and
    `tf_overparam.initializers.Identity(gain)`, which makes every factor a centred delta kernel
    gain * I at (k_j // 2, k_j // 2) (as DO-Conv; the fold is then gain^N times a delta, centred
    for odd sizes). Refused with a `ValueError`, as statements about matrix chains with no meaning
    for 4-D factors: `Balanced` initialisation (here), the `tf_overparam.diagnostics` of the chain
    (balancedness, spectra; `OverparamTensorBoard` skips the layer) and
    `overparameterize(preserve_function=True)`. The end-to-end rule (eq. 24) is not defined for
    it either.

    **Order of the products.** Both forms compute either the chain on the inputs or the folded
    kernel followed by one convolution, whichever costs fewer multiply-adds (the same rule as
    `OverparamDense`). Channel chain: with R = batch x output positions, the chain costs
    R * sum_j n_{j-1} n_j (F_1 as a convolution, F_2 ... F_N as matmuls over channels) against
    `chain.chain_product_flops` + R * n_0 n_N, so the chain runs while R <
    `chain.inputs_first_threshold(n_0, h_1, ..., filters)`. Spatial chain: the chain's per-image
    cost (each convolution over its own, larger, intermediate grid) against composing the
    kernels once plus the folded convolution per image. When the count is only known at run
    time (batch `None` in a TF graph), `keras.ops.cond` picks; when the spatial size of the
    inputs is unknown, the spatial chain uses the folded kernel (TF's own 'same').

    The factors stay float32 under mixed precision and are cast to the compute dtype.

    Args:
        filters: positive int, the output channels.
        kernel_size: int or pair, the kernel size of the (folded) convolution.
        strides: int or pair, as for `Conv2D`. Strides > 1 with dilation > 1 are refused, as
            `Conv2D` refuses them.
        padding: "valid" or "same".
        data_format: None or "channels_last" (only).
        dilation_rate: int or pair.
        groups: 1 (only).
        activation, use_bias, bias_initializer, bias_regularizer, activity_regularizer,
            bias_constraint: as for `Conv2D`.
        depth: int >= 1, the number of factors; default 2 for the channel chain and
            len(kernel_sizes) for the spatial chain (any other value is refused there).
        hidden_filters: positive int or list of depth - 1 of them; default `filters`.
        kernel_sizes: None (channel chain) or a sequence of ints or pairs (spatial chain).
        factor_initializer: as for `OverparamDense` (see above for the spatial chain).
        kernel_regularizer: regularizer of the end-to-end (folded) kernel, as `Conv2D`'s.
        factor_regularizer: regularizer of each factor.
        **kwargs: base `Layer` arguments (name, dtype, ...).

    Example:

    >>> layer = OverparamConv2D(4, 5, padding="same", kernel_sizes=(3, 3))
    >>> tuple(layer(keras.ops.ones((2, 8, 8, 3))).shape)
    (2, 8, 8, 4)
    >>> [tuple(f.shape) for f in layer.factors]
    [(3, 3, 3, 4), (3, 3, 4, 4)]
    >>> tuple(layer.kernel.shape)
    (5, 5, 3, 4)
    """

    plain_class = keras.layers.Conv2D
    hidden_argument = "hidden_filters"
    chain_only_keys = ("depth", "hidden_filters", "kernel_sizes", "factor_initializer", "factor_regularizer")

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        groups=1,
        activation=None,
        use_bias=True,
        depth=None,
        hidden_filters=None,
        kernel_sizes=None,
        factor_initializer="near_zero",
        bias_initializer="zeros",
        kernel_regularizer=None,
        factor_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        bias_constraint=None,
        **kwargs,
    ):
        kernel_sizes = None if kernel_sizes is None else self._check_kernel_sizes(kernel_sizes, depth)
        super().__init__(
            depth=(2 if kernel_sizes is None else len(kernel_sizes)) if depth is None else depth,
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
        self.filters = check_positive_int(filters, "filters")
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.strides = int_pair(strides, "strides")
        self.dilation_rate = int_pair(dilation_rate, "dilation_rate")
        self.padding = str(padding).lower()
        if self.padding not in ("valid", "same"):
            raise ValueError(f"`padding` must be 'valid' or 'same', got {padding!r}.")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                f"`strides` > 1 together with `dilation_rate` > 1 is not supported (as in Conv2D); "
                f"got strides={self.strides} and dilation_rate={self.dilation_rate}."
            )
        self.data_format = keras.config.image_data_format() if data_format is None else data_format
        if self.data_format != "channels_last":
            raise ValueError(
                f"`data_format` must be 'channels_last' (or None with that default), got {self.data_format!r}; "
                "transpose the inputs to channels_last."
            )
        if groups != 1:
            raise ValueError(f"`groups` must be 1 (grouped convolutions are not chained), got {groups!r}.")
        self.hidden_filters = check_hidden_widths(hidden_filters, self.depth, self.filters, name="hidden_filters")
        self.kernel_sizes = kernel_sizes
        if kernel_sizes is not None:
            folded = tuple(sum(k[axis] for k in kernel_sizes) - len(kernel_sizes) + 1 for axis in (0, 1))
            if folded != self.kernel_size:
                raise ValueError(
                    f"`kernel_sizes` {[list(k) for k in kernel_sizes]} fold to a {folded} kernel "
                    f"(sum(k) - N + 1 per axis), but `kernel_size` is {self.kernel_size}; make them agree."
                )
            if isinstance(self.factor_initializer, chain_initializers.ChainInitializer) and not isinstance(
                self.factor_initializer, chain_initializers.Identity
            ):
                raise ValueError(
                    f"`factor_initializer` {type(self.factor_initializer).__name__} draws matrix chains and has no "
                    "meaning for the 4-D factors of a spatial chain (`kernel_sizes`); use `Identity` (centred "
                    "delta kernels) or a plain Keras initializer."
                )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    @staticmethod
    def _check_kernel_sizes(kernel_sizes, depth):
        message = f"`kernel_sizes` must be a non-empty sequence of positive ints or pairs, got {kernel_sizes!r}."
        if isinstance(kernel_sizes, (str, bytes)) or not hasattr(kernel_sizes, "__len__") or not len(kernel_sizes):
            raise ValueError(message)
        try:
            sizes = tuple(int_pair(k, "kernel_sizes") for k in kernel_sizes)
        except ValueError:
            raise ValueError(message) from None
        if depth is not None and depth != len(sizes):
            raise ValueError(
                f"`depth` must be None or len(kernel_sizes) = {len(sizes)} for a spatial chain, got {depth!r}."
            )
        return sizes

    @property
    def spatial(self):
        """Whether this is a spatial chain (4-D factors) rather than a channel chain."""
        return self.kernel_sizes is not None

    @property
    def output_units(self):
        return self.filters

    def _input_channels(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"`OverparamConv2D` needs 4-D channels_last inputs with a known channel count, got shape {input_shape}."
            )
        return int(input_shape[-1])

    def kernel_shape(self, input_shape):
        return (*self.kernel_size, self._input_channels(input_shape), self.filters)

    def factor_shapes(self, input_shape):
        channels = self._input_channels(input_shape)
        if not self.spatial:
            return chain_shapes(self.kernel_size[0] * self.kernel_size[1] * channels, self.hidden_filters, self.filters)
        widths = chain_widths(channels, self.hidden_filters, self.filters)
        return [(*k, c_in, c_out) for k, c_in, c_out in zip(self.kernel_sizes, widths[:-1], widths[1:])]

    def draw_chain(self, shapes):
        if self.spatial and isinstance(self.factor_initializer, chain_initializers.Identity):
            return [self._delta_kernel(shape) for shape in shapes]
        return super().draw_chain(shapes)

    def _delta_kernel(self, shape):
        kh, kw, c_in, c_out = shape
        centre = ops.eye(kh * kw)[(kh // 2) * kw + kw // 2]  # one-hot over the taps
        identity = ops.multiply(self.factor_initializer.gain, ops.eye(c_in, c_out))
        delta = ops.reshape(centre, (kh, kw, 1, 1)) * identity
        return ops.cast(delta, self.variable_dtype)

    def end_to_end_kernel(self, factors):
        if not self.spatial:
            return super().end_to_end_kernel(factors)
        kernel = factors[0]
        for factor in factors[1:]:
            kernel = compose_kernels(kernel, factor)
        return kernel

    def build(self, input_shape):
        super().build(input_shape)
        channels = self._input_channels(input_shape)
        if not self.spatial:
            rows = self.kernel_size[0] * self.kernel_size[1] * channels
            widths = chain_widths(rows, self.hidden_filters, self.filters)
            self._threshold = inputs_first_threshold(widths)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def _plan_spatial(self, height, width, channels):
        """The padding of the chain and the image count below which it is cheaper than the fold,
        for inputs of this grid (the 'same' padding depends on it when strided)."""
        if height is None or width is None:
            return None  # unknown grid: the fold, with the backend's own 'same'
        sizes = [int(height), int(width)]
        padding = [(0, 0), (0, 0)]
        if self.padding == "same":
            padding = [
                same_padding(sizes[a], self.kernel_size[a], self.strides[a], self.dilation_rate[a]) for a in (0, 1)
            ]
        grid = [sizes[a] + sum(padding[a]) for a in (0, 1)]
        widths = chain_widths(channels, self.hidden_filters, self.filters)
        chain_cost = 0
        for j, k in enumerate(self.kernel_sizes):
            last = j == self.depth - 1
            grid = [
                conv_output_size(grid[a], k[a], self.strides[a] if last else 1, self.dilation_rate[a], "valid")
                for a in (0, 1)
            ]
            chain_cost += grid[0] * grid[1] * k[0] * k[1] * widths[j] * widths[j + 1]
        fold_cost = grid[0] * grid[1] * self.kernel_size[0] * self.kernel_size[1] * channels * self.filters
        compose_cost, folded = 0, self.kernel_sizes[0]
        for j, k in enumerate(self.kernel_sizes[1:], start=1):
            folded = (folded[0] + k[0] - 1, folded[1] + k[1] - 1)
            compose_cost += folded[0] * folded[1] * channels * k[0] * k[1] * widths[j] * widths[j + 1]
        extra = chain_cost - fold_cost
        threshold = math.inf if extra <= 0 else compose_cost / extra
        return ((0, 0), *padding, (0, 0)), threshold

    def _fold_then_convolve(self, inputs, factors):
        kernel = self.end_to_end_kernel(factors)
        return ops.conv(inputs, kernel, self.strides, self.padding, dilation_rate=self.dilation_rate)

    def apply_chain(self, inputs, factors):
        if len(factors) == 1:
            return self._fold_then_convolve(inputs, factors)
        if self.spatial:
            plan = self._plan_spatial(inputs.shape[1], inputs.shape[2], inputs.shape[3])
            if plan is None:
                return self._fold_then_convolve(inputs, factors)
            padding, threshold = plan

            def chain_first():
                outputs = ops.pad(inputs, padding)
                for j, factor in enumerate(factors):
                    strides = self.strides if j == len(factors) - 1 else 1
                    outputs = ops.conv(outputs, factor, strides, "valid", dilation_rate=self.dilation_rate)
                return outputs

            count = inputs.shape[0] if inputs.shape[0] is not None else ops.shape(inputs)[0]
            return cheaper_order(count, threshold, chain_first, lambda: self._fold_then_convolve(inputs, factors))

        first = ops.reshape(factors[0], (*self.kernel_size, inputs.shape[-1], factors[0].shape[-1]))

        def chain_first():
            outputs = ops.conv(inputs, first, self.strides, self.padding, dilation_rate=self.dilation_rate)
            return apply_chain(outputs, factors[1:])

        rows = self._output_rows(inputs)
        return cheaper_order(rows, self._threshold, chain_first, lambda: self._fold_then_convolve(inputs, factors))

    def _output_rows(self, inputs):
        """Batch x output positions, an int when the input shape is static, else a traced scalar."""
        static = inputs.shape[:3]
        shape = static if all(n is not None for n in static) else ops.shape(inputs)
        return shape[0] * self._output_size(shape[1], 0) * self._output_size(shape[2], 1)

    def _output_size(self, size, axis):
        """The output length along spatial axis 0 (height) or 1 (width)."""
        kernel, stride, dilation = self.kernel_size[axis], self.strides[axis], self.dilation_rate[axis]
        return conv_output_size(size, kernel, stride, dilation, self.padding)

    def compute_output_shape(self, input_shape):
        height, width = self._output_size(input_shape[1], 0), self._output_size(input_shape[2], 1)
        return (input_shape[0], height, width, self.filters)

    def to_conv2d(self):
        """A `keras.layers.Conv2D` computing the same function (kernel = the folded kernel)."""
        return self.to_plain()

    @classmethod
    def overparam_config(
        cls, plain_config, depth=2, hidden_filters=None, kernel_sizes=None, factor_initializer="near_zero"
    ):
        """The config replacing a `Conv2D` config. With `kernel_sizes` the depth is
        len(kernel_sizes) (a model-wide `depth` does not apply to a spatial chain)."""
        if kernel_sizes is not None:
            depth = len(cls._check_kernel_sizes(kernel_sizes, None))
        return super().overparam_config(
            plain_config,
            depth=depth,
            factor_initializer=factor_initializer,
            hidden_filters=hidden_filters,
            kernel_sizes=kernel_sizes,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "groups": 1,
                "hidden_filters": list(self.hidden_filters),
                "kernel_sizes": None if self.kernel_sizes is None else [list(k) for k in self.kernel_sizes],
            }
        )
        return config
