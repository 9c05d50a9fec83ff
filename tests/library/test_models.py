"""Tests for `overparameterize` and `collapse` (tf_overparam/conversion.py)."""

import functools
import warnings

import keras
import numpy as np
import pytest

import tf_overparam as to


def _randomize(model, seed):
    """Non-trivial values for every weight (kernels, biases, BN statistics), in place."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = rng.normal(scale=0.5, size=weight.shape)
        if "variance" in weight.path:
            value = np.abs(value) + 0.5
        weight.assign(value.astype(weight.dtype))


def _predict(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


def _layers_of_type(model, cls):
    return [layer for layer in model._flatten_layers(include_self=False) if type(layer) is cls]


def _leaf_layers(model):
    """The layers holding weights, nested models flattened, in order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.Model) and layer.weights
    ]


def _sequential_conv():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.5)),
            keras.layers.Dense(2),
        ]
    )


def _functional_conv():
    inputs = keras.Input((6, 6, 2))
    conv = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    flat = keras.layers.Flatten()(conv)
    hidden = keras.layers.Dense(5, activation="relu")(flat)
    skip = keras.layers.Dense(5, use_bias=False)(flat)
    merged = keras.layers.Add()([hidden, skip])
    outputs = keras.layers.Dense(3)(keras.layers.LayerNormalization()(merged))
    return keras.Model(inputs, outputs)


def _nested():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3)])
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(keras.layers.BatchNormalization()(inner(inputs)))
    return keras.Model(inputs, outputs)


MODELS = {
    "sequential_conv": (_sequential_conv, (5, 6, 6, 2)),
    "functional_conv": (_functional_conv, (5, 6, 6, 2)),
    "nested": (_nested, (5, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_overparameterize_preserving_function_then_collapse_keeps_outputs(float64, name):
    for depth, hidden_units in [(2, None), (3, [9, 10]), (1, None)]:
        _check_round_trip(name, depth, hidden_units)


def _check_round_trip(name, depth, hidden_units):
    build, input_shape = MODELS[name]
    model = build()
    _randomize(model, seed=depth)
    x = np.random.default_rng(0).normal(size=input_shape)
    expected = _predict(model, x)

    deep = to.overparameterize(model, depth=depth, hidden_units=hidden_units, preserve_function=True, seed=1)
    n_dense = len(_layers_of_type(model, keras.layers.Dense))
    assert n_dense >= 2
    overparam = _layers_of_type(deep, to.OverparamDense)
    assert len(overparam) == n_dense and not _layers_of_type(deep, keras.layers.Dense)
    assert all(layer.depth == depth for layer in overparam)
    # float64 throughout: the balanced refactorisation changes outputs only by rounding (1e-10).
    np.testing.assert_allclose(_predict(deep, x), expected, rtol=1e-10, atol=1e-10)
    # Non-Dense weights (convolutions, normalisation statistics) are copied unchanged.
    old_layers, new_layers = _leaf_layers(model), _leaf_layers(deep)
    assert len(old_layers) == len(new_layers)
    copied = 0
    for old, new in zip(old_layers, new_layers):
        if type(old) is not keras.layers.Dense:
            assert type(new) is type(old)
            for a, b in zip(old.weights, new.weights, strict=True):
                np.testing.assert_array_equal(keras.ops.convert_to_numpy(b), keras.ops.convert_to_numpy(a))
                copied += 1
    assert copied >= 2
    # Each chain is balanced and holds the old kernel.
    for layer, old in zip(overparam, _layers_of_type(model, keras.layers.Dense)):
        assert to.diagnostics.balancedness(layer).relative < 1e-10
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), old.kernel.numpy(), atol=1e-12)

    flat = to.collapse(deep)
    assert not _layers_of_type(flat, to.OverparamDense)
    assert len(_layers_of_type(flat, keras.layers.Dense)) == n_dense
    assert flat.count_params() == model.count_params()
    np.testing.assert_allclose(_predict(flat, x), expected, rtol=1e-10, atol=1e-10)


def test_float32_round_trip_within_float32_rounding():
    model = _sequential_conv()
    _randomize(model, seed=7)
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2)).astype("float32")
    expected = _predict(model, x)
    deep = to.overparameterize(model, depth=4, preserve_function=True)
    # float32 factors: the product of 4 factors differs from the kernel by a few ulps (1e-4).
    np.testing.assert_allclose(_predict(deep, x), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_predict(to.collapse(deep), x), expected, rtol=1e-4, atol=1e-4)


def test_collapse_of_a_trained_overparameterized_model_keeps_outputs(float64):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 2))
    inputs = keras.Input((4,))
    hidden = to.OverparamDense(
        3, depth=3, activation="relu", factor_initializer=keras.initializers.RandomNormal(stddev=0.8, seed=0)
    )(inputs)
    outputs = to.OverparamDense(2, depth=2, hidden_units=[5], bias_initializer="ones")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    flat = to.collapse(model)
    assert [type(layer).__name__ for layer in flat.layers] == ["InputLayer", "Dense", "Dense"]
    assert flat.layers[1].get_config()["activation"] == "relu"
    # The folded kernel is the NumPy product of the trained factors.
    for layer, dense in zip(model.layers[1:], flat.layers[1:]):
        np.testing.assert_allclose(
            dense.kernel.numpy(),
            functools.reduce(np.matmul, [f.numpy() for f in layer.factors]),
            rtol=1e-12,
            atol=1e-14,
        )
    np.testing.assert_allclose(_predict(flat, x), _predict(model, x), rtol=1e-10, atol=1e-10)
    # Parameter count drops to the plain architecture's.
    assert flat.count_params() == (4 * 3 + 3) + (3 * 2 + 2)


def test_conversions_of_a_model_compiled_with_end_to_end_are_silent_uncompiled_and_keep_outputs():
    # The clone is not compiled: `EndToEnd` built on it before the weights were copied would warn
    # about its zero kernels, and its kernels read from the source would not fit the new model.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), to.OverparamDense(2, depth=2)]
    )
    model.compile(to.optimizers.EndToEnd(keras.optimizers.SGD(0.1), model=model), loss="mse")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        # UserWarning (the library's warnings): NumPy's DeprecationWarning about JAX arrays'
        # `__array__` in Keras' `set_weights` is not this library's.
        warnings.simplefilter("error", UserWarning)
        flat = to.collapse(model)
    assert model.compiled and not flat.compiled
    assert [type(layer) for layer in flat.layers] == [keras.layers.Dense, keras.layers.Dense]
    np.testing.assert_allclose(_predict(flat, x), _predict(model, x), rtol=1e-5, atol=1e-6)
    # And back: the plain model trained with EndToEnd, then overparameterized.
    flat.compile(to.optimizers.EndToEnd(keras.optimizers.SGD(0.1), model=flat), loss="mse")
    flat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        deep = to.overparameterize(flat, depth=3, preserve_function=True)
    assert not deep.compiled
    np.testing.assert_allclose(_predict(deep, x), _predict(flat, x), rtol=1e-4, atol=1e-5)


def test_overparameterize_without_preserving_draws_new_chains_and_copies_the_rest():
    model = _sequential_conv()
    _randomize(model, seed=3)
    deep = to.overparameterize(model, depth=3, factor_initializer=to.initializers.Identity(0.5))
    conv, bn = model.layers[0], model.layers[1]
    for old, new in [(conv, deep.layers[0]), (bn, deep.layers[1])]:
        for a, b in zip(old.weights, new.weights):
            np.testing.assert_array_equal(b.numpy(), a.numpy())
    for old, new in zip(model.layers[3:], deep.layers[3:]):
        assert isinstance(new, to.OverparamDense)
        # Fresh chain: Identity(0.5) at depth 3 gives 0.125 times the identity ...
        np.testing.assert_allclose(keras.ops.convert_to_numpy(new.kernel), 0.125 * np.eye(*old.kernel.shape), atol=1e-7)
        # ... while the biases and the rest of the config are kept.
        np.testing.assert_array_equal(new.bias.numpy(), old.bias.numpy())
        assert new.get_config()["activation"] == old.get_config()["activation"]
    assert keras.regularizers.serialize(deep.layers[3].kernel_regularizer) == keras.regularizers.serialize(
        model.layers[3].kernel_regularizer
    )


def test_overparameterized_copy_trains():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    deep = to.overparameterize(model, depth=3, factor_initializer=to.initializers.Balanced(seed=0))
    deep.compile(keras.optimizers.SGD(0.1), loss="mse")
    before = deep.evaluate(x, y, verbose=0)
    deep.fit(x, y, epochs=20, batch_size=16, verbose=0)
    assert deep.evaluate(x, y, verbose=0) < 0.1 * before


def test_preserve_function_with_hidden_width_below_rank_raises():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    _randomize(model, seed=5)  # a random 4x3 kernel has rank 3
    with pytest.raises(ValueError, match="hidden_units"):
        to.overparameterize(model, depth=2, hidden_units=[2], preserve_function=True)
    # A rank-1 kernel fits width 1.
    model.layers[0].kernel.assign(np.outer([1.0, 2.0, 0.0, 1.0], [1.0, -1.0, 2.0]).astype("float32"))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    deep = to.overparameterize(model, depth=3, hidden_units=1, preserve_function=True)
    np.testing.assert_allclose(_predict(deep, x), _predict(model, x), rtol=1e-5, atol=1e-5)


def test_overparameterize_bad_arguments_raise():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    for kwargs, name in [({"depth": 0}, "depth"), ({"depth": 3, "hidden_units": [2]}, "hidden_units")]:
        with pytest.raises(ValueError, match=name):
            to.overparameterize(model, **kwargs)


def test_subclassed_or_unbuilt_models_are_rejected():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="model"):
        to.overparameterize(sub)
    with pytest.raises(ValueError, match="model"):
        to.collapse(sub)
    with pytest.raises(ValueError, match="built"):
        to.overparameterize(keras.Sequential([keras.layers.Dense(2)]))


class _ScaledDense(keras.layers.Dense):
    """A Dense subclass that computes something else (twice Dense's output)."""

    def call(self, inputs):
        return 2.0 * super().call(inputs)


def test_overparameterize_reports_converted_and_left_layers_and_warns():
    inputs = keras.Input((8, 3))
    conv1d = keras.layers.Conv1D(4, 3, name="conv1d")(inputs)
    depthwise = keras.layers.Reshape((6, 4, 1))(conv1d)
    depthwise = keras.layers.DepthwiseConv2D(2, name="depthwise")(depthwise)
    flat = keras.layers.Flatten()(depthwise)
    einsum = keras.layers.EinsumDense("ab,bc->ac", output_shape=5, name="einsum")(flat)
    scaled = _ScaledDense(4, name="scaled")(einsum)
    outputs = keras.layers.Dense(2, name="plain")(scaled)
    model = keras.Model(inputs, outputs)
    with pytest.warns(UserWarning, match="left these layers unchanged") as caught:
        deep = to.overparameterize(model, depth=2)
    report = deep.conversion_report
    assert report.converted == (("plain", "Dense", "OverparamDense"),)
    left = {name: (cls, reason) for name, cls, reason in report.left}
    assert set(left) == {"conv1d", "depthwise", "einsum", "scaled"}
    assert left["scaled"] == ("_ScaledDense", "a subclass of Dense, which may compute something else")
    assert "no overparameterized layer is registered for EinsumDense" in left["einsum"][1]
    message = next(str(w.message) for w in caught if "left these layers unchanged" in str(w.message))
    assert all(name in message for name in left)
    # The subclass is kept as it was (same class, same function): outputs unchanged where the
    # only converted layer is preserved exactly.
    assert type(deep.get_layer("scaled")) is _ScaledDense
    assert "scaled (_ScaledDense)" in str(report)


def test_overparameterize_of_a_pure_dense_model_is_silent_and_reports_all(recwarn):
    model = _nested()
    deep = to.overparameterize(model, depth=3)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert sorted(c[0] for c in deep.conversion_report.converted) == sorted(
        layer.name for layer in model._flatten_layers(include_self=False) if type(layer) is keras.layers.Dense
    )
    assert deep.conversion_report.left == ()


def test_layer_kwargs_override_per_layer_and_none_leaves_a_layer():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="a"),
            keras.layers.Dense(3, name="b"),
            keras.layers.Dense(2, name="c"),
        ]
    )
    _randomize(model, seed=3)
    per_layer = {"a": {"depth": 3, "hidden_units": [7, 5]}, "b": None, "c": {}}
    with pytest.warns(UserWarning, match="b \\(Dense\\): `layer_kwargs` returned None"):
        deep = to.overparameterize(
            model, depth=2, preserve_function=True, layer_kwargs=lambda layer: per_layer[layer.name]
        )
    a, b, c = deep.layers
    assert (type(a).__name__, a.depth, a.hidden_units) == ("OverparamDense", 3, [7, 5])
    assert type(b) is keras.layers.Dense
    assert (type(c).__name__, c.depth, c.hidden_units) == ("OverparamDense", 2, [2])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(_predict(deep, x), _predict(model, x), rtol=1e-4, atol=1e-5)


def test_layers_and_layer_kwargs_arguments_are_checked():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="`layers`.*EinsumDense"):
        to.overparameterize(model, layers=(keras.layers.EinsumDense,))
    with pytest.raises(ValueError, match="layer_kwargs"):
        to.overparameterize(model, layer_kwargs={"depth": 3})
    with pytest.raises(ValueError, match="layer_kwargs"):
        to.overparameterize(model, layer_kwargs=lambda layer: 3)
    with pytest.raises(ValueError, match="OverparamDense arguments it does not take for layer"):
        to.overparameterize(model, layer_kwargs=lambda layer: {"kernel_sizes": (2, 2)})


def test_collapse_folds_every_registered_layer_through_the_registry():
    assert keras.layers.Dense in to.layers.registry.plain_classes()
    assert to.layers.registry.overparam_class_for(keras.layers.Dense) is to.OverparamDense
    model = keras.Sequential([keras.Input((4,)), to.OverparamDense(3, depth=3, name="x")])
    flat = to.collapse(model)
    assert type(flat.layers[0]) is keras.layers.Dense
    with pytest.raises(ValueError, match="plain_class"):
        to.layers.registry.register(type("NoPlain", (to.layers.OverparamLayer,), {}))


def test_preserve_function_converts_a_shared_layer_once_inside_nested_models(float64):
    # A layer called twice and a nested Sequential called twice: `clone_model` hands each layer to
    # the conversion once, and the clone must keep the sharing with the same balanced factors.
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")], name="inner")
    inputs = keras.Input((4,))
    hidden = inner(shared(inner(shared(inputs))))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    _randomize(model, seed=3)
    x = np.random.default_rng(1).normal(size=(5, 4))
    deep = to.overparameterize(model, depth=2, preserve_function=True, seed=0)
    assert sorted(name for name, _, _ in deep.conversion_report.converted) == ["head", "inner_dense", "shared"]
    assert len(deep.weights) == len(model.weights) + 3  # one more factor per converted layer, shared once
    np.testing.assert_allclose(_predict(deep, x), _predict(model, x), rtol=1e-10, atol=1e-10)
