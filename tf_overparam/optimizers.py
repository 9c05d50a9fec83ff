"""`EndToEnd`: the end-to-end update rule (eq. 24 of docs/equations.md) as a wrapper around any
Keras optimizer, for any model."""

import warnings
import weakref

import keras
import numpy as np
from keras import ops

from tf_overparam import backend
from tf_overparam.kernel_groups import grouped_directions, grouped_preconditioners
from tf_overparam.linear_maps import (
    LinearMap,
    is_preconditioned_by_default,
    linear_maps,
    select_by_patterns,
    shape_map,
)
from tf_overparam.preconditioning import apply_preconditioner
from tf_overparam.refresh import KeptPreconditioners
from tf_overparam.validation import (
    PACKAGE,
    check_depth,
    check_method,
    check_non_negative_float,
    check_positive_int,
)

__all__ = ["EndToEnd", "is_preconditioned_by_default", "precondition_kernel_gradient"]


def precondition_kernel_gradient(kernel, grad, depth, weight_decay=0.0, preconditioner=None, linear_map=None):
    """The eq. 24 direction of one kernel plus the paper's decay, `weight_decay * depth * W`.

    The kernel is read as `linear_map` (a `tf_overparam.linear_maps.LinearMap`; by default
    (prod(shape[:-1]), shape[-1])). With `preconditioner` (a `Preconditioner` of that matrix,
    oriented tall, possibly of an earlier kernel), it is applied instead of computing P(W).
    """
    kernel = ops.convert_to_tensor(kernel)
    linear_map = shape_map(tuple(kernel.shape)) if linear_map is None else linear_map
    if preconditioner is not None:
        direction = linear_map.from_matrix(apply_preconditioner(preconditioner, linear_map.to_matrix(grad)))
    else:
        direction = grouped_directions([kernel], [grad], [linear_map], depth)[0]
    if weight_decay:
        direction = direction + (weight_decay * depth) * ops.cast(kernel, direction.dtype)
    return direction


@keras.saving.register_keras_serializable(package=PACKAGE)
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

    Which variables, and as which matrices. Pass `model=` (or call `select(model)`): each kernel
    is then read as its layer's linear map (`tf_overparam.linear_maps`): `Dense` and convolution
    kernels as (inputs, outputs) matrices, a grouped convolution as its blocks, an
    `EinsumDense` kernel (`MultiHeadAttention`'s) from its equation, and depthwise kernels left
    out. The resolved maps are saved in the config, so they survive `.keras` save and load.
    Without a model the optimizer sees variables only: it selects by name
    (`is_preconditioned_by_default`) and reads each kernel as (prod(shape[:-1]), shape[-1]),
    right for `Dense` and `Conv` kernels but not for depthwise kernels (Keras names them
    "kernel" too) or multi-axis `EinsumDense` kernels; it warns once when it reads a kernel of
    more than 2 dimensions that way. `EndToEndModel` passes itself.

    `variables=` takes `fnmatch` patterns instead of the default rule. A pattern matches a
    variable's path or any tail of it after a "/", so paths can be written relative to the
    model: `EndToEnd(SGD(0.1), variables=["dense*/kernel"])` selects the `Dense` kernels of
    `keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])`,
    whose paths are "sequential/dense/kernel" and "sequential/dense_1/kernel". A pattern
    matching nothing, or a model with nothing to precondition, raises a `ValueError` when the
    optimizer is built. A selected kernel that is exactly zero then is a fixed point of eq. 24:
    a warning names it.

    Cost. Kernels whose matrices (oriented tall) share a shape are computed in one batched call
    per step (`tf_overparam.kernel_groups`). With `refresh_every=k` each kernel refreshes its
    preconditioner once every k steps, staggered: the i-th selected kernel (in the order of the
    model's trainable variables) at the steps t with t mod k = i mod k, and every kernel at
    step 0, so that after the first step no step refreshes them all. At depth 2, with k >= 2,
    the refresh of a large kernel (`preconditioning.NEWTON_SCHULZ_MIN_COLUMNS` columns or more
    under `method="auto"`) takes Newton-Schulz on every device, spread over the next steps of
    the kernel's window, a few steps of the iteration in each, and is applied from the step it
    completes (`tf_overparam.refresh`), so no step after the first pays a whole refresh of a
    large kernel. What is computed in one step (exact steps, other refreshes, step 0) takes
    Newton-Schulz under "auto" only on an accelerator
    (`preconditioning.auto_tries_newton_schulz`), the eigh on a CPU.

    Inner optimizer options: `clipnorm`, `clipvalue`, `global_clipnorm`, `use_ema`, Keras'
    `weight_decay` and `gradient_accumulation_steps` act as usual, on the preconditioned
    gradients (the direction is linear in G, so accumulating directions is the direction of
    the accumulated gradient). Under mixed precision Keras wraps this optimizer in a
    `LossScaleOptimizer`, which unscales the gradients before they reach it.

    Distribution. Under `keras.distribution.DataParallel` (JAX) the variables are replicated
    and the gradients reduced before `apply`, so the step is one device's step (tested on two
    host devices). `ModelParallel` is not tested: the step is plain `keras.ops`, so
    the compiler gathers a sharded kernel where its Gram matrix and eigendecomposition need it. Under a `tf.distribute`
    strategy each replica preconditions its own gradient (linear, so the sum is right) and adds
    its share, 1/replicas, of the decay term; P(W) of the replicas' common W (or, with
    `refresh_every`, the refresh) is computed once per step for all local replicas
    (`backend.once_per_step`), at the cost of one synchronisation. With
    `MultiWorkerMirroredStrategy`, Keras 3's own `fit` fails before the first step
    (keras-team/keras#20585; the same error with a plain SGD, Keras 3.15): use a custom training
    loop (`strategy.run` of a step calling `optimizer.apply`), which matches a single worker.

    Args:
        optimizer: the `keras.optimizers.Optimizer` instance to wrap (or its name / config).
        depth: int >= 1, the emulated chain depth N; 1 is the inner optimizer unchanged.
        weight_decay: float >= 0, the per-factor weight decay lambda of the paper.
        refresh_every: None (exact: P(W) of the current kernel at every step), or an int k >= 1:
            amortised, Shampoo-style. Each kernel's P(W) (eigenbasis and eigenvalues) is
            computed once every k steps (staggered, see above; counting calls of `apply`) and
            kept, so a step in between applies P(W_r) of the kernel's last refresh r to the new
            gradient G_t: matmuls with G, no eigendecomposition. A spread refresh (see above)
            applies P(W_r) from `tf_overparam.refresh.spread_steps(k)` steps after r on, for k
            steps. k = 1 is the exact rule.
        variables: None (the default rule) or a list of `fnmatch` patterns on variable paths.
        method: "auto", "eigh" or "newton_schulz" (depth <= 2): how a step computes the direction
            and a refresh the preconditioner (`tf_overparam.preconditioning`; spread refreshes
            above).
        model: the model whose kernels are preconditioned, read through its layers (see above).
            Not saved; the maps read from it are.
        linear_maps: {variable path: `LinearMap` config}, the maps read from a model, as
            `get_config` saves them (set through `model=` otherwise).
        name: the optimizer's name.
    """

    def __init__(
        self,
        optimizer,
        depth=2,
        weight_decay=0.0,
        refresh_every=None,
        variables=None,
        method="auto",
        model=None,
        name=None,
        linear_maps=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"`EndToEnd` takes no optimizer options of its own ({', '.join(sorted(kwargs))}): set them on the "
                "inner `optimizer`, where they act on the preconditioned gradients."
            )
        super().__init__(learning_rate=0.0, name=name)
        if isinstance(optimizer, type):
            raise ValueError(
                f"`optimizer` must be an optimizer instance, got the class {optimizer.__name__}: pass "
                f"`{optimizer.__name__}(...)`, e.g. `EndToEnd(keras.optimizers.SGD(0.01))`."
            )
        optimizer = keras.optimizers.get(optimizer)
        if isinstance(optimizer, (EndToEnd, keras.optimizers.LossScaleOptimizer)):
            raise ValueError(
                f"`optimizer` must be a plain Keras optimizer, got {type(optimizer).__name__}: wrap the optimizer "
                "itself (mixed precision wraps `EndToEnd` in a `LossScaleOptimizer` by itself)."
            )
        self.inner_optimizer = optimizer
        self.depth = check_depth(depth)
        self.weight_decay = check_non_negative_float(weight_decay, "weight_decay")
        self.refresh_every = None if refresh_every is None else check_positive_int(refresh_every, "refresh_every")
        self.method = check_method(method, self.depth)
        if isinstance(variables, str):
            variables = [variables]
        if variables is not None and (not variables or not all(isinstance(p, str) for p in variables)):
            raise ValueError(f"`variables` must be None or a non-empty list of path patterns (str), got {variables!r}.")
        self.variable_patterns = None if variables is None else list(variables)
        # {path: LinearMap} read from a model (given here by a saved config), else None.
        self.linear_maps = (
            None if linear_maps is None else {p: LinearMap.from_config(c) for p, c in linear_maps.items()}
        )
        self._model = None
        if model is not None:
            self.select(model)

    # --- selection --------------------------------------------------------------------------

    def select(self, model):
        """Reads the selected kernels and their linear maps from `model`'s layers (when the
        optimizer is built, so the model may still be unbuilt now). Returns the optimizer."""
        if not isinstance(model, keras.layers.Layer):
            raise ValueError(f"`model` must be a Keras model or layer, got {type(model).__name__}.")
        if self.built:
            raise ValueError("`EndToEnd.select(model)` must come before the optimizer is built.")
        self._model = weakref.ref(model)  # a weak reference: not tracked, saved, or kept alive
        return self

    def _resolve(self, var_list):
        """(selected, maps) for `var_list`: the maps read from the model where there is one."""
        model = None if self._model is None else self._model()
        if model is not None:
            self.linear_maps = linear_maps(model, self.variable_patterns)
        if self.linear_maps is not None:
            paths = {v.path for v in var_list}
            missing = [p for p in self.linear_maps if p not in paths]
            if missing:
                raise ValueError(f"`EndToEnd` was given kernels {missing} that are not among the variables {paths}.")
            return [v.path in self.linear_maps for v in var_list], [self.linear_maps.get(v.path) for v in var_list]
        if self.variable_patterns is not None:
            selected = select_by_patterns(var_list, self.variable_patterns)
        else:
            selected = [is_preconditioned_by_default(v) for v in var_list]
        read_by_shape = [v.path for v, s in zip(var_list, selected) if s and len(v.shape) > 2]
        if read_by_shape:
            warnings.warn(
                f"EndToEnd reads the kernels {read_by_shape} by their shape alone, as (prod(shape[:-1]), "
                "shape[-1]) matrices: right for Conv kernels, not for depthwise or multi-axis EinsumDense ones. "
                "Pass `model=` to read each as its layer's linear map.",
                stacklevel=4,
            )
        return selected, [shape_map(tuple(v.shape)) if s else None for v, s in zip(var_list, selected)]

    def build(self, var_list):
        var_list = list(var_list)
        selected, maps = self._resolve(var_list)
        if not any(selected):
            raise ValueError(
                "`EndToEnd` found no variable to precondition: the default rule takes kernels (>= 2-D variables "
                "named 'kernel', as in Dense and Conv layers; OverparamDense factors are trained as deep chains). "
                "Pass `variables=` path patterns to choose others."
            )
        self._warn_about_zero_kernels([v for v, s in zip(var_list, selected) if s])
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        self._selected, self._maps = selected, maps
        self._kept = None  # the kept preconditioners of the amortised rule and their refreshes
        if self.refresh_every is not None and self.depth > 1:
            chosen = [(index, var_list[index]) for index, s in enumerate(selected) if s]
            self._kept = KeptPreconditioners(
                self, chosen, {index: maps[index] for index, _ in chosen}, self.depth, self.method, self.refresh_every
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
        work = [
            (position, index, kernel, grad)
            for position, (index, kernel, grad) in enumerate(zip(indices, trainable_variables, grads))
            if grad is not None and self._selected[index]
        ]
        decay = self.weight_decay / backend.replicas_in_sync()
        if self.depth > 1 and work:
            kernels = [kernel for _, _, kernel, _ in work]
            maps = [self._maps[index] for _, index, _, _ in work]
            work_grads = [grad for _, _, _, grad in work]
            # Under a tf.distribute strategy every replica holds the same kernels: P(W) (or the
            # refresh of the kept P) is computed once for all, and each replica applies it to its
            # own gradient.
            if self.refresh_every is not None:
                backend.once_per_step(lambda: self._kept.refresh([(index, kernel) for _, index, kernel, _ in work]))
                preconditioners = self._kept.preconditioners([index for _, index, _, _ in work])
            elif backend.replicas_in_sync() > 1:
                preconditioners = backend.once_per_step(
                    lambda: grouped_preconditioners(kernels, maps, self.depth, method=self.method)
                )
            else:
                preconditioners = None
            directions = grouped_directions(
                kernels, work_grads, maps, self.depth, method=self.method, preconditioners=preconditioners
            )
        else:
            directions = [grad for _, _, _, grad in work]
        for (position, _, kernel, grad), direction in zip(work, directions):
            if decay:
                direction = direction + (decay * self.depth) * ops.cast(kernel, direction.dtype)
            grads[position] = ops.cast(direction, grad.dtype)
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
        model = None if self._model is None else self._model()
        if self.linear_maps is None and model is not None and model.built:
            self.linear_maps = linear_maps(model, self.variable_patterns)
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "depth": self.depth,
            "weight_decay": self.weight_decay,
            "refresh_every": self.refresh_every,
            "variables": self.variable_patterns,
            "method": self.method,
            "linear_maps": None
            if self.linear_maps is None
            else {path: m.get_config() for path, m in self.linear_maps.items()},
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, **config)
