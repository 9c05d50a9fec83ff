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

from experiments import mnist_cnn
from tf_overparam.datasets import mnist
from tf_overparam.layers import OverparamDense
from tf_overparam.models import collapse

REPO = pathlib.Path(__file__).resolve().parents[1]
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

    with mock.patch.object(socket.socket, "connect", refuse), mock.patch.object(
        socket.socket, "connect_ex", refuse
    ), mock.patch.object(socket, "create_connection", refuse), mock.patch.object(socket, "getaddrinfo", refuse):
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
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic & 0xFF)]
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
    from tensorflow_datasets.core.download import downloader

    monkeypatch.delenv(mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # tfds retries ~3 minutes otherwise
    with no_network() as attempts, pytest.raises(mnist.MnistNotFoundError) as error:
        mnist.load_mnist("test", data_dir=tmp_path / "tfds")
    assert attempts  # tfds did try to download
    message = str(error.value)
    for expected in (*mnist.FILES, mnist.MIRROR_URL, mnist.ENV_VAR, "--manual-dir", "could not be downloaded"):
        assert expected in message


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
        tutorial_l2(end_to_end[0] @ end_to_end[1], fc1.bias, end_to_end_2[0] @ end_to_end_2[1], fc2.bias), rtol=1e-5,
    )
    per_factor = mnist_cnn.build_twin(plain, mnist_cnn.Config(regularize="factors"))
    layer = per_factor.get_layer("fc1")
    assert layer.kernel_regularizer is None and layer.factor_regularizer is not None
    for a, b in zip(per_factor.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        float(sum(per_factor.losses)), tutorial_l2(*end_to_end, fc1.bias, *end_to_end_2, fc2.bias), rtol=1e-5
    )


def test_balanced_twin_starts_as_the_same_function():
    config = mnist_cnn.Config(factor_init="balanced")
    plain = mnist_cnn.build_cnn(config)
    twin = mnist_cnn.build_twin(plain, config)
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
    assert mnist_cnn.steps_to_threshold(values, 1.3, window=2) == 3  # mean(2, 0.5); the lone 0.5 is not enough
    assert mnist_cnn.steps_to_threshold(values, 0.5, window=1) == 3
    assert mnist_cnn.steps_to_threshold(values, 0.5, window=2) == 6
    assert mnist_cnn.steps_to_threshold(values, 0.01, window=2) is None
    assert mnist_cnn.steps_to_threshold(values[:1], 10.0, window=2) is None


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
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(
        3, kernel_regularizer=keras.regularizers.L2(0.01), kernel_initializer=keras.initializers.RandomNormal(seed=0))])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, 4, 0.95, staircase=True)
    model.compile(keras.optimizers.SGD(schedule, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[mnist_cnn.BatchCrossEntropy()])
    recorder, before = mnist_cnn.BatchRecorder(tmp_path), WeightsBeforeStep()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[before, recorder])
    expected_ce, expected_loss = [], []
    for step, (kernel, bias) in enumerate(before.weights):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        logits = x[batch].astype(np.float64) @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        ce = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(8), y[batch]])
        expected_ce.append(ce)
        expected_loss.append(ce + 0.01 * np.sum(kernel ** 2))
    assert len(recorder.loss) == 12
    np.testing.assert_allclose(recorder.cross_entropy, expected_ce, rtol=1e-5)
    np.testing.assert_allclose(recorder.loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(recorder.learning_rate, [0.5 * 0.95 ** (s // 4) for s in range(12)], rtol=1e-6)


# ----------------------------------------------------------------------------- the script


def initial_penalties(config):
    plain = mnist_cnn.build_cnn(config)
    twin = mnist_cnn.build_twin(plain, config)
    return {"plain": float(sum(plain.losses)), "overparameterized": float(sum(twin.losses))}


def read_scalars(log_dir, tag):
    values = {}
    for path in pathlib.Path(log_dir).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[k] for k in sorted(values)], sorted(values)


def test_quick_run_on_real_mnist(mnist_dir, tfds_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_dir = mnist_cnn.main(
        ["--quick", "--manual-dir", str(mnist_dir), "--tfds-data-dir", str(tfds_dir[0]), "--out", str(out)]
    )
    assert run_dir == out
    printed = capsys.readouterr().out
    assert "parameters: plain 1,663,370, overparameterized 1,925,614 (+262,244, +15.8%)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["plain"] == PLAIN_PARAMETERS
    assert results["parameters"]["overparameterized"] == TWIN_PARAMETERS
    assert results["steps_per_epoch"] == 10
    penalties = initial_penalties(mnist_cnn.Config.quick())
    for name, model in results["models"].items():
        assert model["steps"] == 20 and len(model["batch_loss"]) == len(model["batch_cross_entropy"]) == 20
        # Full objective minus cross-entropy of the first batch = the initial L2 penalty.
        first_penalty = model["batch_loss"][0] - model["batch_cross_entropy"][0]
        assert first_penalty == pytest.approx(penalties[name], rel=1e-4)
        logged, steps = read_scalars(out / "tensorboard" / name / "batch", "batch_loss")
        assert steps == list(range(1, 21))
        np.testing.assert_allclose(logged, model["batch_loss"], rtol=1e-6)
        assert 0.0 <= model["test_accuracy"] <= 1.0
    _, diagnostic_steps = read_scalars(out / "tensorboard" / "overparameterized" / "overparam", "fc1/balancedness")
    assert diagnostic_steps == [0, 10, 20]
    assert set(results["thresholds_cross_entropy"]) == {"2", "1.5", "1"}
    assert (out / "batch_loss.png").stat().st_size > 10_000
    # Collapse: recomputed here from the saved model on the same 256 test images.
    collapsed = results["collapse"]
    assert collapsed["passed"] and collapsed["argmax_equal"]
    assert collapsed["parameters"] == PLAIN_PARAMETERS
    deployed = keras.saving.load_model(out / collapsed["path"])
    (test,) = mnist.load_mnist(("test",), data_dir=tfds_dir[0])
    x, y = next(iter(test.take(256).batch(256)))
    accuracy = float(np.mean(np.argmax(deployed.predict(mnist.scale_images(x), verbose=0), 1) == y.numpy()))
    assert accuracy == collapsed["test_accuracy"] == results["models"]["overparameterized"]["test_accuracy"]


def test_quick_run_under_mirrored_strategy_in_a_subprocess(mnist_dir, tfds_dir, tmp_path):
    out = tmp_path / "mirrored"
    command = [sys.executable, "-m", "experiments.mnist_cnn", "--quick", "--epochs", "1", "--steps", "3",
               "--strategy", "mirrored", "--manual-dir", str(mnist_dir), "--tfds-data-dir", str(tfds_dir[0]),
               "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["replicas"] == 2
    penalties = initial_penalties(mnist_cnn.Config.quick())
    for name, model in results["models"].items():
        assert model["steps"] == 3
        # Loss and cross-entropy are aggregated over both replicas consistently.
        assert model["batch_loss"][0] - model["batch_cross_entropy"][0] == pytest.approx(penalties[name], rel=1e-4)
    assert results["collapse"]["passed"]


# ----------------------------------------------------------------------------- issue 13


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
        mnist_cnn.main(["--quick", "--manual-dir", str(folder), "--tfds-data-dir", str(tmp_path / "t"), "--out", str(out)])
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


def test_interrupted_run_resumes_keeping_the_finished_model(mnist_dir, tfds_dir, tmp_path, capsys, monkeypatch):
    argv = ["--quick", "--epochs", "1", "--steps", "3", "--manual-dir", str(mnist_dir),
            "--tfds-data-dir", str(tfds_dir[0])]
    reference = json.loads((mnist_cnn.main([*argv, "--out", str(tmp_path / "ref")]) / "results.json").read_text())
    train_one = mnist_cnn.train_one

    def interrupt_the_twin(name, *args):
        if name == "overparameterized":
            raise KeyboardInterrupt
        return train_one(name, *args)

    run = tmp_path / "run"
    monkeypatch.setattr(mnist_cnn, "train_one", interrupt_the_twin)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mnist_cnn.main([*argv, "--out", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 130 and len(lines) == 1
    assert lines[0] == (f"interrupted: kept plain (of plain, overparameterized) in {run}; continue with: "
                        f"python -m experiments.mnist_cnn --resume {run} {' '.join(argv)}")
    kept = json.loads((run / "results.json").read_text())["models"]
    assert list(kept) == ["plain"]

    monkeypatch.setattr(mnist_cnn, "train_one", train_one)
    mnist_cnn.main(["--resume", str(run), *argv])
    assert "plain: kept from the resumed run" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["models"]["plain"] == kept["plain"]  # kept, not retrained
    for name in ("plain", "overparameterized"):
        np.testing.assert_allclose(
            results["models"][name]["batch_loss"], reference["models"][name]["batch_loss"], rtol=1e-6
        )
        assert read_scalars(run / "tensorboard" / name / "batch", "batch_loss")[1] == [1, 2, 3]  # no step twice
    assert results["collapse"]["passed"]
