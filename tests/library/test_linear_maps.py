"""Tests for `tf_overparam.linear_maps`: kernels read as their layer's linear map, checked against
the layers' own outputs and, through `EndToEnd(model=...)`, against NumPy eq. 24
(tests/_reference.py) of the matrices written out by hand."""

import warnings

import keras
import numpy as np
import pytest
from _backend import layer_gradients
from _reference import reference_direction

import tf_overparam as to
from tf_overparam.linear_maps import LinearMap, linear_maps, path_matches
from tf_overparam.optimizers import EndToEnd


def _sgd_step_and_gradients(model, optimizer, x, y):
    """One step of `optimizer` on `model` with the gradients of the loss (1/2) mean squared error
    on (x, y): the weights before, the gradients, and the weights after, by variable path. The
    step is given the gradients the expectation uses, so it checks the optimizer alone."""
    loss = to.LpLoss(2)
    variables = model.trainable_variables
    grads = layer_gradients(model, lambda out: loss(y, out), x)
    before = {v.path: np.asarray(v) for v in variables}
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    return before, dict(zip([v.path for v in variables], grads)), {v.path: np.asarray(v) for v in variables}


def _attention_model():
    inputs = keras.Input((3, 32))
    attention = keras.layers.MultiHeadAttention(
        num_heads=4, key_dim=8, kernel_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=1)
    )
    outputs = attention(inputs, inputs)
    return keras.Model(inputs, outputs), attention


def test_einsum_dense_kernels_are_the_layers_linear_maps():
    # The matrix form M of each kernel maps the layer's inputs to its outputs: x M, with x and
    # the output flattened over the axes the equation contracts and produces.
    rng = np.random.default_rng(0)
    model, attention = _attention_model()
    maps = linear_maps(model)
    assert [maps[p].matrix_shape for p in maps] == [(1, 32, 32)] * 4
    x = rng.normal(size=(2, 3, 32)).astype("float32")
    heads = rng.normal(size=(2, 3, 4, 8)).astype("float32")
    for layer, inputs in [(attention._query_dense, x), (attention._output_dense, heads)]:
        matrix = keras.ops.convert_to_numpy(maps[layer.kernel.path].to_matrix(layer.kernel))[0]
        out = keras.ops.convert_to_numpy(layer(inputs)) - keras.ops.convert_to_numpy(layer.bias)
        np.testing.assert_allclose(out.reshape(2, 3, -1), inputs.reshape(2, 3, -1) @ matrix, rtol=1e-5, atol=1e-5)
    # A kernel axis shared by the input and the output is a batch of independent maps.
    layer = keras.layers.EinsumDense("abc,bcd->abd", output_shape=(5, 2), name="per_position")
    inputs = rng.normal(size=(2, 5, 3)).astype("float32")
    model = keras.Sequential([keras.Input((5, 3)), layer])
    linear_map = linear_maps(model)[layer.kernel.path]
    assert linear_map.matrix_shape == (5, 3, 2)
    matrices = keras.ops.convert_to_numpy(linear_map.to_matrix(layer.kernel))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(inputs)), np.einsum("abc,bcd->abd", inputs, matrices), rtol=1e-5, atol=1e-6
    )
    back = keras.ops.convert_to_numpy(linear_map.from_matrix(matrices))
    np.testing.assert_array_equal(back, np.asarray(layer.kernel))


@pytest.mark.parametrize("depth", [2, 3])
def test_multi_head_attention_step_is_eq24_of_the_d_model_by_heads_head_dim_maps(float64, depth):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 3, 32)), rng.normal(size=(4, 3, 32))
    eta = 0.1
    model, _ = _attention_model()
    before, grads, after = _sgd_step_and_gradients(model, EndToEnd(keras.optimizers.SGD(eta), depth, model=model), x, y)
    for path, w in before.items():
        g = grads[path]
        if path.endswith("kernel"):  # query/key/value (32, 4, 8), output (4, 8, 32): 32 x 32 maps
            matrix = (32, 32)
            expected = w - eta * reference_direction(w.reshape(matrix), g.reshape(matrix), depth).reshape(w.shape)
        else:
            expected = w - eta * g
        np.testing.assert_allclose(after[path], expected, rtol=1e-10, atol=1e-12, err_msg=path)
    # Read from its shape alone, the query kernel would be the 128 x 8 matrix: another step.
    query = "multi_head_attention/query/kernel"
    w, g = before[query], grads[query]
    wrong = w - eta * reference_direction(w.reshape(128, 8), g.reshape(128, 8), depth).reshape(w.shape)
    assert np.abs(wrong - after[query]).max() > 1e-3 * np.abs(after[query] - w).max()


def _depthwise_model():
    init = keras.initializers.RandomNormal(stddev=0.5, seed=2)
    return keras.Sequential(
        [
            keras.Input((5, 5, 3)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, depthwise_initializer=init, name="depthwise"),
            keras.layers.Conv2D(4, 1, groups=2, kernel_initializer=init, name="grouped"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, kernel_initializer=init, name="head"),
        ]
    )


def test_depthwise_kernels_are_not_preconditioned_and_grouped_convolutions_are_block_maps(float64):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 5, 5, 3)), rng.normal(size=(6, 2))
    model = _depthwise_model()
    assert list(linear_maps(model)) == ["sequential/grouped/kernel", "sequential/head/kernel"]
    eta, depth = 0.05, 2
    before, grads, after = _sgd_step_and_gradients(model, EndToEnd(keras.optimizers.SGD(eta), depth, model=model), x, y)
    for path, w in before.items():
        g = grads[path]
        if path == "sequential/grouped/kernel":  # (1, 1, 3, 4), 2 groups: output channels 0-1 and 2-3
            expected = np.concatenate(
                [
                    w[..., c : c + 2] - eta * reference_direction(w[0, 0, :, c : c + 2], g[0, 0, :, c : c + 2], depth)
                    for c in (0, 2)
                ],
                axis=-1,
            )
        elif path == "sequential/head/kernel":
            expected = w - eta * reference_direction(w, g, depth)
        else:  # the depthwise kernel and the biases
            expected = w - eta * g
        np.testing.assert_allclose(after[path], expected, rtol=1e-11, atol=1e-13, err_msg=path)


def test_a_depthwise_kernel_chosen_by_pattern_steps_per_channel(float64):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 5, 5, 3)), rng.normal(size=(6, 2))
    model = _depthwise_model()
    eta, depth = 0.05, 3
    optimizer = EndToEnd(keras.optimizers.SGD(eta), depth, variables=["depthwise/kernel"], model=model)
    before, grads, after = _sgd_step_and_gradients(model, optimizer, x, y)
    w, g = before["sequential/depthwise/kernel"], grads["sequential/depthwise/kernel"]  # (3, 3, 3, 2)
    expected = np.stack(
        [
            w[:, :, c]
            - eta * reference_direction(w[:, :, c].reshape(9, 2), g[:, :, c].reshape(9, 2), depth).reshape(3, 3, 2)
            for c in range(3)
        ],
        axis=2,
    )
    np.testing.assert_allclose(after["sequential/depthwise/kernel"], expected, rtol=1e-11, atol=1e-13)


def test_without_the_model_kernels_are_read_by_shape_with_a_warning():
    model = _depthwise_model()
    optimizer = EndToEnd(keras.optimizers.SGD(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.build(model.trainable_variables)
    messages = [str(w.message) for w in caught if "by their shape alone" in str(w.message)]
    assert len(messages) == 1 and "sequential/depthwise/kernel" in messages[0] and "model=" in messages[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EndToEnd(keras.optimizers.SGD(0.1), model=model).build(model.trainable_variables)
    assert not [w for w in caught if "by their shape alone" in str(w.message)]


def _count_by_layers(model):
    """The kernels the default rule must select, from the layer types: every Conv and Dense
    layer's kernel, no depthwise one."""
    kinds = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)
    kernels = [layer.kernel.path for layer in model.layers if isinstance(layer, kinds)]
    depthwise = [layer.kernel.path for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
    return kernels, depthwise


# The reading is Python over the layers, the same on every backend; building these models on JAX
# costs about ten times what it costs on TensorFlow.
@pytest.mark.tf_only("backend-independent layer reading; the application models build fastest on TensorFlow")
@pytest.mark.parametrize("name, depthwise_layers", [("ResNet50", 0), ("MobileNetV2", 17), ("EfficientNetB0", 16)])
def test_application_models_select_their_conv_and_dense_kernels(name, depthwise_layers):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    kernels, depthwise = _count_by_layers(model)
    assert len(depthwise) == depthwise_layers
    maps = linear_maps(model)
    assert list(maps) == kernels and not set(depthwise) & set(maps)
    for layer in model.layers:
        if getattr(layer, "kernel", None) is not None and layer.kernel.path in maps:
            shape = tuple(layer.kernel.shape)  # conv (kh, kw, cin, cout) -> (kh kw cin, cout); dense as it is
            assert maps[layer.kernel.path].matrix_shape == (1, int(np.prod(shape[:-1])), shape[-1])
    optimizer = EndToEnd(keras.optimizers.SGD(0.1), model=model)
    optimizer.build(model.trainable_variables)
    assert [v.path for v, s in zip(model.trainable_variables, optimizer._selected) if s] == kernels


def test_maps_survive_save_and_load(tmp_path):
    model, _ = _attention_model()
    model.compile(EndToEnd(keras.optimizers.SGD(0.1), model=model), loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.linear_maps == linear_maps(model)
    assert loaded.optimizer.linear_maps["multi_head_attention/query/kernel"] == LinearMap((32, 4, 8), (0,), (1, 2))


def test_path_patterns_match_a_path_or_a_tail_of_it():
    assert path_matches("sequential/dense_1/kernel", "dense*/kernel")
    assert path_matches("dense_1/kernel", "dense*/kernel")
    assert path_matches("sequential/dense_1/kernel", "sequential/dense_1/kernel")
    assert not path_matches("sequential/dense_1/kernel_a", "dense*/kernel")
    assert not path_matches("sequential/my_dense/kernel", "dense*/kernel")  # tails start after a "/"
