"""Kernels read as their layer's linear map: which trainable variables the end-to-end rule
(eq. 24) preconditions, and as which matrices.

The theory sees a layer's kernel as one matrix W (or a batch of independent ones): the linear
map from the layer's inputs to its outputs. Which matrix that is depends on the layer, not on
the variable's shape alone, and an optimizer sees only variables; `linear_maps(model)` reads
the layers. Per layer:

- `Dense` (and any 2-D kernel): as it is, (inputs, units).
- `EinsumDense`: from its equation, the kernel axes shared with the input only are the rows,
  those shared with the output only the columns, those in all three a batch of independent
  maps. `MultiHeadAttention`'s query kernel (d_model, heads, head_dim) is the
  (d_model, heads head_dim) map; its output kernel (heads, head_dim, d_model) the
  (heads head_dim, d_model) one.
- `Conv1D/2D/3D` and their transposes: (kh kw cin, cout), the map of an input patch to the
  output channels; with `groups` > 1, a batch of `groups` such maps (the block-diagonal map).
- Depthwise kernels (`DepthwiseConv1D/2D`, and `SeparableConv`'s `depthwise_kernel`): a batch
  of one (kh kw, depth_multiplier) map per input channel. Not selected by default.
- Any other layer's kernel: (prod(shape[:-1]), shape[-1]), as in `kernel_matrix`.

Eq. 24 of a block-diagonal map with a block-diagonal gradient is block-diagonal, block by block
eq. 24: a batch of maps is exact, not an approximation.
"""

import fnmatch
import math
import re

import keras
from keras import ops

# Variables named this are kernels for the default rule; any other name (`recurrent_kernel`,
# LoRA's `lora_kernel_a/b`, `OverparamDense`'s `factor_j`, biases) is not.
_DEFAULT_NAME = "kernel"
_DEPTHWISE_CLASSES = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE_CLASSES = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_CONV_CLASSES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


class LinearMap:
    """How a kernel of shape `shape` reads as a batch of (rows, cols) matrices.

    With `groups` > 1 the last axis is first split into (groups, shape[-1] // groups); the axes
    below index the kernel after that split. The matrix form is the kernel transposed to
    (batch axes, row axes, column axes) and reshaped to (batch, rows, cols), batch being the
    product of the batch axes' sizes (1 without them).

    Args:
        shape: the kernel's shape.
        rows: the axes whose product is the matrix's rows (the map's inputs).
        cols: the axes whose product is its columns (the map's outputs).
        batch: the axes of independent maps.
        groups: int >= 1, how many blocks the last axis splits into (grouped convolutions).
    """

    def __init__(self, shape, rows, cols, batch=(), groups=1):
        self.shape, self.groups = tuple(int(s) for s in shape), int(groups)
        self.rows, self.cols, self.batch = tuple(rows), tuple(cols), tuple(batch)
        split = self._split_shape()
        if sorted(self.batch + self.rows + self.cols) != list(range(len(split))):
            raise ValueError(f"The axes of a `LinearMap` must cover the kernel's axes {split} once each, got {self}.")
        self.matrix_shape = tuple(math.prod(split[a] for a in axes) for axes in (self.batch, self.rows, self.cols))

    def _split_shape(self):
        if self.groups == 1:
            return self.shape
        return self.shape[:-1] + (self.groups, self.shape[-1] // self.groups)

    def to_matrix(self, kernel):
        """`kernel` (or its gradient) as the (batch, rows, cols) tensor of its maps."""
        kernel = ops.reshape(kernel, self._split_shape())
        permutation = self.batch + self.rows + self.cols
        if permutation != tuple(range(len(permutation))):
            kernel = ops.transpose(kernel, permutation)
        return ops.reshape(kernel, self.matrix_shape)

    def from_matrix(self, matrix):
        """The inverse of `to_matrix`: a (batch, rows, cols) tensor back in the kernel's shape."""
        split = self._split_shape()
        permutation = self.batch + self.rows + self.cols
        matrix = ops.reshape(matrix, tuple(split[a] for a in permutation))
        if permutation != tuple(range(len(permutation))):
            matrix = ops.transpose(matrix, [permutation.index(a) for a in range(len(split))])
        return ops.reshape(matrix, self.shape)

    def get_config(self):
        return {"shape": self.shape, "rows": self.rows, "cols": self.cols, "batch": self.batch, "groups": self.groups}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, LinearMap) and self.get_config() == other.get_config()

    def __repr__(self):
        return "LinearMap({})".format(", ".join(f"{k}={v}" for k, v in self.get_config().items()))


def shape_map(shape):
    """The map read from the shape alone: (prod(shape[:-1]), shape[-1]), right for `Dense` and
    convolution kernels, what `EndToEnd` uses for a variable whose layer it was not shown."""
    return LinearMap(shape, rows=range(len(shape) - 1), cols=(len(shape) - 1,))


def _einsum_map(equation, shape):
    """The map of an `EinsumDense` kernel from the layer's equation, or None when a kernel axis
    appears in neither the input nor the output (summed away: no linear map of this form)."""
    match = re.fullmatch(r"\s*([\w.]*)\s*,\s*(\w+)\s*->\s*([\w.]*)\s*", equation)
    if match is None or len(match.group(2)) != len(shape):
        return None
    inputs, kernel, outputs = match.groups()
    rows, cols, batch = [], [], []
    for axis, letter in enumerate(kernel):
        in_input, in_output = letter in inputs, letter in outputs
        if not (in_input or in_output):
            return None
        (batch if in_input and in_output else rows if in_input else cols).append(axis)
    return LinearMap(shape, rows, cols, batch)


def _is_depthwise(layer, name):
    return (isinstance(layer, _DEPTHWISE_CLASSES) and name == "kernel") or (
        isinstance(layer, _SEPARABLE_CLASSES) and name == "depthwise_kernel"
    )


def layer_map(layer, variable):
    """The `LinearMap` of `variable`, a >= 2-D weight of `layer` (None: not a linear map)."""
    shape, name = tuple(variable.shape), variable.path.split("/")[-1]
    if _is_depthwise(layer, name):  # (..., cin, multiplier): one map per input channel
        n = len(shape)
        return LinearMap(shape, rows=range(n - 2), cols=(n - 1,), batch=(n - 2,))
    if isinstance(layer, keras.layers.EinsumDense) and name == "kernel":
        return _einsum_map(layer.equation, shape)
    groups = layer.groups if isinstance(layer, _CONV_CLASSES) and name == "kernel" else 1
    if groups > 1:
        n = len(shape)  # (..., cin / groups, groups, cout / groups)
        return LinearMap(shape, rows=range(n - 1), cols=(n,), batch=(n - 1,), groups=groups)
    return shape_map(shape)


def is_preconditioned_by_default(variable, layer=None):
    """The default selection rule of `EndToEnd`, `EndToEndModel` and `linear_maps`.

    A trainable variable is preconditioned when it has at least 2 dimensions, its name (the
    last component of its path) is exactly "kernel", and, where its `layer` is given, it is not
    a depthwise kernel: the kernels of `Dense` and its subclasses, of `EinsumDense`, of
    convolutions (`Conv1D/2D/3D` and transposes), and the input kernels of recurrent cells (their
    stacked gates). Not selected: `recurrent_kernel`s (applied at every time step, not one
    linear map), depthwise kernels (one small map per channel), LoRA's `lora_kernel_a/b` (a
    depth-2 chain of their own; LoRA freezes the `kernel` itself), biases, and the `factor_j`
    variables of `OverparamDense` (the chain itself).

    Without `layer` the rule cannot tell a `DepthwiseConv2D` kernel (Keras names it "kernel")
    from a convolution kernel: `linear_maps(model)` gives it the layers.
    """
    name = getattr(variable, "path", variable.name).split("/")[-1]
    if len(variable.shape) < 2 or name != _DEFAULT_NAME:
        return False
    return layer is None or not _is_depthwise(layer, name)


def path_matches(path, pattern):
    """Whether the `fnmatch` `pattern` matches the variable path `path` or a tail of it that
    starts after a "/": "dense*/kernel" matches "dense_1/kernel" (a Functional model's path) and
    "sequential/dense_1/kernel" (a Sequential one's, which begins with the model's name)."""
    parts = path.split("/")
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def select_by_patterns(variables, patterns):
    """Which of `variables` (>= 2-D) the `patterns` select; a `ValueError` names a pattern that
    matches no variable."""
    for pattern in patterns:
        if not any(path_matches(v.path, pattern) for v in variables):
            raise ValueError(
                f"`variables` pattern {pattern!r} matches no trainable variable; paths are {[v.path for v in variables]}."
            )
    return [len(v.shape) >= 2 and any(path_matches(v.path, p) for p in patterns) for v in variables]


def _sublayers(layer):
    """The layers `layer` holds: a model's `layers`, otherwise the layers among its attributes
    (directly or in lists, tuples and dicts), as Keras' own tracking finds them."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    found = []
    for value in vars(layer).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found.extend(item for item in items if isinstance(item, keras.layers.Layer))
    return found


def _layers_by_path(model):
    by_path, seen, stack = {}, set(), [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if getattr(layer, "path", None):
            by_path.setdefault(layer.path, layer)
        stack.extend(_sublayers(layer))
    return by_path


def linear_maps(model, variables=None):
    """The trainable variables of `model` that the end-to-end rule preconditions, each with the
    `LinearMap` it reads as (see the module docstring), as a dict {variable path: LinearMap} in
    `model.trainable_variables` order.

    Args:
        model: a built `keras.Model` (or layer).
        variables: None for the default rule (`is_preconditioned_by_default`, depthwise kernels
            excluded), or a list of `fnmatch` patterns (`path_matches`) choosing >= 2-D
            variables; a depthwise kernel chosen so is read as one map per channel.

    Raises:
        ValueError: a pattern matches nothing, or selects a kernel that is not a linear map of
            the layer's inputs (an `EinsumDense` kernel axis summed away).
    """
    trainable = list(model.trainable_variables)
    by_path = _layers_by_path(model)
    layers = [by_path.get(v.path.rpartition("/")[0]) for v in trainable]
    if variables is None:
        selected = [is_preconditioned_by_default(v, layer) for v, layer in zip(trainable, layers)]
    else:
        selected = select_by_patterns(trainable, variables)
    maps = {}
    for variable, layer, chosen in zip(trainable, layers, selected):
        if not chosen:
            continue
        linear_map = shape_map(tuple(variable.shape)) if layer is None else layer_map(layer, variable)
        if linear_map is None:
            if variables is not None:
                raise ValueError(
                    f"`variables` selects {variable.path!r}, which is not a linear map of its layer's inputs "
                    f"(equation {getattr(layer, 'equation', None)!r})."
                )
            continue
        maps[variable.path] = linear_map
    return maps
