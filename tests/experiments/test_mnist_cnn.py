"""MNIST: offline tfds loading from the manual folder, the input pipeline, the tutorial CNN and
its twin, the per-batch record, collapse, and the --quick run (also under MirroredStrategy)."""

import contextlib
import gzip
import json
import os
import pathlib
import socket
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from _figures import check_figure, check_png
from _isolation import isolated_env

from experiments import mnist_cnn
from experiments.data import mnist, mnist_files
from experiments.mnist_cnn import training
from tf_overparam.layers import OverparamDense
from tf_overparam.models import collapse

REPO = pathlib.Path(__file__).resolve().parents[2]
# The per-label counts of the original files (the data folder's SOURCE.md).
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# The tutorial network's parameters, by hand.
CONV = (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64)
PLAIN_PARAMETERS = CONV + (3136 * 512 + 512) + (512 * 10 + 10)
TWIN_PARAMETERS = PLAIN_PARAMETERS + 512 * 512 + 10 * 10


@contextlib.contextmanager
def no_network():
    """Every connection attempt or name lookup raises OSError and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    with (
        mock.patch.object(socket.socket, "connect", refuse),
        mock.patch.object(socket.socket, "connect_ex", refuse),
        mock.patch.object(socket, "create_connection", refuse),
        mock.patch.object(socket, "getaddrinfo", refuse),
    ):
        yield attempts


_PREPARED = {}


@pytest.fixture
def tfds_dir(mnist_dir, tmp_path_factory):
    """A tfds data_dir with MNIST prepared once per session from the manual folder, with the
    network disabled; returns (data_dir, connection attempts during the preparation)."""
    if "dir" not in _PREPARED:
        data_dir = tmp_path_factory.mktemp("tfds")
        with no_network() as attempts:
            mnist.load_mnist(("train", "test"), manual_dir=mnist_dir, data_dir=data_dir)
        _PREPARED.update(dir=data_dir, attempts=list(attempts))
    return _PREPARED["dir"], _PREPARED["attempts"]


def read_idx(path):
    with gzip.open(path, "rb") as file:
        data = file.read()
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


# ----------------------------------------------------------------------------- data


def test_tfds_prepares_from_the_manual_files_without_network(mnist_dir, tfds_dir):
    data_dir, attempts = tfds_dir
    assert attempts == []
    # The extracted copies tfds made are of the manual files (nothing downloaded).
    assert not list(pathlib.Path(data_dir, "downloads").glob("*.incomplete*"))
    with no_network() as later:
        train, test = mnist.load_mnist(("train", "test"), data_dir=data_dir)
        images, labels = next(iter(test.batch(mnist.NUM_TEST)))
        train_labels = np.concatenate([y.numpy() for _, y in train.batch(20000)])
    assert later == []
    assert images.shape == (mnist.NUM_TEST, 28, 28, 1) and images.dtype == tf.uint8
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_LABEL_COUNTS
    labels = labels.numpy()
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS
    # The same images as the IDX file (tfds stores them in another order): per-label pixel sums.
    idx_images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").astype(np.int64)
    idx_labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    pixels = images.numpy()[..., 0].astype(np.int64)
    for digit in range(10):
        assert pixels[labels == digit].sum() == idx_images[idx_labels == digit].sum()


def test_missing_files_without_network_say_where_to_get_and_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    with no_network() as attempts, pytest.raises(mnist.MnistNotFoundError) as error:
        mnist.load_mnist("test", data_dir=tmp_path / "tfds")
    assert attempts  # the mirror was asked, once, before tfds (which would retry for minutes)
    assert len(attempts) == 1 and not (tmp_path / "tfds").exists()
    message = str(error.value)
    for expected in (*mnist.FILES, mnist.MIRROR_URL, mnist.ENV_VAR, "--manual-dir", "could not be downloaded"):
        assert expected in message


def test_availability_is_decided_without_the_network_when_the_data_are_here(mnist_dir, tfds_dir, tmp_path):
    with no_network() as attempts:
        assert mnist_files.check_available(mnist_dir, tmp_path / "empty") == "manual"
        assert mnist_files.check_available(None, tfds_dir[0]) == "prepared"
    assert attempts == []
    assert mnist_files.tfds_data_dir("~/x") == pathlib.Path.home() / "x"


def test_cli_offline_without_data_is_one_line_before_tensorflow(tmp_path):
    """No files, nothing prepared, no network, and TensorFlow unimportable: had the run tried
    to import it, the ImportError would be a traceback."""
    env = isolated_env(tmp_path / "site", blocked=("tensorflow", "keras"), offline=True, HOME=str(tmp_path))
    env.pop(mnist.ENV_VAR, None)
    env.pop("TFDS_DATA_DIR", None)
    command = [sys.executable, "-m", "experiments.mnist_cnn", "--quick", "--out", str(tmp_path / "out")]
    # The limit is the promise: the error comes within 20 s, not after tfds' minutes of retries.
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=20)
    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1, completed.stderr
    assert lines[0].startswith("error: MNIST is not prepared") and "--manual-dir" in lines[0]
    assert mnist_files.MIRROR_HOST in lines[0] and str(tmp_path / "tensorflow_datasets") in lines[0]
    assert not (tmp_path / "out").exists()


def test_incomplete_manual_folder_is_an_error_not_a_download(mnist_dir, tmp_path, monkeypatch):
    for name in mnist.FILES[:3]:
        (tmp_path / name).symlink_to(mnist_dir / name)
    with pytest.raises(mnist.MnistNotFoundError, match=mnist.FILES[3]) as error:
        mnist.load_mnist("test", manual_dir=tmp_path, data_dir=tmp_path / "tfds")
    assert "lacks" in str(error.value)
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(mnist.MnistNotFoundError, match=mnist.ENV_VAR):
        mnist.resolve_manual_dir()
    monkeypatch.setenv(mnist.ENV_VAR, str(mnist_dir))
    assert mnist.resolve_manual_dir() == mnist_dir
    assert mnist.download_config().manual_dir == str(mnist_dir)


def test_train_pipeline_same_seed_same_batches_new_order_each_epoch(tfds_dir):
    (train,) = mnist.load_mnist(("train[:256]",), data_dir=tfds_dir[0])

    def epochs(seed, count=2):
        pipeline = mnist.train_pipeline(train, batch_size=64, seed=seed)
        return [np.concatenate([y.numpy() for _, y in pipeline]) for _ in range(count)], pipeline

    (first, second), pipeline = epochs(7)
    (again_first, again_second), _ = epochs(7)
    (other, _), _ = epochs(8)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert sorted(first.tolist()) == sorted(second.tolist())  # the same examples, reordered
    images = np.concatenate([x.numpy() for x, _ in pipeline])  # one epoch: every example once
    raw = np.concatenate([x.numpy() for x, _ in train.batch(256)]).astype(np.float64)
    assert images.shape == (256, 28, 28, 1) and images.dtype == np.float32
    assert images.min() == pytest.approx(-0.5) and images.max() == pytest.approx(0.5)
    np.testing.assert_allclose(np.sort(images.ravel()), np.sort(((raw - 127.5) / 255).ravel()), atol=1e-7)
    assert int(mnist.train_pipeline(train, batch_size=100, seed=0).cardinality()) == 2  # drops 56


# ----------------------------------------------------------------------------- models


def tutorial_l2(*arrays):
    """The tutorial's penalty: 5e-4 * sum(tf.nn.l2_loss(w))."""
    return 5e-4 * sum(float(tf.nn.l2_loss(tf.constant(np.asarray(a, np.float64)))) for a in arrays)


def weights(model, name):
    return [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]


def test_models_parameters_shared_weights_and_penalties():
    config = mnist_cnn.Config()
    plain = mnist_cnn.build_cnn(config)
    twin = mnist_cnn.build_twin(plain, config)
    assert plain.count_params() == PLAIN_PARAMETERS == 1_663_370
    assert twin.count_params() == TWIN_PARAMETERS
    assert 15.0 < 100 * (TWIN_PARAMETERS / PLAIN_PARAMETERS - 1) < 16.0
    for name in ("conv1", "conv2"):
        for a, b in zip(weights(plain, name), weights(twin, name)):
            np.testing.assert_array_equal(a, b)
    fc1, fc2 = twin.get_layer("fc1"), twin.get_layer("fc2")
    assert [tuple(f.shape) for f in fc1.factors] == [(3136, 512), (512, 512)]
    assert [tuple(f.shape) for f in fc2.factors] == [(512, 10), (10, 10)]
    np.testing.assert_array_equal(np.asarray(fc1.bias), weights(plain, "fc1")[1])
    # The tutorial's initialisation: truncated normal std 0.1 (std 0.0880 after truncation at 2 std).
    np.testing.assert_array_equal(weights(plain, "conv1")[1], 0.0)
    for name in ("conv2", "fc1", "fc2"):
        np.testing.assert_allclose(weights(plain, name)[1], 0.1, rtol=1e-6)
    kernel = weights(plain, "fc1")[0]
    assert np.abs(kernel).max() <= 0.2 and np.std(kernel) == pytest.approx(0.0880, rel=0.01)
    assert np.std(np.asarray(fc1.factors[1])) == pytest.approx(0.0880, rel=0.02)
    # Penalties: plain = the tutorial's; twin = the same on its end-to-end kernels.
    plain_penalty = float(sum(plain.losses))
    np.testing.assert_allclose(plain_penalty, tutorial_l2(*weights(plain, "fc1"), *weights(plain, "fc2")), rtol=1e-5)
    end_to_end = [np.asarray(f, np.float64) for f in fc1.factors]
    end_to_end_2 = [np.asarray(f, np.float64) for f in fc2.factors]
    np.testing.assert_allclose(
        float(sum(twin.losses)),
        tutorial_l2(end_to_end[0] @ end_to_end[1], fc1.bias, end_to_end_2[0] @ end_to_end_2[1], fc2.bias),
        rtol=1e-5,
    )
    per_factor = mnist_cnn.build_twin(plain, config, regularize="factors")
    layer = per_factor.get_layer("fc1")
    assert layer.kernel_regularizer is None and layer.factor_regularizer is not None
    for a, b in zip(per_factor.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        float(sum(per_factor.losses)), tutorial_l2(*end_to_end, fc1.bias, *end_to_end_2, fc2.bias), rtol=1e-5
    )


def test_balanced_twin_starts_as_the_same_function():
    config = mnist_cnn.Config()
    plain = mnist_cnn.build_cnn(config)
    twin = mnist_cnn.build_twin(plain, config, factor_init="balanced")
    x = np.random.default_rng(0).uniform(-0.5, 0.5, size=(16, 28, 28, 1)).astype("float32")
    expected = plain(x, training=False).numpy()
    np.testing.assert_allclose(twin(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(float(sum(twin.losses)), float(sum(plain.losses)), rtol=1e-4)


def test_collapse_of_a_trained_twin_predicts_the_same_with_fewer_parameters():
    config = mnist_cnn.Config()
    plain = mnist_cnn.build_cnn(config)
    twin = mnist_cnn.build_twin(plain, config)
    mnist_cnn.compile_model(twin, config, steps_per_epoch=2)
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, size=(128, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=128)
    twin.fit(x, y, batch_size=64, epochs=1, verbose=0)
    deployed = collapse(twin)
    assert deployed.count_params() == PLAIN_PARAMETERS < twin.count_params()
    assert not any(isinstance(layer, OverparamDense) for layer in deployed.layers)
    expected = twin.predict(x, verbose=0)
    logits = deployed.predict(x, verbose=0)
    tolerance = mnist_cnn.COLLAPSE_RTOL * max(1.0, np.abs(expected).max())
    assert np.abs(logits - expected).max() <= tolerance
    np.testing.assert_array_equal(np.argmax(logits, 1), np.argmax(expected, 1))
    # The folded kernel is the product of the trained factors.
    factors = [np.asarray(f, np.float64) for f in twin.get_layer("fc1").factors]
    np.testing.assert_allclose(deployed.get_layer("fc1").kernel.numpy(), factors[0] @ factors[1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- per-batch record


def test_batch_values_from_running_means():
    values = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    means = np.cumsum(values) / np.arange(1, 6)
    np.testing.assert_allclose(mnist_cnn.batch_values_from_running_means(means), values)


def test_running_mean_and_steps_to_threshold():
    values = [4.0, 2.0, 0.5, 3.0, 0.1, 0.1]
    np.testing.assert_allclose(mnist_cnn.running_mean(values, 2), [4.0, 3.0, 1.25, 1.75, 1.55, 0.1])
    # Means of the full window of 2 at steps 2..6: 3.0, 1.25, 1.75, 1.55, 0.1.
    first = dict(sustained=False)
    assert mnist_cnn.steps_to_threshold(values, 1.3, window=2, **first) == 3  # mean(2, 0.5); the lone 0.5 is not enough
    assert mnist_cnn.steps_to_threshold(values, 0.5, window=1, **first) == 3
    assert mnist_cnn.steps_to_threshold(values, 0.5, window=2, **first) == 6
    assert mnist_cnn.steps_to_threshold(values, 0.01, window=2, **first) is None
    assert mnist_cnn.steps_to_threshold(values[:1], 10.0, window=2, **first) is None
    # Sustained: 1.25 at step 3 rises to 1.75 at step 4, so <= 1.3 holds from step 6 on only;
    # <= 1.8 from step 3; per batch (window 1) <= 0.5 from step 5 (3.0 at step 4 breaks step 3).
    assert mnist_cnn.steps_to_threshold(values, 1.3, window=2) == 6
    assert mnist_cnn.steps_to_threshold(values, 1.8, window=2) == 3
    assert mnist_cnn.steps_to_threshold(values, 0.5, window=1) == 5
    assert mnist_cnn.steps_to_threshold(values, 0.01, window=2) is None


class WeightsBeforeStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([np.asarray(w, np.float64) for w in self.model.get_weights()])


def test_batch_recorder_gives_each_batch_loss_before_its_step(tmp_path):
    """Against NumPy: softmax cross-entropy and L2 penalty at the weights before each step."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(
                3,
                kernel_regularizer=keras.regularizers.L2(0.01),
                kernel_initializer=keras.initializers.RandomNormal(seed=0),
            ),
        ]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, 4, 0.95, staircase=True)
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[mnist_cnn.BatchCrossEntropy()],
    )
    recorder, before = mnist_cnn.BatchRecorder(tmp_path), WeightsBeforeStep()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[before, recorder])
    expected_ce, expected_loss = [], []
    for step, (kernel, bias) in enumerate(before.weights):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        logits = x[batch].astype(np.float64) @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        ce = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(8), y[batch]])
        expected_ce.append(ce)
        expected_loss.append(ce + 0.01 * np.sum(kernel**2))
    assert len(recorder.loss) == 12
    np.testing.assert_allclose(recorder.cross_entropy, expected_ce, rtol=1e-5)
    np.testing.assert_allclose(recorder.loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(recorder.learning_rate, [0.5 * 0.95 ** (s // 4) for s in range(12)], rtol=1e-6)


# ----------------------------------------------------------------------------- the script


def initial_penalties(config, arms):
    """Each arm's penalty at its initial weights (seed `config.seed`)."""
    return {arm: float(sum(mnist_cnn.build_arm(arm, config).losses)) for arm in arms}


def read_scalars(log_dir, tag):
    values = {}
    for path in pathlib.Path(log_dir).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[k] for k in sorted(values)], sorted(values)


def records_of(run_dir):
    return {
        (r["arm"], r["seed"]): r
        for r in map(lambda p: json.loads(p.read_text()), sorted(pathlib.Path(run_dir).glob("arms/*/seed_*.json")))
    }


def test_quick_run_on_real_mnist(mnist_dir, tfds_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_dir = mnist_cnn.main(
        ["--quick", "--manual-dir", str(mnist_dir), "--tfds-data-dir", str(tfds_dir[0]), "--out", str(out)]
    )
    assert run_dir == out
    printed = capsys.readouterr().out
    assert "7 models (arm/seed), 0 finished" in printed
    results = json.loads((out / "results.json").read_text())
    # --quick: plain and twin at 2 seeds first, then the three other arms at the first seed.
    plan = [
        ("plain", 66478),
        ("twin", 66478),
        ("plain", 66479),
        ("twin", 66479),
        ("balanced", 66478),
        ("factors", 66478),
        ("end_to_end", 66478),
    ]
    assert results["finished"] == [f"{arm}/{seed}" for arm, seed in plan]
    assert results["steps_per_epoch"] == 10
    records = records_of(out)
    assert sorted(records) == sorted(plan)
    for (arm, seed), record in records.items():
        parameters = PLAIN_PARAMETERS if arm in ("plain", "end_to_end") else TWIN_PARAMETERS
        assert record["parameters"] == results["arms"][arm]["parameters"] == parameters
        assert record["steps"] == 20 and len(record["batch_loss"]) == len(record["batch_cross_entropy"]) == 20
        # Full objective minus cross-entropy of the first batch = the arm's initial L2 penalty.
        penalty = initial_penalties(mnist_cnn.Config.quick().for_seed(seed), [arm])[arm]
        assert record["initial_penalty"] == pytest.approx(penalty, rel=1e-4)
        logged, steps = read_scalars(out / "tensorboard" / arm / f"seed_{seed}" / "batch", "batch_loss")
        assert steps == list(range(1, 21))
        np.testing.assert_allclose(logged, record["batch_loss"], rtol=1e-6)
        assert (out / "arms" / arm / f"seed_{seed}.weights.h5").exists()
        assert ("collapse" in record) == (arm in ("twin", "balanced", "factors"))
    # One seed, the same first batch and dropout mask in every arm: plain and end_to_end (the same
    # weights) see the same first cross-entropy, balanced (the same function) nearly; seeds differ.
    first = {key: record["batch_cross_entropy"][0] for key, record in records.items()}
    assert first["end_to_end", 66478] == first["plain", 66478]
    assert first["balanced", 66478] == pytest.approx(first["plain", 66478], rel=1e-4)
    assert first["plain", 66479] != first["plain", 66478]
    _, diagnostic_steps = read_scalars(out / "tensorboard" / "twin" / "seed_66478" / "overparam", "fc1/balancedness")
    assert diagnostic_steps == [0, 10, 20]
    assert set(results["steps_to_cross_entropy"]) == {"2", "1.5", "1"}
    assert sorted(results["arms"]["plain"]["test_accuracy"]["per_seed"]) == ["66478", "66479"]
    check_png(out / "batch_loss.png")
    # config.json: the options and where they ran, with the package version and git commit.
    config = json.loads((out / "config.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import tf_overparam

    assert config["provenance"]["git_commit"] == head
    assert config["provenance"]["package_version"] == tf_overparam.__version__
    assert config["seeds"] == [66478, 66479] and config["other_seeds"] == [66478]
    # Collapse: recomputed here from the saved weights (no optimizer state in them) on the same
    # 256 test images.
    collapsed = records["twin", 66478]["collapse"]
    assert collapsed["passed"] and collapsed["argmax_equal"]
    assert collapsed["parameters"] == PLAIN_PARAMETERS
    twin = mnist_cnn.build_arm("twin", mnist_cnn.Config.quick().for_seed(66478))
    twin.load_weights(out / "arms" / "twin" / "seed_66478.weights.h5")
    deployed = collapse(twin)
    (test,) = mnist.load_mnist(("test",), data_dir=tfds_dir[0])
    x, y = next(iter(test.take(256).batch(256)))
    accuracy = float(np.mean(np.argmax(deployed.predict(mnist.scale_images(x), verbose=0), 1) == y.numpy()))
    assert accuracy == collapsed["test_accuracy"] == records["twin", 66478]["test_accuracy"]
    # A quick run stays small: the weights of 7 models, no optimizer state, no collapsed copies.
    files = [path for path in out.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 60e6
    assert not [path for path in files if path.name.startswith(".")]  # no scratch file left
    float32_weights = 4 * (3 * PLAIN_PARAMETERS + 4 * TWIN_PARAMETERS)  # plain x2, end_to_end; the twins x4
    assert float32_weights < sum(p.stat().st_size for p in files if p.suffix == ".h5") < float32_weights + 7 * 100_000


def test_quick_run_under_mirrored_strategy_in_a_subprocess(mnist_dir, tfds_dir, tmp_path):
    out = tmp_path / "mirrored"
    command = [
        sys.executable,
        "-m",
        "experiments.mnist_cnn",
        "--quick",
        "--epochs",
        "1",
        "--steps",
        "3",
        "--arms",
        "plain,twin",
        "--seeds",
        "7",
        "--strategy",
        "mirrored",
        "--manual-dir",
        str(mnist_dir),
        "--tfds-data-dir",
        str(tfds_dir[0]),
        "--out",
        str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == ""  # a quiet start: no TensorFlow log lines
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["replicas"] == 2
    penalties = initial_penalties(mnist_cnn.Config.quick().for_seed(7), ("plain", "twin"))
    records = records_of(out)
    assert sorted(records) == [("plain", 7), ("twin", 7)]
    for (arm, _), record in records.items():
        assert record["steps"] == 3
        # Loss and cross-entropy are aggregated over both replicas consistently.
        assert record["batch_loss"][0] - record["batch_cross_entropy"][0] == pytest.approx(penalties[arm], rel=1e-4)
    assert results["arms"]["twin"]["collapse_passed"] is True


# ----------------------------------------------------------------------------- arms and seeds


def hand_record(arm, seed, cross_entropy, accuracy):
    return {
        "arm": arm,
        "seed": seed,
        "parameters": 1,
        "batch_cross_entropy": cross_entropy,
        "test_accuracy": accuracy,
        "final_running_mean_cross_entropy": cross_entropy[-1],
        "initial_penalty": 1.0,
        "final_running_mean_penalty": 0.5,
        "median_batch_seconds": 0.1,
    }


def crossing_at(step, length=12, spike_at=None):
    """Per-batch values 2.0 until `step` (1-based), 0.5 from it on (None: never); optionally one
    early 0.5 at `spike_at`, a first crossing that does not last."""
    values = [2.0] * length if step is None else [2.0] * (step - 1) + [0.5] * (length - step + 1)
    if spike_at is not None:
        values[spike_at - 1] = 0.5
    return values


def test_summary_median_range_and_speedup_of_medians():
    config = mnist_cnn.Config(window=1, thresholds=(1.0,))
    records = {
        ("plain", 1): hand_record("plain", 1, crossing_at(4, spike_at=1), 0.9),
        ("plain", 2): hand_record("plain", 2, crossing_at(6), 0.8),
        ("plain", 3): hand_record("plain", 3, crossing_at(10), 0.95),
        ("twin", 1): hand_record("twin", 1, crossing_at(2), 0.9),
        ("twin", 2): hand_record("twin", 2, crossing_at(2), 0.9),
        ("twin", 3): hand_record("twin", 3, crossing_at(None), 0.9),
        ("balanced", 1): hand_record("balanced", 1, crossing_at(1), 0.9),
    }
    summary = mnist_cnn.summarize(records, config)
    assert summary["arms"]["plain"]["test_accuracy"]["median"] == 0.9
    assert summary["arms"]["plain"]["test_accuracy"]["range"] == [0.8, 0.95]
    row = summary["steps_to_cross_entropy"]["1"]
    # plain: 4, 6, 10 (seed 1's lone early batch is a first crossing at 1, not a sustained one).
    assert row["plain"]["per_seed"] == {"1": 4, "2": 6, "3": 10}
    assert row["plain"]["median"] == 6 and row["plain"]["range"] == [4, 10]
    assert row["plain"]["first_crossing"]["per_seed"] == {"1": 1, "2": 6, "3": 10}
    # twin: 2, 2, never -> median 2, max never; speedup 6 / 2 = 3, per-seed 4/2, 6/2 (seed 3 none).
    assert row["twin"]["median"] == 2 and row["twin"]["range"] == [2, None]
    assert row["twin"]["speedup"] == 3.0 and row["twin"]["speedup_range"] == [2.0, 3.0]
    # balanced, one seed: 6 / 1 against the medians; its one ratio is seed 1's, 4 / 1.
    assert row["balanced"]["speedup"] == 6.0 and row["balanced"]["speedup_range"] == [4.0, 4.0]


def test_a_seed_sets_the_same_data_order_and_dropout_masks_in_every_arm(tfds_dir):
    (train,) = mnist.load_mnist(("train[:640]",), data_dir=tfds_dir[0])
    config = mnist_cnn.Config.quick()

    def first_labels(seed):
        return np.concatenate([y.numpy() for _, y in mnist_cnn.train_batches(config.for_seed(seed), train).take(3)])

    def masks(arm, seed, calls=3):
        dropout = mnist_cnn.build_arm(arm, config.for_seed(seed)).get_layer("dropout")
        return [dropout(tf.ones((64, 512)), training=True).numpy() != 0 for _ in range(calls)]

    np.testing.assert_array_equal(first_labels(5), first_labels(5))
    assert not np.array_equal(first_labels(5), first_labels(6))
    reference = masks("plain", 5)
    assert 0.4 < reference[0].mean() < 0.6 and not np.array_equal(reference[0], reference[1])
    for arm in ("twin", "balanced", "factors", "end_to_end"):
        for mask, expected in zip(masks(arm, 5), reference):
            np.testing.assert_array_equal(mask, expected)
    assert not np.array_equal(masks("plain", 6)[0], reference[0])


def test_seeds_draw_independent_weights():
    """Stateless draws from one integer seed share their first values across shapes: seed + offset
    per layer would make seed s's conv1 the start of seed s - 1's conv2 (shown here), so each use
    gets its own stream."""
    draw = keras.initializers.TruncatedNormal(stddev=0.1, seed=3)
    np.testing.assert_array_equal(np.ravel(draw((4, 3))), np.ravel(draw((6, 5)))[:12])  # the trap
    config = mnist_cnn.Config()
    first, second = mnist_cnn.build_arm("twin", config.for_seed(1)), mnist_cnn.build_arm("twin", config.for_seed(2))
    conv1 = np.ravel(second.get_layer("conv1").get_weights()[0])
    conv2 = np.ravel(first.get_layer("conv2").get_weights()[0])
    assert np.sum(conv1 == conv2[: conv1.size]) == 0  # not even one value in the same place
    fc1, fc2 = first.get_layer("fc1").factors, first.get_layer("fc2").factors
    values = [np.ravel(np.asarray(f)) for f in (*fc1, *fc2, first.get_layer("conv1").get_weights()[0])]
    for i, a in enumerate(values):
        for b in values[i + 1 :]:
            size = min(a.size, b.size)
            assert np.sum(a[:size] == b[:size]) == 0


def test_end_to_end_arm_moves_the_dense_kernels_by_eq_24():
    """One step of the end_to_end arm (momentum SGD from zero velocity: W <- W - lr D) against
    tests/_reference.py: D = the eq. 24 direction of the loss gradient for fc1 and fc2, the
    plain gradient for everything else."""
    from tests._reference import reference_direction

    config = mnist_cnn.Config(dropout=0.0, learning_rate=1.0)  # no dropout: the gradient below is the step's
    model = mnist_cnn.build_arm("end_to_end", config)
    mnist_cnn.compile_model(model, config, steps_per_epoch=10, arm="end_to_end")
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    before = {v.path: np.asarray(v, np.float64) for v in model.trainable_variables}
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        loss = tf.reduce_mean(loss) + tf.add_n(model.losses)
    grads = {
        v.path: np.asarray(g, np.float64)
        for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))
    }
    model.train_on_batch(x, y)
    preconditioned = set()
    for variable in model.trainable_variables:
        step = before[variable.path] - np.asarray(variable, np.float64)
        if variable.path.endswith("kernel") and "fc" in variable.path:
            preconditioned.add(variable.path.split("/")[-2])
            expected = reference_direction(before[variable.path], grads[variable.path], depth=2)
        else:
            expected = grads[variable.path]
        np.testing.assert_allclose(step, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert preconditioned == {"fc1", "fc2"}


# ----------------------------------------------------------------------------- failing cleanly


def _fake_manual_dir(folder):
    folder.mkdir()
    for name in mnist.FILES:
        (folder / name).write_bytes(gzip.compress(b"not MNIST"))
    return folder


def test_corrupt_manual_file_is_reported_before_tfds(tmp_path):
    folder = _fake_manual_dir(tmp_path / "manual")
    with pytest.raises(mnist.MnistCorruptError, match="train-images-idx3-ubyte.gz is corrupt or not the original"):
        mnist.load_mnist("test", manual_dir=folder, data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()  # tfds was never asked


def test_corrupt_manual_file_is_reported_even_with_a_tfds_cache(mnist_dir, tfds_dir, tmp_path):
    folder = tmp_path / "manual"
    folder.mkdir()
    for name in mnist.FILES:
        (folder / name).symlink_to(mnist_dir / name)
    (folder / mnist.FILES[3]).unlink()
    (folder / mnist.FILES[3]).write_bytes((mnist_dir / mnist.FILES[3]).read_bytes()[:-10])  # truncated
    assert mnist.load_mnist("test", data_dir=tfds_dir[0]) is not None  # the cache alone would serve
    with pytest.raises(mnist.MnistCorruptError, match=f"{mnist.FILES[3]} is corrupt"):
        mnist.load_mnist("test", manual_dir=folder, data_dir=tfds_dir[0])


def test_cli_corrupt_mnist_is_one_line_exit_2(tmp_path, capsys):
    folder = _fake_manual_dir(tmp_path / "manual")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        mnist_cnn.main(
            ["--quick", "--manual-dir", str(folder), "--tfds-data-dir", str(tmp_path / "t"), "--out", str(out)]
        )
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: MNIST file") and "is corrupt" in lines[0] and mnist.MIRROR_URL in lines[0]
    assert not out.exists()


def test_cli_out_at_a_run_folder_refuses(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        mnist_cnn.main(["--quick", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "already holds a run" in lines[0]
    assert (tmp_path / "config.json").read_text() == "{}\n" and len(list(tmp_path.iterdir())) == 1


def test_interrupted_run_resumes_per_arm_and_seed_and_adds_arms(mnist_dir, tfds_dir, tmp_path, capsys, monkeypatch):
    argv = [
        "--quick",
        "--epochs",
        "1",
        "--steps",
        "3",
        "--arms",
        "plain,twin",
        "--seeds",
        "1,2",
        "--manual-dir",
        str(mnist_dir),
        "--tfds-data-dir",
        str(tfds_dir[0]),
    ]
    reference = records_of(mnist_cnn.main([*argv, "--out", str(tmp_path / "ref")]))
    train_one = training.train_one

    def interrupt_the_second_twin(arm, model, config, *args):
        if (arm, config.seed) == ("twin", 2):
            raise KeyboardInterrupt
        return train_one(arm, model, config, *args)

    run = tmp_path / "run"
    monkeypatch.setattr(training, "train_one", interrupt_the_second_twin)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mnist_cnn.main([*argv, "--out", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(lines) == 1
    assert lines[0] == (
        f"interrupted: kept plain/1, twin/1, plain/2 (3 of 4 arm/seed models) in {run}; "
        f"continue with: python -m experiments.mnist_cnn --resume {run} {' '.join(argv)}"
    )
    kept = records_of(run)
    assert sorted(kept) == [("plain", 1), ("plain", 2), ("twin", 1)]
    interrupted = json.loads((run / "results.json").read_text())
    assert interrupted["finished"] == ["plain/1", "twin/1", "plain/2"]  # written after each model
    assert (run / "batch_loss.png").is_file() and len(interrupted["sittings_seconds"]) == 1

    monkeypatch.setattr(training, "train_one", train_one)
    mnist_cnn.main(["--resume", str(run), *argv])
    printed = capsys.readouterr().out
    assert "plain/1: kept from the resumed run" in printed and "twin/1: kept" in printed
    records = records_of(run)
    assert {key: records[key] for key in kept} == kept  # kept, not retrained
    assert sorted(records) == sorted(reference)
    for key, record in records.items():
        np.testing.assert_allclose(record["batch_loss"], reference[key]["batch_loss"], rtol=1e-6)
        assert read_scalars(run / "tensorboard" / key[0] / f"seed_{key[1]}" / "batch", "batch_loss")[1] == [1, 2, 3]
    # Resuming with more arms trains only those; config.json records the union.
    mnist_cnn.main(["--resume", str(run), *argv, "--arms", "end_to_end", "--other-seeds", "1"])
    printed = capsys.readouterr().out
    assert "1 models (arm/seed), 0 finished" in printed and "end_to_end/1: test accuracy" in printed
    assert "twin/1: test accuracy" not in printed
    sittings = json.loads((run / "config.json").read_text())["sittings"]
    assert [sitting["plan"] for sitting in sittings] == [
        ["plain/1", "twin/1", "plain/2", "twin/2"],
        ["twin/2"],
        ["end_to_end/1"],
    ]
    assert sorted(records_of(run)) == sorted([*reference, ("end_to_end", 1)])
    assert json.loads((run / "config.json").read_text())["arms"] == ["plain", "twin", "end_to_end"]
    results = json.loads((run / "results.json").read_text())
    assert len(results["sittings_seconds"]) == 3 and results["seconds"] == pytest.approx(
        sum(results["sittings_seconds"])
    )
    assert results["sittings_seconds"][0] == interrupted["sittings_seconds"][0]
    assert results["arms"]["twin"]["collapse_passed"] is True and set(results["arms"]) == {
        "plain",
        "twin",
        "end_to_end",
    }
    # Other options than the arms and seeds must match.
    with pytest.raises(SystemExit) as exit_info:
        mnist_cnn.main(["--resume", str(run), *argv, "--optimizer", "adam"])
    assert exit_info.value.code == 2 and "optimizer" in capsys.readouterr().err


def test_cli_rejects_unknown_arms_and_bad_seeds(capsys):
    for argv, expected in (
        (["--arms", "plain,twins"], "--arms must be"),
        (["--seeds", "1,x"], "--seeds must be"),
        (["--other-seeds", "-1"], "--other-seeds must be"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            mnist_cnn.parse_args(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    config, _ = mnist_cnn.parse_args(["--arms", "twin,plain", "--seeds", "3,3,4", "--other-seeds", "9"])
    assert config.arms == ("twin", "plain") and config.seeds == (3, 4) and config.other_seeds == (9,)
    assert config.plan() == [("twin", 3), ("plain", 3), ("twin", 4), ("plain", 4)]
    # The seeded arms (plain, twin) over every seed first, then the others, seed by seed.
    config, _ = mnist_cnn.parse_args(
        ["--arms", "end_to_end,twin,plain,factors", "--seeds", "3,4", "--other-seeds", "4,9"]
    )
    assert config.plan() == [
        ("twin", 3),
        ("plain", 3),
        ("twin", 4),
        ("plain", 4),
        ("end_to_end", 4),
        ("factors", 4),
        ("end_to_end", 9),
        ("factors", 9),
    ]


def test_help_answers_without_tensorflow_keras_or_matplotlib(tmp_path):
    env = isolated_env(tmp_path, blocked=("tensorflow", "keras", "matplotlib", "tensorflow_datasets"))
    command = [sys.executable, "-m", "experiments.mnist_cnn", "--help"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    for option in ("--manual-dir", "--data-dir", "--tfds-data-dir", "--debug", "--quick", "--histograms"):
        assert option in completed.stdout


def test_figure_parts_arms_that_start_alike_and_says_quick_run():
    """plain, balanced and end_to_end start from the same penalty: the relative panel parts them."""
    config = mnist_cnn.Config.quick(window=2)
    steps = 20
    cross_entropy = list(np.linspace(2.3, 1.5, steps))

    def record(arm, seed, drift):
        penalty = 3.0 * (1.0 - drift * np.arange(steps))
        return {"batch_cross_entropy": cross_entropy, "batch_loss": list(np.add(cross_entropy, penalty))}

    records = {
        ("plain", 1): record("plain", 1, 1e-4),
        ("plain", 2): record("plain", 2, 2e-4),
        ("balanced", 1): record("balanced", 1, 5e-4),
        ("end_to_end", 1): record("end_to_end", 1, 1e-3),
    }
    figure = mnist_cnn.batch_loss_figure(records, config)
    panels = check_figure(figure, title_contains=("quick run", "640 training examples"))
    assert [ax.get_yscale() for ax in panels] == ["log", "log", "linear"]
    relative = panels[2]
    finals = {line.get_label().split()[0]: line.get_ydata()[-1] for line in relative.lines}
    assert finals == pytest.approx(
        {"plain": 1 - 1.5e-4 * 18.5, "balanced": 1 - 5e-4 * 18.5, "end_to_end": 1 - 1e-3 * 18.5}
    )
    assert len({line.get_linestyle() for line in relative.lines}) == 3
    assert len({line.get_marker() for line in relative.lines}) == 3
    labels = [text.get_text() for text in relative.get_legend().get_texts()]
    assert labels == ["plain (2 seeds)", "balanced (1 seed)", "end_to_end (1 seed)"]
    figure.canvas.draw()  # tick positions are chosen at drawing
    for ax in panels:
        ticks = ax.get_xticks()
        np.testing.assert_array_equal(ticks, np.round(ticks))
    full = mnist_cnn.batch_loss_figure(records, mnist_cnn.Config())
    assert "quick" not in full.get_suptitle()
