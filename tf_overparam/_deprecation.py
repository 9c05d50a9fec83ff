"""Deprecated import paths: a module `__getattr__` that serves old names from their new homes
and warns once per name."""

import warnings


def deprecated_names(module_name, names):
    """A module-level `__getattr__` for `module_name` serving `names`.

    Args:
        module_name: the old module's `__name__`.
        names: dict old name -> (new path as users should write it, the object).

    Returns:
        The `__getattr__` function; its `warned` set holds the names already warned about.
    """

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        new_path, value = names[name]
        if name not in __getattr__.warned:
            __getattr__.warned.add(name)
            warnings.warn(f"`{module_name}.{name}` is deprecated; use `{new_path}`.", DeprecationWarning, stacklevel=2)
        return value

    __getattr__.warned = set()
    return __getattr__
