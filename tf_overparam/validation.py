"""The argument validators of the library's public entry points: one per kind of argument.

Each returns the value in its canonical Python type or raises a `ValueError` naming the
argument. Internal helpers take validated values and check nothing again.
"""

import math
import numbers

PACKAGE = "tf_overparam"
"""The package name under which every serializable class of the library is registered
(`keras.saving.register_keras_serializable(package=PACKAGE)`); saved files refer to it."""


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_int(value, name, minimum=1):
    """`value` as a Python int >= `minimum` (any `numbers.Integral`, NumPy's included; not a bool
    or a float)."""
    if not _is_int(value) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return int(value)


def check_depth(depth):
    """The chain depth N: an int >= 1."""
    return check_positive_int(depth, "depth")


def check_non_negative_float(value, name):
    """`value` as a float >= 0 (any real number but a bool; not NaN)."""
    if not _is_real(value) or not value >= 0:
        raise ValueError(f"`{name}` must be a float >= 0, got {value!r}.")
    return float(value)


def check_positive_float(value, name):
    """`value` as a float > 0 (any real number but a bool; not NaN)."""
    if not _is_real(value) or not value > 0:
        raise ValueError(f"`{name}` must be a positive float, got {value!r}.")
    return float(value)


def check_finite_float_at_least(value, name, minimum):
    """`value` as a finite float >= `minimum` (not inf or NaN)."""
    if not _is_real(value) or not math.isfinite(value) or not value >= minimum:
        raise ValueError(f"`{name}` must be a finite number >= {minimum:g}, got {value!r}.")
    return float(value)


def check_hidden_widths(hidden_units, depth, units, name="hidden_units"):
    """The list of depth - 1 hidden widths of a chain of a validated `depth`.

    Args:
        hidden_units: None (every hidden width is `units`), a positive int (every hidden width)
            or a sequence of depth - 1 positive ints.
        depth: int >= 1, the number of factors (already validated).
        units: the width used when `hidden_units` is None.
        name: the argument's name in error messages (e.g. "hidden_filters").
    """
    if hidden_units is None:
        return [int(units)] * (depth - 1)
    if _is_int(hidden_units):
        hidden_units = [hidden_units] * (depth - 1)
    try:
        widths = list(hidden_units)
    except TypeError:
        widths = None
    if widths is None or len(widths) != depth - 1 or not all(_is_int(h) and h > 0 for h in widths):
        raise ValueError(
            f"`{name}` must be a positive int or a list of depth - 1 = {depth - 1} positive ints, got {hidden_units!r}."
        )
    return [int(h) for h in widths]


METHODS = ("auto", "eigh", "newton_schulz")


def check_method(method, depth):
    """The end-to-end direction's `method` at chain depth `depth`: one of `METHODS`;
    "newton_schulz" computes square roots, so it needs depth 1 or 2."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if method == "newton_schulz" and depth > 2:
        raise ValueError(f"`method='newton_schulz'` needs depth 1 or 2 (it computes square roots), got depth {depth}.")
    return method
