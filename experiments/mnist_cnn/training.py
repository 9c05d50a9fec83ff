"""Training one (arm, seed) model of the MNIST experiment: the data, the devices, the fit with
its per-batch record and TensorBoard logs, the collapse check of a twin, and its files."""

import os
import platform
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from experiments.common.run_folder import write_json_atomic
from experiments.data import mnist
from experiments.mnist_cnn.curves import batch_penalty, running_mean
from experiments.mnist_cnn.models import build_arm, compile_model
from experiments.mnist_cnn.protocol import COLLAPSE_RTOL, stream_seed
from experiments.mnist_cnn.recording import BatchRecorder
from experiments.mnist_cnn.run_state import model_files, tensorboard_dir
from tf_overparam import collapse, diagnostics
from tf_overparam.callbacks import OverparamTensorBoard, find_overparam_layers
from tf_overparam.layers import OverparamDense

# ----------------------------------------------------------------------------- data & devices


def configure_cpu_replicas(count=2):
    """Splits the CPU into `count` logical devices (must run before TensorFlow initialises)
    and returns their names."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        pass  # already initialised; fine if it already has the devices
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < count:
        raise RuntimeError(
            f"--strategy mirrored needs {count} logical CPU devices, but TensorFlow was initialised "
            f"with {len(logical)}; run it in a fresh process."
        )
    return [device.name for device in logical[:count]]


def make_strategy(name):
    """The tf.distribute strategy: "mirrored" over all GPUs when there are at least 2, else
    over 2 logical CPU devices; "none" the default (single-device) strategy."""
    if name == "mirrored":
        if len(tf.config.list_physical_devices("GPU")) >= 2:  # listing physical devices initialises nothing
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy(devices=configure_cpu_replicas(2))
    return tf.distribute.get_strategy()


def machine_record(strategy):
    """Where the run trains, for config.json and results.json."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "replicas": strategy.num_replicas_in_sync,
        "load_average_at_start": os.getloadavg(),
    }


def load_data(config):
    """(train, validation, test): the training split unbatched, the other two as evaluation
    pipelines. A first preparation by tfds says so in one line instead of its progress bars."""
    if not mnist.is_prepared(config.tfds_data_dir):
        import absl.logging
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        absl.logging.set_verbosity(absl.logging.ERROR)
        print(f"preparing MNIST in {mnist.tfds_data_dir(config.tfds_data_dir)} (once)", flush=True)
    train, validation, test = mnist.load_mnist(
        (f"train[{config.validation_size}:]", f"train[:{config.validation_size}]", "test"),
        manual_dir=config.manual_dir,
        data_dir=config.tfds_data_dir,
    )
    validation = mnist.eval_pipeline(validation, batch_size=config.eval_batch_size, take=config.validation_examples)
    test = mnist.eval_pipeline(test, batch_size=config.eval_batch_size, take=config.test_examples)
    return train, validation, test


def train_batches(config, train):
    """The training pipeline of seed `config.seed`; call once per model: the same seed gives the
    same batches in the same order."""
    batches = mnist.train_pipeline(
        train, batch_size=config.batch_size, seed=stream_seed(config.seed, "shuffle"), take=config.train_examples
    )
    return batches.take(config.steps) if config.steps else batches


# ----------------------------------------------------------------------------- one model


def dense_state(model):
    """Per dense layer: its end-to-end spectral norm and, for chains, balancedness."""
    state = {}
    for layer in model.layers:
        if isinstance(layer, (OverparamDense, keras.layers.Dense)):
            state[layer.name] = {"spectral_norm": diagnostics.spectral_norm(keras.ops.convert_to_numpy(layer.kernel))}
        if isinstance(layer, OverparamDense):
            balance = diagnostics.balancedness(layer)
            state[layer.name].update(balancedness=balance.absolute, balancedness_relative=balance.relative)
    return state


def train_one(arm, model, config, data, run_dir):
    """Fits one arm's model at seed `config.seed`; returns (results dict, its test-set logits).
    TensorBoard: scalars per epoch and per batch, the twins' diagnostics every
    `config.diagnostics_every` steps, and their factors' histograms only if `config.histograms`."""
    train, validation, test = data
    tensorboard = tensorboard_dir(run_dir, arm, config.seed)
    recorder = BatchRecorder(tensorboard / "batch")
    callbacks = [keras.callbacks.TensorBoard(str(tensorboard), update_freq="epoch", write_graph=False), recorder]
    if find_overparam_layers(model):
        callbacks.append(
            OverparamTensorBoard(str(tensorboard), update_freq=config.diagnostics_every, histograms=config.histograms)
        )
    initial_state = dense_state(model)
    keras.utils.set_random_seed(stream_seed(config.seed, "fit"))
    started = time.perf_counter()
    history = model.fit(
        train_batches(config, train),
        epochs=config.epochs,
        validation_data=validation,
        callbacks=callbacks,
        shuffle=False,
        verbose=2 if config.train_examples is None else 0,
    )
    fit_seconds = time.perf_counter() - started
    test_loss = model.evaluate(test, verbose=0, return_dict=True)["loss"]
    logits = model.predict(test, verbose=0)
    labels = np.concatenate([y.numpy() for _, y in test])
    test_accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    steps = len(recorder.loss)
    results = {
        "arm": arm,
        "seed": config.seed,
        "parameters": int(model.count_params()),
        "steps": steps,
        "fit_seconds": fit_seconds,
        "seconds_per_step": fit_seconds / max(steps, 1),
        "median_batch_seconds": float(np.median(recorder.seconds[1:] or recorder.seconds)),
        "load_average": os.getloadavg(),
        "test_loss": float(test_loss),
        "test_accuracy": test_accuracy,
        "test_error_percent": 100.0 * (1.0 - test_accuracy),
        "epochs": {k: [float(v) for v in values] for k, values in history.history.items()},
        "dense_initial": initial_state,
        "dense_final": dense_state(model),
        "batch_cross_entropy": recorder.cross_entropy,
        "batch_loss": recorder.loss,
        "batch_learning_rate": recorder.learning_rate,
    }
    penalty = batch_penalty(results)
    results.update(
        initial_penalty=float(penalty[0]),
        final_running_mean_cross_entropy=float(running_mean(recorder.cross_entropy, config.window)[-1]),
        final_running_mean_penalty=float(running_mean(penalty, config.window)[-1]),
        final_running_mean_loss=float(running_mean(recorder.loss, config.window)[-1]),
    )
    return results, logits


def without_training_state(model):
    """A copy of `model` with its weights and no optimizer: what is saved and deployed."""
    copy = keras.Sequential.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def check_collapse(twin, twin_logits, test, scratch):
    """Collapses the twin and checks that it predicts the same, and that a copy saved to the
    `.keras` file `scratch` and loaded again predicts exactly as before. The file is removed
    afterwards: `collapse(twin)` of the saved twin gives the same model again."""
    collapsed = without_training_state(collapse(twin))
    logits = collapsed.predict(test, verbose=0)
    try:
        collapsed.save(scratch)
        reloaded_logits = keras.saving.load_model(scratch).predict(test, verbose=0)
    finally:
        scratch.unlink(missing_ok=True)
    scale = max(1.0, float(np.max(np.abs(twin_logits))))
    difference = float(np.max(np.abs(logits - twin_logits)))
    labels = np.concatenate([y.numpy() for _, y in test])
    result = {
        "parameters": int(collapsed.count_params()),
        "max_abs_logit_difference": difference,
        "max_abs_logit": scale,
        "tolerance": COLLAPSE_RTOL * scale,
        "reloaded_max_abs_logit_difference": float(np.max(np.abs(reloaded_logits - logits))),
        "argmax_equal": bool(np.array_equal(np.argmax(logits, 1), np.argmax(twin_logits, 1))),
        "test_accuracy": float(np.mean(np.argmax(logits, 1) == labels)),
    }
    result["passed"] = bool(
        difference <= result["tolerance"]
        and result["argmax_equal"]
        and result["reloaded_max_abs_logit_difference"] == 0.0
    )
    return result


def save_atomic(save, path, suffix):
    """`save(temporary path ending in suffix)`, then renamed to `path`: never a half-written file."""
    temporary = path.with_name(f".{path.name}.partial{suffix}")
    try:
        save(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def train_and_save(arm, config, data, steps_per_epoch, run_dir, strategy):
    """Builds, trains and saves one arm at seed `config.seed`: its weights (no optimizer state;
    `build_arm(arm, config).load_weights(path)` restores the model), then the record, each
    atomically; the record marks it finished. Returns the record."""
    record_path, weights_path = model_files(run_dir, arm, config.seed)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        model = build_arm(arm, config)
        compile_model(model, config, steps_per_epoch, arm)
    shutil.rmtree(tensorboard_dir(run_dir, arm, config.seed), ignore_errors=True)  # an interrupted try's
    results, logits = train_one(arm, model, config, data, run_dir)
    save_atomic(without_training_state(model).save_weights, weights_path, ".weights.h5")
    if find_overparam_layers(model):
        scratch = record_path.with_name(f".{record_path.stem}.collapsed.partial.keras")
        results["collapse"] = check_collapse(model, logits, data[2], scratch)
    write_json_atomic(record_path, results)
    print(
        f"{arm}/{config.seed}: test accuracy {results['test_accuracy']:.4f}, "
        f"{results['fit_seconds']:.0f} s ({results['seconds_per_step'] * 1000:.0f} ms/step)"
    )
    return results
