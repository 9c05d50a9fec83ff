"""OverparamTensorBoard: the values read back from the event files equal the diagnostics
computed independently (NumPy, float64) from the layer's factors at the logged steps."""

import glob
import math

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.tf_only("the TensorBoard callback writes through tf.summary, as Keras' own does")
tf = pytest.importorskip("tensorflow")

import tf_overparam as to  # noqa: E402 - after the skip of a run without TensorFlow
from tf_overparam.callbacks import OverparamTensorBoard, effective_learning_rate, find_overparam_layers  # noqa: E402

LR0, DECAY_STEPS, DECAY = 0.05, 3, 0.5


def read_events(log_dir):
    """{tag: {step: value}} of every scalar and histogram in the event files under log_dir."""
    values = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return values


def numpy_balancedness(factors):
    gaps, scales = [0.0], [0.0]
    for inner, outer in zip(factors[:-1], factors[1:]):
        outer_gram, inner_gram = outer @ outer.T, inner.T @ inner
        gaps.append(np.linalg.norm(outer_gram - inner_gram))
        scales += [np.linalg.norm(outer_gram), np.linalg.norm(inner_gram)]
    return max(gaps), max(gaps) / max(scales)


class FactorSnapshots(keras.callbacks.Callback):
    """The factors of every OverparamDense after every step, keyed by the step count."""

    def __init__(self, layers):
        super().__init__()
        self.layers, self.snapshots = layers, {}

    def on_train_begin(self, logs=None):
        self._snap()

    def on_train_batch_end(self, batch, logs=None):
        self._snap()

    def _snap(self):
        step = int(self.model.optimizer.iterations.numpy())
        self.snapshots[step] = [[f.numpy().astype(np.float64) for f in layer.factors] for layer in self.layers]


def make_model():
    """A nested model: an OverparamDense inside a Sequential inside a Functional model, and one
    at the top level; a plain Dense that must not be logged."""
    inputs = keras.Input((6,))
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            to.OverparamDense(
                5,
                depth=3,
                hidden_units=[4, 3],
                activation="tanh",
                factor_initializer=keras.initializers.RandomNormal(0.0, 0.5, seed=1),
                name="chain3",
            ),
        ],
        name="inner",
    )
    hidden = keras.layers.Dense(5, name="plain_dense")(inner(inputs))
    outputs = to.OverparamDense(2, depth=2, factor_initializer=to.initializers.Balanced(seed=2), name="chain2")(hidden)
    return keras.Model(inputs, outputs)


def fit(model, callbacks, epochs=2, steps=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * steps, 6)).astype("float32")
    y = rng.normal(size=(8 * steps, 2)).astype("float32")
    schedule = keras.optimizers.schedules.ExponentialDecay(LR0, DECAY_STEPS, DECAY, staircase=True)
    model.compile(keras.optimizers.SGD(schedule), loss="mse")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)


def expected_learning_rate(step):
    return LR0 * DECAY ** math.floor(step / DECAY_STEPS)


def test_find_overparam_layers_recurses_into_nested_models():
    model = make_model()
    assert [layer.name for layer in find_overparam_layers(model)] == ["chain3", "chain2"]
    assert find_overparam_layers(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])) == []


@pytest.mark.parametrize("update_freq", [3, "epoch"])
def test_logged_values_equal_independent_diagnostics(tmp_path, update_freq):
    model = make_model()
    layers = find_overparam_layers(model)
    snapshots = FactorSnapshots(layers)
    callback = OverparamTensorBoard(tmp_path, update_freq=update_freq)
    fit(model, [callback, snapshots], epochs=2, steps=4)  # 8 steps

    assert callback.log_dir == str(tmp_path / "overparam")
    events = read_events(tmp_path / "overparam")
    expected_steps = [0, 3, 6] if update_freq == 3 else [0, 4, 8]
    checked = 0
    for index, layer in enumerate(layers):
        tag = callback.tag(layer)
        assert tag == layer.name  # unique names
        assert sorted(events[f"{tag}/balancedness"]) == expected_steps
        for step in expected_steps:
            factors = snapshots.snapshots[step][index]
            absolute, relative = numpy_balancedness(factors)
            product = factors[0]
            for factor in factors[1:]:
                product = product @ factor
            singular_values = np.linalg.svd(product, compute_uv=False)
            depth = len(factors)
            np.testing.assert_allclose(events[f"{tag}/balancedness"][step], absolute, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(events[f"{tag}/balancedness_relative"][step], relative, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(events[f"{tag}/end_to_end_spectral_norm"][step], singular_values[0], rtol=1e-6)
            np.testing.assert_allclose(
                events[f"{tag}/effective_learning_rate"][step],
                expected_learning_rate(step) * singular_values[0] ** (2 - 2 / depth),
                rtol=1e-6,
            )
            # Histogram buckets (left edge, right edge, count): all singular values, their range.
            buckets = events[f"{tag}/end_to_end_singular_values"][step]
            assert buckets[:, 2].sum() == pytest.approx(singular_values.size)
            scale = singular_values.max()
            assert buckets[0, 0] == pytest.approx(singular_values.min(), rel=1e-6, abs=1e-6 * scale)
            assert buckets[-1, 1] == pytest.approx(scale, rel=1e-6)
            checked += 1
    assert checked == 2 * len(expected_steps)
    # The Balanced chain starts balanced, the random one does not.
    assert events["chain2/balancedness_relative"][0] < 1e-5
    assert events["chain3/balancedness_relative"][0] > 0.1


def test_effective_learning_rate_is_the_eq27_factor():
    assert effective_learning_rate(0.1, 4.0, 1) == pytest.approx(0.1)
    assert effective_learning_rate(0.1, 4.0, 2) == pytest.approx(0.4)
    assert effective_learning_rate(0.1, 4.0, 4) == pytest.approx(0.1 * 4.0**1.5)


def test_effective_learning_rate_predicts_the_step_along_w(tmp_path):
    """One small GD step of a balanced single-output chain moves w along itself by
    -eta ||w||^{2-2/N} N <g, w>/||w|| (eq. 27 projected on w), to first order in eta."""
    depth, eta = 3, 1e-4
    init = to.initializers.Balanced(keras.initializers.RandomNormal(0, 1, seed=3))
    layer = to.OverparamDense(1, depth=depth, use_bias=False, factor_initializer=init)
    model = keras.Sequential([keras.Input((4,)), layer])
    x = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
    y = np.random.default_rng(2).normal(size=(16, 1)).astype("float32")
    w = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)[:, 0]
    gradient = (x.T.astype(np.float64) @ (x @ w - y[:, 0])) * 2 / x.shape[0]  # d mse / d w
    model.compile(keras.optimizers.SGD(eta), loss="mse")
    callback = OverparamTensorBoard(tmp_path, update_freq=1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[callback])
    moved = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)[:, 0] - w
    norm = np.linalg.norm(w)
    effective = read_events(tmp_path / "overparam")[f"{layer.name}/effective_learning_rate"][0]
    predicted = -effective * depth * (gradient @ w) / norm
    np.testing.assert_allclose(moved @ w / norm, predicted, rtol=1e-2)


def test_layers_sharing_a_name_are_told_apart_by_path(tmp_path):
    def block(name):
        return keras.Sequential([keras.Input((3,)), to.OverparamDense(3, depth=2, name="chain")], name=name)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, block("second")(block("first")(inputs)))
    callback = OverparamTensorBoard(tmp_path, update_freq="epoch")
    fit_inputs = np.ones((8, 3), "float32")
    model.compile("sgd", loss="mse")
    model.fit(fit_inputs, fit_inputs, epochs=1, verbose=0, callbacks=[callback])
    tags = {tag.rsplit("/", 1)[0] for tag in read_events(tmp_path / "overparam")}
    assert tags == {"first/chain", "second/chain"}


def test_rejects_bad_update_freq(tmp_path):
    for bad in (0, -1, "batch", 1.5, True):
        with pytest.raises(ValueError, match="update_freq"):
            OverparamTensorBoard(tmp_path, update_freq=bad)


def test_plain_model_writes_nothing(tmp_path):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    fit(model, [OverparamTensorBoard(tmp_path, update_freq=1)], epochs=1, steps=2)
    assert not glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True)


def test_write_chain_summaries_of_a_factor_list_with_an_emulated_depth(tmp_path):
    # One matrix emulating a depth-3 chain (the gas sensor's end-to-end rule): balancedness 0,
    # effective learning rate eta * s^(2 - 2/3) with the given depth, not the factor count.
    kernel = np.array([[3.0], [4.0]])  # spectral norm 5
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        assert to.callbacks.write_chain_summaries([kernel], 7, learning_rate=0.1, depth=3, prefix="g/")
        assert not to.callbacks.write_chain_summaries([np.array([[np.nan]])], 8, learning_rate=0.1)
    events = read_events(tmp_path)
    assert set(events) == {
        "g/balancedness",
        "g/balancedness_relative",
        "g/end_to_end_spectral_norm",
        "g/effective_learning_rate",
        "g/end_to_end_singular_values",
    }
    assert float(events["g/balancedness"][7]) == 0.0
    assert float(events["g/end_to_end_spectral_norm"][7]) == pytest.approx(5.0, rel=1e-6)
    assert float(events["g/effective_learning_rate"][7]) == pytest.approx(0.1 * 5.0 ** (4.0 / 3.0), rel=1e-6)
    assert 8 not in events["g/balancedness"]


def test_write_chain_summaries_refuses_a_plain_layer(tmp_path):
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        with pytest.raises(ValueError, match="plain Dense"):
            to.callbacks.write_chain_summaries(dense, 0)
