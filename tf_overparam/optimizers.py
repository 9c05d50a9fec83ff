"""`EndToEnd`: the end-to-end update rule (eq. 24 of docs/equations.md) as a wrapper around any
Keras optimizer, for any model."""

import fnmatch
import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from tf_overparam import backend
from tf_overparam.chain import check_depth
from tf_overparam.layers import registry
from tf_overparam.preconditioning import (
    Preconditioner,
    apply_preconditioner,
    compute_preconditioner,
    end_to_end_direction,
)

# Variables whose name is one of these are never preconditioned by the default rule, whatever
# their shape: they are factors of a chain trained as such (LoRA's B A) or not a single
# linear map of the inputs (a recurrent kernel acts at every time step).
_DEFAULT_NAME = "kernel"


def is_preconditioned_by_default(variable):
    """The default selection rule of `EndToEnd` and `EndToEndModel`.

    A trainable variable is preconditioned when it has at least 2 dimensions and its name (the
    last component of its path) is exactly "kernel": the kernels of `Dense` and its subclasses,
    2-D `EinsumDense` kernels, and convolution kernels (`Conv1D/2D/3D`, treated as the matrix
    (prod(shape[:-1]), shape[-1]): a `Conv2D` kernel (kh, kw, cin, cout) is the
    (kh kw cin, cout) matrix that maps an input patch to the output channels), and the input
    kernels of recurrent cells (their stacked gates). Not selected: `recurrent_kernel`s (applied
    at every time step, not one linear map), `depthwise_kernel`s, LoRA's `lora_kernel_a/b` (a
    depth-2 chain of their own; LoRA freezes the `kernel` itself, so a LoRA `Dense` is trained
    as LoRA), biases, and the `factor_j` variables of `OverparamDense` (the chain itself).
    For any other choice pass `variables=` patterns.
    """
    name = getattr(variable, "path", variable.name).split("/")[-1]
    return len(variable.shape) >= 2 and name == _DEFAULT_NAME


def precondition_kernel_gradient(kernel, grad, depth, weight_decay=0.0, preconditioner=None):
    """The eq. 24 direction of one kernel plus the paper's decay, `weight_decay * depth * W`.

    The one function that turns a kernel's gradient into the end-to-end update; `EndToEnd`
    (and through it `EndToEndModel`) calls it. A kernel of more than 2 dimensions is taken as
    the matrix (prod(shape[:-1]), shape[-1]). With `preconditioner` (a `Preconditioner` of
    that matrix, possibly of an earlier kernel), it is applied instead of computing P(W).
    """
    kernel = ops.convert_to_tensor(kernel)
    shape = tuple(kernel.shape)
    grad_matrix = registry.kernel_matrix(ops.convert_to_tensor(grad))
    if preconditioner is not None:
        direction = apply_preconditioner(preconditioner, grad_matrix)
    else:
        direction = end_to_end_direction(registry.kernel_matrix(kernel), grad_matrix, depth)
    direction = ops.reshape(direction, shape)
    if weight_decay:
        direction = direction + (weight_decay * depth) * ops.cast(kernel, direction.dtype)
    return direction


def _matrix_shape(shape):
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return (rows, cols) if rows >= cols else (cols, rows)


def _check_weight_decay(weight_decay):
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be a float >= 0, got {weight_decay!r}.")
    return float(weight_decay)


@keras.saving.register_keras_serializable(package="tf_overparam")
class EndToEnd(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer so that selected kernels follow the end-to-end rule (eq. 24).

    Before delegating to `optimizer`, the gradient G of each selected kernel W is replaced by

        sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N} + weight_decay * N * W,

    so that with `keras.optimizers.SGD(eta)` each step is exactly eq. 24 (eq. 10 of the paper),
    what gradient descent on a balanced depth-N chain does to its end-to-end matrix:

        W <- (1 - eta lambda N) W - eta sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}.

    `weight_decay` is the paper's per-factor lambda (eq. 11), entering the gradient as above.
    It is not Keras' decoupled `weight_decay`, which stays an option of the inner optimizer
    (and acts on the kernel directly, after the preconditioning). Other variables get their
    plain gradient. An adaptive inner optimizer (Adam, ...) treats the preconditioned gradient
    as the gradient; that is not the same as running it on the deep chain.

    Which variables: by default `is_preconditioned_by_default` (trainable variables with >= 2
    dimensions named "kernel": Dense, EinsumDense, Conv and recurrent input kernels; never
    recurrent kernels, LoRA factors or `OverparamDense` factors). `variables=` takes
    `fnmatch` patterns matched against variable paths instead (e.g. `["dense*/kernel"]`);
    they are saved in the config, so the selection survives `.keras` save and load. The
    selection is resolved when the optimizer is built; a pattern matching nothing, or a model
    with nothing to precondition, raises a `ValueError`. A selected kernel that is exactly zero
    when the optimizer is built is a fixed point of eq. 24: a warning names it.

    Inner optimizer options: `clipnorm`, `clipvalue`, `global_clipnorm`, `use_ema`, Keras'
    `weight_decay` and `gradient_accumulation_steps` act as usual, on the preconditioned
    gradients (the direction is linear in G, so accumulating directions is the direction of
    the accumulated gradient). Under mixed precision Keras wraps this optimizer in a
    `LossScaleOptimizer`, which unscales the gradients before they reach it. Under a
    `tf.distribute` strategy each replica preconditions its own gradient (linear, so the sum
    is right) and adds its share, 1/replicas, of the decay term. With
    `MultiWorkerMirroredStrategy`, Keras 3's own `fit` fails before the first step
    (keras-team/keras#20585; the same error with a plain SGD, Keras 3.15): use a custom training
    loop (`strategy.run` of a step calling `optimizer.apply`), which matches a single worker.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap (or its name / config).
        depth: int >= 1, the emulated chain depth N; 1 is the inner optimizer unchanged.
        weight_decay: float >= 0, the per-factor weight decay lambda of the paper.
        refresh_every: None (exact: P(W) of the current kernel at every step; at depth 2 a
            kernel with at least 256 columns gets it from a Newton-Schulz iteration where that
            converges, see `tf_overparam.preconditioning`), or an int
            k >= 1: amortised, Shampoo-style. P(W) is computed at steps 0, k, 2k, ... (counting
            calls of `apply`) and kept, eigenbasis and eigenvalues, for the next k steps, so a
            step in between applies P(W_r) of the last refresh r to the new gradient G_t:
            four matmuls with G, no eigendecomposition. k = 1 is the exact rule.
        variables: None (the default rule) or a list of `fnmatch` patterns on variable paths.
        name: the optimizer's name.
    """

    def __init__(self, optimizer, depth=2, weight_decay=0.0, refresh_every=None, variables=None, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                f"`EndToEnd` takes no optimizer options of its own ({', '.join(sorted(kwargs))}): set them on the "
                "inner `optimizer`, where they act on the preconditioned gradients."
            )
        super().__init__(learning_rate=0.0, name=name)
        optimizer = keras.optimizers.get(optimizer)
        if isinstance(optimizer, (EndToEnd, keras.optimizers.LossScaleOptimizer)):
            raise ValueError(
                f"`optimizer` must be a plain Keras optimizer, got {type(optimizer).__name__}: wrap the optimizer "
                "itself (mixed precision wraps `EndToEnd` in a `LossScaleOptimizer` by itself)."
            )
        self.inner_optimizer = optimizer
        self.depth = check_depth(depth)
        self.weight_decay = _check_weight_decay(weight_decay)
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, numbers.Integral) or refresh_every < 1
        ):
            raise ValueError(f"`refresh_every` must be None or an int >= 1, got {refresh_every!r}.")
        self.refresh_every = None if refresh_every is None else int(refresh_every)
        if isinstance(variables, str):
            variables = [variables]
        if variables is not None and (not variables or not all(isinstance(p, str) for p in variables)):
            raise ValueError(f"`variables` must be None or a non-empty list of path patterns (str), got {variables!r}.")
        self.variable_patterns = None if variables is None else list(variables)

    # --- selection --------------------------------------------------------------------------

    def _selects(self, variable):
        if self.variable_patterns is None:
            return is_preconditioned_by_default(variable)
        return len(variable.shape) >= 2 and any(fnmatch.fnmatchcase(variable.path, p) for p in self.variable_patterns)

    def build(self, var_list):
        var_list = list(var_list)
        selected = [self._selects(v) for v in var_list]
        if self.variable_patterns is not None:
            for pattern in self.variable_patterns:
                if not any(fnmatch.fnmatchcase(v.path, pattern) for v in var_list):
                    raise ValueError(
                        f"`variables` pattern {pattern!r} of `EndToEnd` matches no trainable variable; paths are "
                        f"{[v.path for v in var_list]}."
                    )
        elif not any(selected):
            raise ValueError(
                "`EndToEnd` found no variable to precondition: the default rule takes kernels (>= 2-D variables "
                "named 'kernel', as in Dense and Conv layers; OverparamDense factors are trained as deep chains). "
                "Pass `variables=` path patterns to choose others."
            )
        self._warn_about_zero_kernels([v for v, s in zip(var_list, selected) if s])
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._selected = selected
        self._preconditioners = [None] * len(var_list)
        if self.refresh_every is not None and self.depth > 1:
            self._refresh_counter = self.add_variable(
                (), dtype="int", initializer="zeros", aggregation="only_first_replica", name="refresh_counter"
            )
            for index, (variable, chosen) in enumerate(zip(var_list, selected)):
                if chosen:
                    self._preconditioners[index] = self._preconditioner_slots(variable)

    def _preconditioner_slots(self, variable):
        rows, cols = _matrix_shape(tuple(variable.shape))
        dtype = "float64" if keras.backend.standardize_dtype(variable.dtype) == "float64" else "float32"
        shapes = Preconditioner((rows, cols), (cols, cols), (1, cols), (self.depth - 1, 2, cols))
        return Preconditioner(
            *(
                self.add_variable(
                    shape,
                    dtype=dtype,
                    initializer="zeros",
                    aggregation="only_first_replica",
                    name=f"{variable.path.replace('/', '_')}_{field}",
                )
                for shape, field in zip(shapes, Preconditioner._fields)
            )
        )

    @staticmethod
    def _warn_about_zero_kernels(kernels):
        for kernel in kernels:
            value = backend.current_value(kernel)
            if value is not None and not np.any(value):
                warnings.warn(
                    f"EndToEnd: the kernel {kernel.path!r} is exactly zero, a fixed point of the end-to-end rule "
                    "(eq. 24): it will not train. Initialise it with non-zero values.",
                    stacklevel=3,
                )

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    # --- the step ---------------------------------------------------------------------------

    def _refresh(self, kernels):
        """Assigns P(W) of the current kernels to their slots at steps 0, k, 2k, ...; in between
        the slots keep their values. The branch only selects values: assigning inside it would
        be a cross-replica synchronisation inside control flow, which tf.distribute refuses."""
        slots = [slot for index, _ in kernels for slot in self._preconditioners[index]]

        def computed():
            values = []
            for _, kernel in kernels:
                values.extend(compute_preconditioner(registry.kernel_matrix(ops.convert_to_tensor(kernel)), self.depth))
            return values

        refresh = ops.equal(self._refresh_counter % self.refresh_every, 0)
        for slot, value in zip(slots, ops.cond(refresh, computed, lambda: [ops.convert_to_tensor(s) for s in slots])):
            slot.assign(value)
        self._refresh_counter.assign_add(1)

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError("`EndToEnd.apply` needs `trainable_variables` before the optimizer is built.")
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        indices = [self._get_variable_index(v) for v in trainable_variables]
        if self.refresh_every is not None and self.depth > 1:
            self._refresh(
                [(i, k) for i, k, g in zip(indices, trainable_variables, grads) if self._selected[i] and g is not None]
            )
        decay = self.weight_decay / backend.replicas_in_sync()
        for position, (index, kernel, grad) in enumerate(zip(indices, trainable_variables, grads)):
            if grad is None or not self._selected[index] or (self.depth == 1 and not decay):
                continue
            slots = self._preconditioners[index]
            preconditioner = None if slots is None else Preconditioner(*(ops.convert_to_tensor(s) for s in slots))
            grads[position] = ops.cast(
                precondition_kernel_gradient(kernel, grad, self.depth, decay, preconditioner), grad.dtype
            )
        self.inner_optimizer.apply(grads, trainable_variables)

    # --- delegation -------------------------------------------------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if hasattr(self, "inner_optimizer"):  # the base class sets a placeholder first
            self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "depth": self.depth,
            "weight_decay": self.weight_decay,
            "refresh_every": self.refresh_every,
            "variables": self.variable_patterns,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, **config)
