"""An experiment package's names, each imported from its module at first use, so that
`python -m experiments.<name> --help` and argument errors return without loading TensorFlow,
Keras or matplotlib, while `experiments.<name>.<function>` keeps working."""

import importlib


def lazy_exports(package, homes):
    """(`__getattr__`, `__dir__`) for the package named `package`; `homes` maps each of its
    modules to the names it holds: {"models": ("build_cnn", ...), ...}."""
    home_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name):
        if name in home_of:
            return getattr(importlib.import_module(f"{package}.{home_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted([*vars(importlib.import_module(package)), *home_of])

    return __getattr__, __dir__
