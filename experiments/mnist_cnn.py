"""The paper's MNIST experiment: the TensorFlow tutorial CNN against its overparameterized twin.

    python -m experiments.mnist_cnn --manual-dir ../shared/data/mnist [--epochs 10] [--quick]

Arora, Cohen & Hazan (2018, Section 8) replace each dense weight matrix of the
TensorFlow MNIST tutorial network (tensorflow/models, tutorials/image/mnist/convolutional.py) by
a product of two matrices (about +15% parameters) and report "optimization accelerated by
orders of magnitude" in batch loss. This script trains both models with the same recipe:

- Network (the tutorial's): conv 5x5x32 SAME relu -> max-pool 2 -> conv 5x5x64 SAME relu ->
  max-pool 2 -> flatten (3136) -> dense 512 relu -> dropout 0.5 -> dense 10 (logits).
  Weights truncated normal std 0.1; biases 0 for conv1, 0.1 for the others. Inputs scaled as
  the tutorial does, (x - 127.5) / 255, in [-0.5, 0.5].
- Twin: `tf_overparam.overparameterize(depth=2)`, hidden width = each layer's output width
  (3136->512->512 and 512->10->10). It starts from the plain model's convolution weights and
  all biases (copied). `--overparameterize dense,conv` expands the two convolutions too
  (`OverparamConv2D` channel chains: the 5x5xcin x cout kernel as a product of two matrices,
  hidden width = filters). Its factors (`--factor-init`):
    tutorial  (default) each factor drawn like every tutorial matrix, truncated normal std 0.1:
              "simply placing two matrices in succession" as the paper describes it. The
              end-to-end kernels start different from (and larger than) the plain ones.
    balanced  a balanced factorisation of the plain model's kernels (`preserve_function=True`):
              both models start as the same function, so any difference in the curves comes
              from the optimisation geometry alone.
- Objective: mean softmax cross-entropy + the tutorial's 5e-4 * sum(tf.nn.l2_loss) over the
  dense weights and biases, i.e. keras `L2(2.5e-4)` (L2(l) = l * sum(w^2)). For the twin the
  penalty is by default on the end-to-end kernel (`kernel_regularizer`), so both models
  minimise the same function of their end-to-end weights; `--regularize factors` puts
  `L2(2.5e-4)` on each factor instead (`factor_regularizer`; the paper's eq. 11 weight decay).
- Optimizer: the tutorial's momentum 0.9 (Keras SGD momentum; TF1's MomentumOptimizer differs
  only in when a changed learning rate enters the velocity), learning rate 0.01 decayed x0.95
  per epoch (staircase), batch 64, 10 epochs; `--optimizer sgd` (plain, lr 0.01) or
  `adam` (lr 0.001) as options.
- Data: tfds MNIST; like the tutorial, 5000 training images are held out for validation
  (tfds' `train[:5000]`), 55000 train (859 full batches per epoch, 8590 steps in 10 epochs),
  the 10000 test images are only evaluated at the end. Both models see the same batches in
  the same order (one shuffle seed) and the same dropout masks (seeded dropout layer).

A run folder (`--out`, default runs/mnist_cnn/<UTC time>) holds config.json, results.json
(rewritten atomically after each model), each trained model's `<name>.weights.h5` (`--resume
<run>` keeps the finished ones), batch_loss.png, the collapsed twin
`overparameterized_collapsed.keras` and TensorBoard logs (`tensorboard --logdir <run>/tensorboard`):
per model `train`/`validation` (Keras, per epoch), `batch` (the raw loss of every batch) and,
for the twin, `overparam` (`tf_overparam.callbacks.OverparamTensorBoard`: balancedness,
end-to-end singular values, effective learning rate).

"Batch loss" is the loss of each training batch at the weights before its step, as the
tutorial prints it ("Minibatch loss"): the cross-entropy part and the full objective (with the
L2 penalty). Steps to a threshold use a trailing running mean over `Config.window` (50) batches, so a
single lucky batch does not count.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import time

import numpy as np

from experiments import _runstate
from experiments._common import (
    RunInterrupted,
    cli,
    format_seconds,
    lazy_import,
    lazy_keras_tensorflow_pyplot,
    make_run_dir,
    resume_command,
    quiet_tensorflow,
    user_errors,
    write_json_atomic,
)

# TensorFlow, Keras and matplotlib load at first use: --help and argument errors return at once.
keras, tf, plt = lazy_keras_tensorflow_pyplot()
diagnostics = lazy_import("tf_overparam.diagnostics")
overparam_callbacks = lazy_import("tf_overparam.callbacks")
mnist = lazy_import("tf_overparam.datasets.mnist")
layers = lazy_import("tf_overparam.layers")
models_module = lazy_import("tf_overparam.models")
_keras_classes = lazy_import("experiments._mnist_keras")
MNIST_ENV_VAR = "TF_OVERPARAM_MNIST_DIR"  # tf_overparam.datasets.mnist.ENV_VAR (tested)
NUM_TRAIN = 60000  # tf_overparam.datasets.mnist.NUM_TRAIN


def __getattr__(name):
    """`BatchCrossEntropy` and `BatchRecorder` live in `experiments._mnist_keras` (Keras
    subclasses: importing them imports Keras)."""
    if name in ("BatchCrossEntropy", "BatchRecorder"):
        return getattr(_keras_classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


OPTIMIZERS = ("momentum", "sgd", "adam")
DEFAULT_LEARNING_RATES = {"momentum": 0.01, "sgd": 0.01, "adam": 0.001}
FACTOR_INITS = ("tutorial", "balanced")
REGULARIZE = ("end_to_end", "factors")
MODELS = ("plain", "overparameterized")
# `--overparameterize` kinds: the plain layer classes the twin expands.
EXPANDABLE = {"dense": "Dense", "conv": "Conv2D"}  # --overparameterize kind -> keras.layers class name
# Collapse check: max |logit difference| <= COLLAPSE_RTOL * max(1, max |logit|).
COLLAPSE_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run; defaults are the tutorial's recipe (and its seed, 66478)."""

    epochs: int = 10
    steps: int = None  # cap on steps per epoch
    batch_size: int = 64
    eval_batch_size: int = 500  # validation and test; every replica must get examples
    optimizer: str = "momentum"
    learning_rate: float = None  # None: DEFAULT_LEARNING_RATES[optimizer]
    decay_rate: float = 0.95  # per epoch, staircase
    momentum: float = 0.9
    l2: float = 5e-4  # the tutorial's coefficient of sum(tf.nn.l2_loss) = 0.5 * ||w||^2
    regularize: str = "end_to_end"
    factor_init: str = "tutorial"
    overparameterize: tuple = ("dense",)  # keys of EXPANDABLE
    init_stddev: float = 0.1
    dropout: float = 0.5
    seed: int = 66478
    validation_size: int = 5000
    train_examples: int = None  # None: all 55000; else the first n (CI scale)
    validation_examples: int = None
    test_examples: int = None
    window: int = 50  # batches in the running mean of the thresholds
    thresholds: tuple = (1.0, 0.3, 0.1, 0.03)  # on the batch cross-entropy
    loss_thresholds: tuple = ()  # on the full batch objective; () = from the curves
    diagnostics_every: int = 100  # steps between OverparamTensorBoard values
    strategy: str = "none"
    manual_dir: str = None
    tfds_data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: 640 training examples (10 steps per epoch), 2 epochs, seconds."""
        quick = dict(
            epochs=2, train_examples=640, validation_examples=128, test_examples=256, eval_batch_size=64,
            window=5, thresholds=(2.0, 1.5, 1.0), diagnostics_every=10,
        )
        return cls(**{**quick, **overrides})

    @property
    def resolved_learning_rate(self):
        return DEFAULT_LEARNING_RATES[self.optimizer] if self.learning_rate is None else self.learning_rate


# ----------------------------------------------------------------------------- models


def build_cnn(config):
    """The tutorial CNN as a Keras Sequential model with logits output."""
    std, seed = config.init_stddev, config.seed

    def normal(offset):
        return keras.initializers.TruncatedNormal(stddev=std, seed=seed + offset)

    l2 = keras.regularizers.L2(config.l2 / 2.0) if config.l2 else None  # l2=0: no penalty at all
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", kernel_initializer=normal(0),
                                bias_initializer="zeros", name="conv1"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool1"),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu", kernel_initializer=normal(1),
                                bias_initializer=keras.initializers.Constant(0.1), name="conv2"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(512, activation="relu", kernel_initializer=normal(2),
                               bias_initializer=keras.initializers.Constant(0.1),
                               kernel_regularizer=l2, bias_regularizer=l2, name="fc1"),
            keras.layers.Dropout(config.dropout, seed=seed, name="dropout"),
            keras.layers.Dense(10, kernel_initializer=normal(3), bias_initializer=keras.initializers.Constant(0.1),
                               kernel_regularizer=l2, bias_regularizer=l2, name="fc2"),
        ],
        name="plain",
    )


def build_twin(plain, config):
    """The depth-2 overparameterized copy of `plain` (the layers not expanded and biases copied)."""
    expanded = tuple(getattr(keras.layers, EXPANDABLE[kind]) for kind in config.overparameterize)
    if config.factor_init == "balanced":
        twin = models_module.overparameterize(plain, depth=2, preserve_function=True, seed=config.seed, layers=expanded)
    else:
        init = keras.initializers.TruncatedNormal(stddev=config.init_stddev, seed=config.seed + 10)
        twin = models_module.overparameterize(plain, depth=2, factor_initializer=init, layers=expanded)
    if config.regularize == "factors":
        # Same weights, the penalty moved from the end-to-end kernel to each factor.
        model_config = twin.get_config()
        for layer in model_config["layers"]:
            if layer["class_name"].endswith("OverparamDense"):
                layer["config"]["factor_regularizer"] = layer["config"]["kernel_regularizer"]
                layer["config"]["kernel_regularizer"] = None
        rebuilt = keras.Sequential.from_config(model_config)
        rebuilt.set_weights(twin.get_weights())
        twin = rebuilt
    twin.name = "overparameterized"
    return twin


def make_optimizer(config, steps_per_epoch):
    rate = keras.optimizers.schedules.ExponentialDecay(
        config.resolved_learning_rate, decay_steps=steps_per_epoch, decay_rate=config.decay_rate, staircase=True
    )
    if config.optimizer == "momentum":
        return keras.optimizers.SGD(rate, momentum=config.momentum)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate)
    return keras.optimizers.Adam(rate)


def compile_model(model, config, steps_per_epoch):
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", _keras_classes.BatchCrossEntropy()],
    )


# ----------------------------------------------------------------------------- per-batch record


def batch_values_from_running_means(means):
    """The per-batch values of one epoch from Keras' running means over equal-size batches:
    value_k = (k + 1) m_k - k m_{k-1} (k from 0)."""
    means = np.asarray(means, dtype=np.float64)
    k = np.arange(means.size, dtype=np.float64)
    previous = np.concatenate([[0.0], means[:-1]])
    return (k + 1) * means - k * previous


def running_mean(values, window):
    """Trailing mean over `window` values (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def steps_to_threshold(values, threshold, window):
    """The first step count n (1-based) whose trailing mean over the full `window` batches
    n - window + 1 .. n is <= threshold, or None."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < window:
        return None
    means = running_mean(values, window)[window - 1:]
    hits = np.flatnonzero(means <= threshold)
    return int(hits[0] + window) if hits.size else None


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


def load_data(config):
    """(train split, validation split, test split) as unbatched uint8 datasets."""
    train, validation, test = mnist.load_mnist(
        (f"train[{config.validation_size}:]", f"train[:{config.validation_size}]", "test"),
        manual_dir=config.manual_dir, data_dir=config.tfds_data_dir,
    )
    return train, validation, test


def train_batches(config, train):
    """The training pipeline; call once per model: the same seed gives the same batches."""
    batches = mnist.train_pipeline(train, batch_size=config.batch_size, seed=config.seed, take=config.train_examples)
    return batches.take(config.steps) if config.steps else batches


def count_train_steps(config):
    examples = config.train_examples or (NUM_TRAIN - config.validation_size)
    steps = examples // config.batch_size
    return min(steps, config.steps) if config.steps else steps


# ----------------------------------------------------------------------------- run


def dense_state(model):
    """Per dense layer: its end-to-end spectral norm and, for chains, balancedness."""
    state = {}
    for layer in model.layers:
        if isinstance(layer, (layers.OverparamDense, keras.layers.Dense)):
            state[layer.name] = {"spectral_norm": diagnostics.spectral_norm(keras.ops.convert_to_numpy(layer.kernel))}
        if isinstance(layer, layers.OverparamDense):
            balance = diagnostics.balancedness(layer)
            state[layer.name].update(balancedness=balance.absolute, balancedness_relative=balance.relative)
    return state


def train_one(name, model, config, data, steps_per_epoch, run_dir):
    """Fits one model; returns (results dict, its test-set logits)."""
    train, validation, test = data
    tensorboard = run_dir / "tensorboard" / name
    recorder = _keras_classes.BatchRecorder(tensorboard / "batch")
    callbacks = [keras.callbacks.TensorBoard(str(tensorboard), update_freq="epoch", write_graph=False), recorder]
    if overparam_callbacks.find_overparam_layers(model):
        callbacks.append(overparam_callbacks.OverparamTensorBoard(str(tensorboard), update_freq=config.diagnostics_every))
    initial_state = dense_state(model)
    keras.utils.set_random_seed(config.seed)
    started = time.perf_counter()
    history = model.fit(
        train_batches(config, train), epochs=config.epochs, validation_data=validation,
        callbacks=callbacks, shuffle=False, verbose=2 if config.train_examples is None else 0,
    )
    fit_seconds = time.perf_counter() - started
    test_loss = model.evaluate(test, verbose=0, return_dict=True)["loss"]
    logits = model.predict(test, verbose=0)
    labels = np.concatenate([y.numpy() for _, y in test])
    test_accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    steps = len(recorder.loss)
    results = {
        "parameters": int(model.count_params()),
        "steps": steps,
        "fit_seconds": fit_seconds,
        "seconds_per_step": fit_seconds / max(steps, 1),
        "median_batch_seconds": float(np.median(recorder.seconds[1:] or recorder.seconds)),
        "test_loss": float(test_loss),
        "test_accuracy": test_accuracy,
        "test_error_percent": 100.0 * (1.0 - test_accuracy),
        "epochs": {k: [float(v) for v in values] for k, values in history.history.items()},
        "final_running_mean_cross_entropy": float(running_mean(recorder.cross_entropy, config.window)[-1]),
        "final_running_mean_loss": float(running_mean(recorder.loss, config.window)[-1]),
        "dense_initial": initial_state,
        "dense_final": dense_state(model),
        "batch_cross_entropy": recorder.cross_entropy,
        "batch_loss": recorder.loss,
        "batch_learning_rate": recorder.learning_rate,
    }
    return results, logits


def threshold_table(models, thresholds, key, window):
    table = {}
    for threshold in thresholds:
        row = {name: steps_to_threshold(results[key], threshold, window) for name, results in models.items()}
        plain, twin = row.get("plain"), row.get("overparameterized")
        row["speedup"] = plain / twin if plain and twin else None
        table[f"{threshold:g}"] = row
    return table


def loss_thresholds(config, models):
    """Thresholds on the full objective (its floor is the L2 penalty, not 0): given, or 2x,
    1.25x and 1x the higher of the two models' final running means, so that both models reach
    them (1x: the level where the slower model ends)."""
    if config.loss_thresholds:
        return tuple(config.loss_thresholds)
    finals = [r["final_running_mean_loss"] for r in models.values() if "final_running_mean_loss" in r]
    if len(finals) < 2:
        return ()
    level = max(finals)
    return tuple(factor * level for factor in (2.0, 1.25, 1.0))


def check_collapse(twin, twin_logits, test, run_dir):
    """Collapses the twin, checks it predicts the same, saves and reloads it."""
    folded = models_module.collapse(twin)
    # The deployment copy carries no training state (collapse copies the compile config).
    collapsed = keras.Sequential.from_config(folded.get_config())
    collapsed.set_weights(folded.get_weights())
    logits = collapsed.predict(test, verbose=0)
    path = run_dir / "overparameterized_collapsed.keras"
    collapsed.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded_logits = reloaded.predict(test, verbose=0)
    scale = max(1.0, float(np.max(np.abs(twin_logits))))
    difference = float(np.max(np.abs(logits - twin_logits)))
    labels = np.concatenate([y.numpy() for _, y in test])
    result = {
        "path": path.name,
        "parameters": int(collapsed.count_params()),
        "max_abs_logit_difference": difference,
        "max_abs_logit": scale,
        "tolerance": COLLAPSE_RTOL * scale,
        "reloaded_max_abs_logit_difference": float(np.max(np.abs(reloaded_logits - logits))),
        "argmax_equal": bool(np.array_equal(np.argmax(logits, 1), np.argmax(twin_logits, 1))),
        "test_accuracy": float(np.mean(np.argmax(logits, 1) == labels)),
    }
    result["passed"] = bool(
        difference <= result["tolerance"] and result["argmax_equal"]
        and result["reloaded_max_abs_logit_difference"] == 0.0
    )
    return result


def plot_curves(path, models, config, thresholds):
    """Batch cross-entropy and full batch objective of both models: raw (faint) and the
    running mean over `config.window` batches; log y."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, title in (
        (axes[0], "batch_cross_entropy", "batch cross-entropy"),
        (axes[1], "batch_loss", "batch loss (cross-entropy + L2 penalty)"),
    ):
        for i, (name, results) in enumerate(models.items()):
            values = np.asarray(results[key])
            steps = np.arange(1, values.size + 1)
            ax.plot(steps, values, color=f"C{i}", alpha=0.2, linewidth=0.5)
            ax.plot(steps, running_mean(values, config.window), color=f"C{i}",
                    label=f"{name} ({results['parameters']:,} parameters)")
        if key == "batch_cross_entropy":
            for threshold in thresholds:
                ax.axhline(threshold, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step (batch of 64)")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"faint: every batch; solid: mean of the last {config.window} batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="epochs (default 10, the tutorial's)")
    parser.add_argument("--steps", type=int, help="cap on steps per epoch (default: the whole training set)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="momentum",
                        help="momentum 0.9 (default, the tutorial's), plain sgd, or adam")
    parser.add_argument("--learning-rate", type=float,
                        help="initial learning rate (default 0.01; adam 0.001), decayed x0.95 per epoch")
    parser.add_argument("--factor-init", choices=FACTOR_INITS, default="tutorial",
                        help="twin's factors: truncated normal std 0.1 each (default), or a balanced "
                        "factorisation of the plain kernels (same starting function)")
    parser.add_argument("--regularize", choices=REGULARIZE, default="end_to_end",
                        help="twin's L2: on the end-to-end kernel (default, same objective) or on each factor")
    parser.add_argument("--overparameterize", default="dense",
                        help="comma-separated layer kinds the twin expands: dense (default), conv, or dense,conv")
    parser.add_argument("--seed", type=int, default=66478, help="seed of weights, shuffling and dropout")
    parser.add_argument("--strategy", choices=("none", "mirrored"), default="none",
                        help="mirrored: tf.distribute.MirroredStrategy over 2 GPUs, or 2 logical CPU devices")
    parser.add_argument("--manual-dir", help=f"folder of the four MNIST *-ubyte.gz files (or set {MNIST_ENV_VAR})")
    parser.add_argument("--tfds-data-dir",
                        help="where tfds keeps the prepared data (default tfds': ~/tensorflow_datasets)")
    parser.add_argument("--out", help="output folder, new or empty (default runs/mnist_cnn/<UTC time>)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the interrupted run in DIR: finished models are kept (same options)")
    parser.add_argument("--quick", action="store_true",
                        help="CI scale: 640 training examples, 2 epochs (the full run: about 1 hour on 2 CPU cores)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if args.resume and args.out:
        parser.error("--resume continues a run in its own folder; leave out --out")
    for name in ("epochs", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive int, got {value}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    kinds = tuple(dict.fromkeys(kind.strip() for kind in args.overparameterize.split(",")))
    if not kinds or not set(kinds) <= set(EXPANDABLE):
        parser.error(f"--overparameterize must be a comma-separated subset of {sorted(EXPANDABLE)}, "
                     f"got {args.overparameterize!r}")
    overrides = dict(
        optimizer=args.optimizer, learning_rate=args.learning_rate, factor_init=args.factor_init,
        regularize=args.regularize, seed=args.seed, strategy=args.strategy, manual_dir=args.manual_dir,
        tfds_data_dir=args.tfds_data_dir, out=args.resume or args.out, steps=args.steps, overparameterize=kinds,
    )
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return Config.quick(**overrides) if args.quick else Config(**overrides), args


# Measured on the full run (2 CPU cores): 91 ms per step for the plain model, 271 for the twin.
SECONDS_PER_STEP = {"plain": 0.091, "overparameterized": 0.271}


def open_run(config, resume):
    """(run folder, results of the finished models): a new folder, or with `resume` the folder
    of a run with the same config, whose finished models are kept."""
    if not resume:
        return make_run_dir(config.out, "mnist_cnn"), {}
    run_dir = pathlib.Path(config.out)
    _runstate.check_same_config(run_dir, dataclasses.asdict(config), ignore=("out", "manual_dir", "tfds_data_dir"))
    results = run_dir / "results.json"
    finished = json.loads(results.read_text()).get("models", {}) if results.exists() else {}
    return run_dir, {name: r for name, r in finished.items() if (run_dir / f"{name}.weights.h5").exists()}


@cli
def main(argv=None):
    config, args = parse_args(argv)
    quiet_tensorflow()
    strategy = make_strategy(config.strategy)  # before anything initialises TensorFlow
    started = time.time()
    with user_errors():
        data = load_data(config)
    train, validation, test = data
    validation = mnist.eval_pipeline(validation, batch_size=config.eval_batch_size, take=config.validation_examples)
    test = mnist.eval_pipeline(test, batch_size=config.eval_batch_size, take=config.test_examples)
    data = (train, validation, test)
    steps_per_epoch = count_train_steps(config)
    run_dir, finished = open_run(config, resume=args.resume is not None)
    machine = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "strategy": config.strategy,
        "replicas": strategy.num_replicas_in_sync,
    }
    estimate = sum(SECONDS_PER_STEP.values()) * steps_per_epoch * config.epochs
    print(f"output: {run_dir}\nsteps per epoch: {steps_per_epoch}, epochs: {config.epochs}, "
          f"replicas: {strategy.num_replicas_in_sync}\n2 models ({', '.join(finished) or 'none'} finished); "
          f"estimated total time {format_seconds(estimate)}")
    if not finished:
        write_json_atomic(run_dir / "config.json", {**dataclasses.asdict(config), "machine": machine})

    with strategy.scope():
        plain = build_cnn(config)
        twin = build_twin(plain, config)
        compile_model(plain, config, steps_per_epoch)
        compile_model(twin, config, steps_per_epoch)
    counts = {"plain": int(plain.count_params()), "overparameterized": int(twin.count_params())}
    parameters = {
        **counts, "increase": counts["overparameterized"] - counts["plain"],
        "increase_percent": 100.0 * (counts["overparameterized"] / counts["plain"] - 1.0),
    }
    print(f"parameters: plain {counts['plain']:,}, overparameterized {counts['overparameterized']:,} "
          f"(+{parameters['increase']:,}, +{parameters['increase_percent']:.1f}%)")

    models, logits = {}, {}
    results = {
        "config": dataclasses.asdict(config), "machine": machine, "steps_per_epoch": steps_per_epoch,
        "parameters": parameters, "models": models,
    }
    try:
        for name, model in (("plain", plain), ("overparameterized", twin)):
            models[name], logits[name] = train_or_restore(name, model, config, data, steps_per_epoch, run_dir, finished)
            results["seconds"] = time.time() - started
            write_json_atomic(run_dir / "results.json", results)
    except KeyboardInterrupt:
        kept = ", ".join(models) or "no model"
        raise RunInterrupted(f"kept {kept} (of plain, overparameterized) in {run_dir}; continue with: "
                             f"{resume_command('experiments.mnist_cnn', run_dir, argv)}") from None

    results["thresholds_cross_entropy"] = threshold_table(
        models, config.thresholds, "batch_cross_entropy", config.window
    )
    results["thresholds_loss"] = threshold_table(
        models, loss_thresholds(config, models), "batch_loss", config.window
    )
    results["window"] = config.window
    results["collapse"] = check_collapse(twin, logits["overparameterized"], test, run_dir)
    plot_curves(run_dir / "batch_loss.png", models, config, config.thresholds)
    results["seconds"] = time.time() - started
    write_json_atomic(run_dir / "results.json", results)
    print_summary(results)
    if not results["collapse"]["passed"]:
        raise AssertionError(f"collapsed model does not predict as the overparameterized one: {results['collapse']}")
    return run_dir


def train_or_restore(name, model, config, data, steps_per_epoch, run_dir, finished):
    """Trains one model and saves its weights, or for a model `finished` in the resumed run
    loads its weights and keeps its results. Returns (results, test logits)."""
    weights = run_dir / f"{name}.weights.h5"
    if name in finished:
        model.optimizer.build(model.trainable_variables)  # its saved state is restored too
        model.load_weights(weights)
        print(f"{name}: kept from the resumed run")
        return finished[name], model.predict(data[2], verbose=0)
    shutil.rmtree(run_dir / "tensorboard" / name, ignore_errors=True)  # an interrupted try's partial logs
    results, logits = train_one(name, model, config, data, steps_per_epoch, run_dir)
    model.save_weights(weights)
    print(f"{name}: test accuracy {results['test_accuracy']:.4f}, "
          f"{results['fit_seconds']:.0f} s ({results['seconds_per_step'] * 1000:.0f} ms/step)")
    return results, logits


def print_summary(results):
    models, window = results["models"], results["window"]
    print(f"\n{'model':18s} {'parameters':>11s} {'test acc':>9s} {'s/step':>7s} "
          f"{'final CE':>9s} {'final loss':>10s}  (final: mean of last {window} batches)")
    for name, r in models.items():
        print(f"{name:18s} {r['parameters']:11,d} {r['test_accuracy']:9.4f} {r['seconds_per_step']:7.3f} "
              f"{r['final_running_mean_cross_entropy']:9.4f} {r['final_running_mean_loss']:10.4f}")
    for title, key in (("batch cross-entropy", "thresholds_cross_entropy"), ("batch loss", "thresholds_loss")):
        print(f"steps until the mean {title} of the last {window} batches <= threshold:")
        for threshold, row in results[key].items():
            cells = " ".join(f"{name} {'-' if row[name] is None else row[name]}" for name in models)
            speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            print(f"  {threshold:>7s}: {cells}  speedup {speedup}")
    c = results["collapse"]
    print(f"collapsed: {c['parameters']:,} parameters, test accuracy {c['test_accuracy']:.4f}, "
          f"max |logit diff| {c['max_abs_logit_difference']:.2e} (tolerance {c['tolerance']:.2e}), "
          f"argmax equal {c['argmax_equal']} -> {'ok' if c['passed'] else 'FAILED'}")
    print(f"total time: {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
