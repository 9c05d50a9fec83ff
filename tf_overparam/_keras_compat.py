"""Every private Keras hook the library needs, in one place; no other module of `tf_overparam`
imports `keras.src`. tests/library/test_keras_compat.py checks each hook against the installed
Keras, so a change in Keras fails there, by name, rather than somewhere downstream.

- `Functional`, `functional_init_arguments`: the class of a Functional model and Keras' test of
  whether a model constructor was given (inputs, outputs). `EndToEndModel(inputs, outputs)`
  returns a subclass of both, as `keras.Model(inputs, outputs)` returns a `Functional`; whole-
  model conversion accepts what `keras.models.clone_model` can rebuild (Sequential, Functional).
- `OwnLossesMixin`: adds a layer's `extra_own_losses()` to the losses Keras collects from it
  (`Layer._get_own_losses`), the way a `Dense` kernel's regularizer penalty is collected:
  computed from the current weights whenever `model.losses` is read, also inside a stateless
  (JAX) training step. Keras has no public hook for a penalty that is a function of several
  weights.
- `sublayers(layer)`: the layers a layer tracks directly (`Layer._flatten_layers`); Keras
  exposes this publicly for models only (`Model.layers`).
"""

from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments

__all__ = ["Functional", "OwnLossesMixin", "functional_init_arguments", "sublayers"]


class OwnLossesMixin:
    """Put before `keras.layers.Layer` in the bases; implement `extra_own_losses()`."""

    def extra_own_losses(self):
        """Loss tensors to add to this layer's own losses (a list)."""
        return []

    def _get_own_losses(self):
        return super()._get_own_losses() + list(self.extra_own_losses())


def sublayers(layer):
    """The layers `layer` tracks directly (not recursively), in tracking order."""
    return layer._flatten_layers(include_self=False, recursive=False)
