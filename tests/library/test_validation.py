"""The shared validators (tf_overparam/validation.py) and the deprecated import paths."""

import importlib
import math
import pathlib
import warnings

import keras
import numpy as np
import pytest

import tf_overparam as to
from tf_overparam import validation


def test_non_negative_and_positive_floats_refuse_bools_nan_strings_and_out_of_range_values():
    for value, expected in ((0, 0.0), (np.float32(0.5), 0.5), (3, 3.0)):
        result = validation.check_non_negative_float(value, "weight_decay")
        assert result == expected and type(result) is float
    for value in (-1e-9, True, math.nan, "0.1", None):
        with pytest.raises(ValueError, match="`weight_decay` must be a float >= 0"):
            validation.check_non_negative_float(value, "weight_decay")
    assert validation.check_positive_float(np.float64(1e-3), "stddev") == 1e-3
    for value in (0, 0.0, -2.0, False, math.nan):
        with pytest.raises(ValueError, match="`stddev` must be a positive float"):
            validation.check_positive_float(value, "stddev")


def test_finite_float_at_least_refuses_infinities():
    assert validation.check_finite_float_at_least(np.int64(4), "p", 1) == 4.0
    for value in (math.inf, math.nan, 0.5, True):
        with pytest.raises(ValueError, match="`p` must be a finite number >= 1"):
            validation.check_finite_float_at_least(value, "p", 1)


def test_the_public_entry_points_use_the_shared_validators():
    with pytest.raises(ValueError, match="`weight_decay` must be a float >= 0"):
        to.EndToEndModel(depth=2, weight_decay=-1.0)
    with pytest.raises(ValueError, match="`depth` must be a positive int"):
        to.OverparamDense(2, depth=0)
    with pytest.raises(ValueError, match="`stddev` must be a positive float"):
        to.initializers.NearZero(stddev=0.0)
    with pytest.raises(ValueError, match="`p` must be a finite number >= 1"):
        to.LpLoss(math.inf)


def test_the_package_name_is_defined_once_and_every_class_is_registered_under_it():
    assert validation.PACKAGE == "tf_overparam"
    for cls in (to.OverparamDense, to.OverparamConv2D, to.EndToEndModel, to.LpLoss, to.initializers.Balanced):
        assert keras.saving.get_registered_name(cls) == f"tf_overparam>{cls.__name__}"
    sources = [path.read_text() for path in pathlib.Path(to.__file__).parent.rglob("*.py")]
    assert sum(source.count('PACKAGE = "tf_overparam"') for source in sources) == 1


DEPRECATED = [
    ("tf_overparam.models", "overparameterize", lambda: to.conversion.overparameterize),
    ("tf_overparam.models", "collapse", lambda: to.conversion.collapse),
    ("tf_overparam.models", "ConversionReport", lambda: to.conversion.ConversionReport),
    ("tf_overparam.training", "EndToEndModel", lambda: to.models.EndToEndModel),
    ("tf_overparam.training", "FunctionalEndToEndModel", lambda: to.models.FunctionalEndToEndModel),
    ("tf_overparam.factorization", "balanced_factors", lambda: to.chain.balanced_factors),
    ("tf_overparam.factorization", "chain_product", lambda: to.chain.chain_product),
    ("tf_overparam.factorization", "chain_gradients", lambda: to.chain.chain_gradients),
    ("tf_overparam.layers", "check_depth", lambda: to.chain.check_depth),
    ("tf_overparam.layers", "resolve_hidden_units", lambda: to.chain.resolve_hidden_units),
    ("tf_overparam.layers", "ChainedKernelLayer", lambda: to.layers.OverparamLayer),
    ("tf_overparam.layers.registry", "is_chained", lambda: to.layers.registry.is_overparam),
]


@pytest.mark.parametrize("module_name, name, new", DEPRECATED, ids=[f"{m}.{n}" for m, n, _ in DEPRECATED])
def test_an_old_import_path_gives_the_same_object_and_warns_once(module_name, name, new):
    module = importlib.import_module(module_name)
    module.__getattr__.warned.discard(name)  # as in a fresh process
    with pytest.warns(DeprecationWarning, match=rf"`{module_name}\.{name}` is deprecated; use `tf_overparam\."):
        value = getattr(module, name)
    assert value is new()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(module, name) is value  # the second use is silent


def test_deprecated_modules_stay_reachable_as_attributes_and_unknown_names_fail():
    assert to.training.EndToEndModel is to.EndToEndModel
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        to.models.nothing  # noqa: B018
