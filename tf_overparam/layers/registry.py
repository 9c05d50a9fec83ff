"""One registry: plain Keras layer class -> its overparameterized layer class.

`overparameterize`, `collapse`, the callbacks and the end-to-end preconditioning rule ask this
module which layers are chains and how to translate a config either way, so a new layer type
is one new module plus `@register` on its class.
"""

import keras

from tf_overparam._deprecation import deprecated_names
from tf_overparam.layers.base import OverparamLayer

_REGISTRY = {}


def register(overparam_class):
    """Class decorator: registers a `OverparamLayer` subclass for its `plain_class`."""
    plain_class = getattr(overparam_class, "plain_class", None)
    if not (isinstance(plain_class, type) and issubclass(plain_class, keras.layers.Layer)):
        raise ValueError(f"{overparam_class.__name__}.plain_class must be a keras Layer class, got {plain_class!r}.")
    _REGISTRY[plain_class] = overparam_class
    return overparam_class


def plain_classes():
    """The registered plain layer classes (e.g. `keras.layers.Dense`), in registration order."""
    return tuple(_REGISTRY)


def overparam_classes():
    """The registered overparameterized layer classes, in registration order."""
    return tuple(_REGISTRY.values())


def overparam_class_for(plain_class):
    """The overparameterized class of exactly `plain_class` (subclasses are not matched, since
    they may change the layer's function), or None."""
    return _REGISTRY.get(plain_class)


def is_overparam(layer):
    """Whether `layer` is an overparameterized layer."""
    return isinstance(layer, OverparamLayer)


def is_plain(layer):
    """Whether `layer` is exactly a registered plain layer class (not a subclass of one)."""
    return type(layer) in _REGISTRY


def to_overparam(plain_layer, **chain_kwargs):
    """A new, unbuilt overparameterized layer replacing `plain_layer` (same config otherwise)."""
    overparam_class = overparam_class_for(type(plain_layer))
    if overparam_class is None:
        raise ValueError(
            f"No overparameterized layer is registered for {type(plain_layer).__name__}; "
            f"registered: {[c.__name__ for c in _REGISTRY]}."
        )
    return overparam_class.from_config(overparam_class.overparam_config(plain_layer.get_config(), **chain_kwargs))


def to_plain_config(overparam_layer):
    """The plain layer config of the same function as an overparameterized layer."""
    return overparam_layer.plain_config(overparam_layer.get_config())


def kernel_matrix(kernel):
    """A plain layer's kernel as the matrix the chain theory sees: (prod(shape[:-1]), shape[-1])
    (a `Dense` kernel unchanged, a `Conv2D` kernel (kh, kw, cin, cout) as (kh*kw*cin, cout))."""
    return keras.ops.reshape(kernel, (-1, kernel.shape[-1]))


# The name of 0.2.0, deprecated: one word, "overparam", for the one idea.
__getattr__ = deprecated_names(__name__, {"is_chained": ("tf_overparam.layers.registry.is_overparam", is_overparam)})
