"""Deprecated import path: `EndToEndModel` lives in `tf_overparam.models`."""

from tf_overparam import models
from tf_overparam._deprecation import deprecated_names

__getattr__ = deprecated_names(
    __name__,
    {
        name: (f"tf_overparam.models.{name}", getattr(models, name))
        for name in ("EndToEndModel", "FunctionalEndToEndModel")
    },
)
