"""Whole-model conversion over the layer registry: plain layers to their overparameterized
layers (`overparameterize`) and back (`collapse`)."""

import concurrent.futures
import dataclasses
import warnings

import keras

from tf_overparam import initializers as chain_initializers
from tf_overparam._keras_compat import Functional
from tf_overparam.chain import balanced_chain
from tf_overparam.layers import registry
from tf_overparam.validation import check_depth

__all__ = ["ConversionReport", "collapse", "overparameterize"]


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What `overparameterize` did, layer by layer (attached to the new model as
    `model.conversion_report`).

    Attributes:
        converted: tuples (layer name, plain class name, overparameterized class name).
        left: tuples (layer name, class name, reason) for every layer with a `kernel` that was
            not converted (an `EinsumDense`, a `Conv1D`, a `Dense` subclass, a class not in
            `layers`, ...). Layers without a kernel (pooling, normalisation, ...) are copied
            and not listed.
    """

    converted: tuple
    left: tuple

    def __str__(self):
        lines = [f"converted {len(self.converted)} layer(s):"]
        lines += [f"  {name}: {plain} -> {overparam}" for name, plain, overparam in self.converted]
        lines.append(f"left {len(self.left)} layer(s) with a kernel unchanged:")
        lines += [f"  {name} ({cls}): {reason}" for name, cls, reason in self.left]
        return "\n".join(lines)


def overparameterize(
    model,
    depth=2,
    hidden_units=None,
    preserve_function=False,
    factor_initializer="near_zero",
    seed=None,
    layers=(keras.layers.Dense,),
    layer_kwargs=None,
):
    """A copy of a Sequential or Functional model with its plain layers made overparameterized.

    Every layer whose class is exactly one of `layers` (default `Dense`) becomes its registered
    overparameterized layer (`OverparamDense` for `Dense`). All other weights (convolutions,
    biases, ...) are copied. Each new chain is drawn from `factor_initializer`, or, with
    `preserve_function=True`, is a balanced factorisation of the old kernel (as a matrix), so
    that the new model computes exactly the same function (up to float rounding) and starts
    balanced.

    Nothing is skipped silently: the new model's `conversion_report` (a `ConversionReport`)
    lists the converted layers and every layer with a kernel that was left as it was, with the
    reason (a subclass of a plain class, which may compute something else, is left); when any
    was left, a `UserWarning` says so.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        depth: int >= 1, the chain depth of every converted layer.
        hidden_units: None (each layer's own output width), an int, or a list of depth - 1
            ints: the hidden widths (the argument named by the overparameterized class's
            `hidden_argument`, e.g. `hidden_units` of `OverparamDense`).
        preserve_function: bool; factor the existing kernels instead of drawing new ones.
        factor_initializer: chain initializer used when `preserve_function` is False.
        seed: int or None, seeds the hidden-space rotations of the balanced factorisation.
        layers: the plain layer classes to convert, each registered
            (`tf_overparam.layers.registry.plain_classes()`).
        layer_kwargs: None, or a function of the plain layer returning a dict of arguments of
            its overparameterized layer that override the ones above (e.g. `depth`,
            `kernel_sizes` of a convolution), or None to leave that layer as it is.

    Returns:
        A new, uncompiled `keras.Model`, with `conversion_report` set.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> deep = overparameterize(model, depth=2, preserve_function=True)
    >>> type(deep.layers[0]).__name__
    'OverparamDense'
    >>> deep.conversion_report.converted
    (('dense', 'Dense', 'OverparamDense'),)
    """
    depth = check_depth(depth)
    factor_initializer = chain_initializers.get(factor_initializer)
    layers = _check_layer_classes(layers)
    if layer_kwargs is not None and not callable(layer_kwargs):
        raise ValueError(f"`layer_kwargs` must be None or a function of the plain layer, got {layer_kwargs!r}.")
    converted, left = [], []

    def plan(layer):
        """(the new layer, None) for a layer to convert; (None, the reason) for one to copy."""
        reason = _not_converted_reason(layer, layers)
        if reason is None:
            kwargs = {} if layer_kwargs is None else layer_kwargs(layer)
            if kwargs is None:
                reason = "`layer_kwargs` returned None for it"
            elif not isinstance(kwargs, dict):
                raise ValueError(f"`layer_kwargs` must return a dict or None, got {kwargs!r} for {layer.name!r}.")
        if reason is not None:
            return None, reason
        overparam_class = registry.overparam_class_for(type(layer))
        chain_kwargs = {
            "depth": depth,
            # Preserved chains are assigned their balanced factors: a random draw would be wasted.
            "factor_initializer": "zeros" if preserve_function else factor_initializer,
            overparam_class.hidden_argument: hidden_units,
            **kwargs,
        }
        try:
            return registry.to_overparam(layer, **chain_kwargs), None
        except TypeError as error:  # an argument the overparameterized class does not take
            raise ValueError(
                f"`layer_kwargs` gave {overparam_class.__name__} arguments it does not take for layer "
                f"{layer.name!r} ({error}); return only arguments of {overparam_class.__name__}."
            ) from error

    def prepare(layer):
        plans[id(layer)] = new, _ = plan(layer)
        if preserve_function and new is not None:
            balanced[id(layer)] = _start_balanced(pool, layer, new, seed)

    def convert(layer):
        if id(layer) not in plans:
            prepare(layer)
        new, reason = plans.pop(id(layer))
        if reason is not None:
            if _has_kernel(layer):
                left.append((layer.name, type(layer).__name__, reason))
            return layer.__class__.from_config(layer.get_config())
        converted.append((layer.name, type(layer).__name__, type(new).__name__))
        return new

    def copy(old, new):
        if not registry.is_overparam(new):
            new.set_weights(old.get_weights())
            return
        if preserve_function:
            _assign_balanced(old, new, balanced.pop(id(old)))
        if old.use_bias:
            new.bias.assign(keras.ops.copy(old.bias))  # a copy: JAX's fit donates (frees) the old buffer

    # The balanced factors are NumPy/LAPACK work, which releases the GIL; `clone_model` is Python
    # work. With `preserve_function`, every layer is planned before the clone starts, so that all
    # decompositions run on a worker thread while the clone builds the model; `copy` waits for
    # each. Otherwise each layer is planned when the clone reaches it.
    plans, balanced = {}, {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="balanced_chain")
    try:
        new_model = _convert_model(model, convert, copy, prepare if preserve_function else None)
    finally:
        pool.shutdown(cancel_futures=True)
    report = ConversionReport(converted=tuple(converted), left=tuple(left))
    new_model.conversion_report = report
    if left:
        warnings.warn(
            "overparameterize left these layers unchanged: "
            + "; ".join(f"{name} ({cls}): {reason}" for name, cls, reason in left)
            + ". See the new model's `conversion_report`.",
            stacklevel=2,
        )
    return new_model


def collapse(model):
    """A copy of a model with every overparameterized layer folded into its plain layer.

    The plain kernel is the end-to-end kernel, so the function is unchanged (up to float
    rounding) and the parameter count drops to that of the original architecture.

    Args:
        model: a built Sequential or Functional `keras.Model`.

    Returns:
        A new, uncompiled `keras.Model`.
    """

    def convert(layer):
        if registry.is_overparam(layer):
            return layer.plain_class.from_config(registry.to_plain_config(layer))
        return layer.__class__.from_config(layer.get_config())

    def copy(old, new):
        new.set_weights((old.to_plain() if registry.is_overparam(old) else old).get_weights())

    return _convert_model(model, convert, copy)


def _check_layer_classes(layers):
    if isinstance(layers, type):
        layers = (layers,)
    try:
        layers = tuple(layers)
    except TypeError:
        raise ValueError(f"`layers` must be a tuple of plain Keras layer classes, got {layers!r}.") from None
    registered = registry.plain_classes()
    for cls in layers:
        if cls not in registered:
            raise ValueError(
                f"`layers` holds {getattr(cls, '__name__', cls)!r}, which has no registered "
                f"overparameterized layer; registered: {[c.__name__ for c in registered]}."
            )
    return layers


def _has_kernel(layer):
    return any(w.path.split("/")[-1].endswith("kernel") for w in layer.weights)


def _not_converted_reason(layer, layers):
    """None if `layer` is to be converted, else why not."""
    if type(layer) in layers:
        return None
    for cls in layers:
        if isinstance(layer, cls):
            return f"a subclass of {cls.__name__}, which may compute something else"
    if registry.is_plain(layer):
        return f"{type(layer).__name__} is not in `layers`"
    if registry.is_overparam(layer):
        return "already overparameterized"
    return f"no overparameterized layer is registered for {type(layer).__name__}"


def _start_balanced(pool, old, new, seed):
    """The balanced factors of `old`'s kernel for the hidden widths of the unbuilt `new`, started on
    `pool`: a future of (factors, rank), or the kernel itself at depth 1."""
    widths = [int(w) for w in getattr(new, type(new).hidden_argument)]
    kernel = keras.ops.convert_to_numpy(registry.kernel_matrix(old.kernel))
    if not widths:
        return kernel
    dtype = keras.backend.standardize_dtype(new.variable_dtype)
    return pool.submit(balanced_chain, kernel, widths, rotation_seed=seed, dtype=dtype)


def _assign_balanced(old, new, balanced):
    """Assigns `new` the factors `_start_balanced` computes, after checking that they fit it."""
    if any(len(f.shape) != 2 for f in new.factors):
        raise ValueError(
            f"`preserve_function=True` needs a chain of matrices; layer {old.name!r} became a "
            f"chain of factors shaped {[tuple(f.shape) for f in new.factors]}."
        )
    if not isinstance(balanced, concurrent.futures.Future):  # depth 1: the kernel itself
        new.factors[0].assign(balanced.astype(keras.backend.standardize_dtype(new.factors[0].dtype)))
        return
    widths = [int(f.shape[1]) for f in new.factors[:-1]]
    # One decomposition gives both the rank check and the factors.
    factors, rank = balanced.result()
    if min(widths) < rank:
        raise ValueError(
            f"`hidden_units` {widths} of layer {old.name!r} are narrower than the rank "
            f"{rank} of its kernel, so `preserve_function=True` cannot hold it; use wider hidden layers."
        )
    for variable, value in zip(new.factors, factors):
        variable.assign(value)


def _convert_model(model, convert, copy, prepare=None):
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"`model` must be a Sequential or Functional keras.Model, got {type(model).__name__}; "
            "for a subclassed model, replace its layers by overparameterized ones directly."
        )
    if not model.built:
        raise ValueError("`model` must be built (call it on data or give it an Input) before conversion.")
    if prepare is not None:
        for layer in _leaf_layers(model):
            prepare(layer)
    # `clone_model` compiles the clone of a compiled model as the source and builds its optimizer
    # on the new variables then, before any weight is copied: an optimizer that reads the weights
    # when it is built (`EndToEnd` checks for zero kernels) would see the new layers' initial
    # values, and one selected from the source model would not fit the converted one. The
    # conversions return uncompiled models, so the source counts as uncompiled while it is cloned.
    compiled = [m for m in _models(model) if getattr(m, "compiled", False)]
    for m in compiled:
        m.compiled = False
    try:
        new_model = keras.models.clone_model(model, clone_function=convert, recursive=True)
    finally:
        for m in compiled:
            m.compiled = True
    _copy_weights(model, new_model, copy)
    return new_model


def _models(model):
    """`model` and every model nested in it, through the public `Model.layers`."""
    yield model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _models(layer)


def _leaf_layers(model, seen=None):
    """Each layer `clone_model(model, recursive=True)` hands its `clone_function`, once: every
    layer but the inputs, through nested Sequential and Functional models."""
    seen = set() if seen is None else seen
    for layer in model.layers:
        if isinstance(layer, (keras.Sequential, Functional)):
            yield from _leaf_layers(layer, seen)
        elif not isinstance(layer, keras.layers.InputLayer) and id(layer) not in seen:
            seen.add(id(layer))
            yield layer


def _copy_weights(old_model, new_model, copy):
    for old, new in zip(old_model.layers, new_model.layers):
        if isinstance(old, keras.Model):
            _copy_weights(old, new, copy)
        elif old.weights:
            copy(old, new)
