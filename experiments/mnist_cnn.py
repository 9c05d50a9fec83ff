"""The paper's MNIST experiment: the TensorFlow tutorial CNN against its overparameterized twins
and the end-to-end rule, over several seeds.

    python -m experiments.mnist_cnn --manual-dir ../shared/data/mnist [--arms ...] [--seeds ...] [--quick]

Arora, Cohen & Hazan (2018, Section 8) replace each dense weight matrix of the TensorFlow MNIST
tutorial network (tensorflow/models, tutorials/image/mnist/convolutional.py) by a product of
two matrices (about +15% parameters) and report "optimization accelerated by orders of
magnitude" in batch loss. This script trains these arms (`--arms`, default all five) with the
same recipe:

  plain       the tutorial CNN: conv 5x5x32 SAME relu -> max-pool 2 -> conv 5x5x64 SAME relu ->
              max-pool 2 -> flatten (3136) -> dense 512 relu -> dropout 0.5 -> dense 10 (logits).
              Weights truncated normal std 0.1; biases 0 for conv1, 0.1 for the others. Inputs
              scaled as the tutorial does, (x - 127.5) / 255, in [-0.5, 0.5].
  twin        `tf_overparam.overparameterize(depth=2)` of the plain model: 3136->512->512 and
              512->10->10 (hidden width = each layer's output width), the convolutions and all
              biases copied from the plain model of the same seed; each factor drawn like every
              tutorial matrix (truncated normal std 0.1): "simply placing two matrices in
              succession" as the paper describes it. Its end-to-end kernels start larger than
              the plain ones. The L2 penalty is on the end-to-end kernel, so it minimises the
              same function of its end-to-end weights as plain.
  balanced    the twin with a balanced factorisation of the plain kernels
              (`preserve_function=True`): it starts as the same function as plain, so a
              difference in the curves comes from the optimisation geometry alone.
  factors     the twin with the L2 penalty on each factor instead (`factor_regularizer`, the
              paper's eq. 11 weight decay): a different objective, reported as such.
  end_to_end  the plain CNN trained by the end-to-end rule: `tf_overparam.optimizers.EndToEnd(
              inner optimizer, depth=2, variables=["*fc*/kernel"])` preconditions the dense
              kernels' gradients by eq. 24 (docs/equations.md), as the dense twin's factors would
              move them if balanced; everything else gets the plain gradient.
`--overparameterize dense,conv` expands the two convolutions of the twins too (`OverparamConv2D`
channel chains: the 5x5xcin x cout kernel as a product of two matrices, hidden width = filters).

Seeds: plain and twin run every seed of `--seeds` (default 66478, the tutorial's, 66479 and
66480); balanced, factors and end_to_end every seed of `--other-seeds` (default 66478). A seed
sets the weights, the data order and the dropout masks, the same for every arm: one seed's arms
see the same batches in the same order with the same dropout masks, and the twins start from
that seed's plain model. (Each use draws from its own stream of the seed, `stream_seed`.)

- Objective: mean softmax cross-entropy + the tutorial's 5e-4 * sum(tf.nn.l2_loss) over the
  dense weights and biases, i.e. keras `L2(2.5e-4)` (L2(l) = l * sum(w^2)).
- Optimizer: the tutorial's momentum 0.9 (Keras SGD momentum; TF1's MomentumOptimizer differs
  only in when a changed learning rate enters the velocity), learning rate 0.01 decayed x0.95
  per epoch (staircase), batch 64, 10 epochs; `--optimizer sgd` (plain, lr 0.01) or
  `adam` (lr 0.001) as options (end_to_end wraps the same optimizer).
- Data: tfds MNIST; like the tutorial, 5000 training images are held out for validation
  (tfds' `train[:5000]`), 55000 train (859 full batches per epoch, 8590 steps in 10 epochs),
  the 10000 test images are only evaluated at the end.

Reported, separately: the batch cross-entropy (the headline) and the penalty (batch loss minus
cross-entropy, each arm its own penalty). "Batch" values are each training batch's at the
weights before its step, as the tutorial prints its "Minibatch loss". Steps to a threshold: the
first step n from which the mean cross-entropy of the last `Config.window` (50) batches stays
<= the threshold at every later step (a sustained crossing; the first crossing is kept too).
The thresholds are fixed here, before any run: 1.0, 0.3, 0.1, 0.05 and 0.03 (`Config.thresholds`).
Tables give the median over seeds and the [min, max]; a speedup is plain's median steps over
the arm's, with the [min, max] of the per-seed ratios (seed s against seed s) beside it.

A run folder (`--out`, default runs/mnist_cnn/<UTC time>) holds config.json (with the package
version and git commit), and per arm and seed, as each finishes, `arms/<arm>/seed_<s>.json`
(its per-batch curves and results) and `seed_<s>.weights.h5`, and for the twins the collapsed
model `seed_<s>.collapsed.keras` (checked to predict as the twin); results.json (the tables over
every finished arm and seed, rewritten after each), batch_loss.png (median and band over
seeds), TensorBoard logs (`tensorboard --logdir <run>/tensorboard`: per arm and seed
`train`/`validation` per epoch, `batch` every batch, for the twins `overparam`: balancedness,
end-to-end singular values, effective learning rate). `--resume <run>` keeps the finished arms
and seeds and trains the rest; it may add arms and seeds, so a set can be completed over
several sittings.

Cost of the default full run (9 models of 10 epochs, 8590 steps each): about 1.3 hours on an
idle 2-core CPU machine (plain ~6 min per seed, factors about the same, twin and balanced ~1.5x
per step, end_to_end ~2.1x; `SECONDS_PER_STEP`), about twice that under a load of 5-6. The run
prints its estimate at the start. --quick: about a minute.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import time
import warnings

import numpy as np

from experiments import _curves, _runstate
from experiments._common import (
    RunInterrupted,
    cli,
    format_seconds,
    lazy_import,
    lazy_keras_tensorflow_pyplot,
    make_run_dir,
    provenance,
    quiet_tensorflow,
    replace_atomic,
    resume_command,
    user_errors,
    write_json_atomic,
)

# TensorFlow, Keras and matplotlib load at first use: --help and argument errors return at once.
keras, tf, plt = lazy_keras_tensorflow_pyplot()
diagnostics = lazy_import("tf_overparam.diagnostics")
overparam_callbacks = lazy_import("tf_overparam.callbacks")
mnist = lazy_import("experiments.data.mnist")
layers = lazy_import("tf_overparam.layers")
models_module = lazy_import("tf_overparam.models")
optimizers_module = lazy_import("tf_overparam.optimizers")
_keras_classes = lazy_import("experiments._mnist_keras")
MNIST_ENV_VAR = "TF_OVERPARAM_MNIST_DIR"  # experiments.data.mnist.ENV_VAR (tested)
NUM_TRAIN = 60000  # experiments.data.mnist.NUM_TRAIN


def __getattr__(name):
    """`BatchCrossEntropy` and `BatchRecorder` live in `experiments._mnist_keras` (Keras
    subclasses: importing them imports Keras)."""
    if name in ("BatchCrossEntropy", "BatchRecorder"):
        return getattr(_keras_classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


OPTIMIZERS = ("momentum", "sgd", "adam")
DEFAULT_LEARNING_RATES = {"momentum": 0.01, "sgd": 0.01, "adam": 0.001}
# Arm -> how it is built: None (the plain CNN), ("twin", factor init, where the L2 acts), or
# "end_to_end" (the plain CNN, the EndToEnd optimizer on its dense kernels).
ARMS = {
    "plain": None,
    "twin": ("twin", "tutorial", "end_to_end"),
    "balanced": ("twin", "balanced", "end_to_end"),
    "factors": ("twin", "tutorial", "factors"),
    "end_to_end": "end_to_end",
}
SEEDED_ARMS = ("plain", "twin")  # run every seed of --seeds; the others those of --other-seeds
BASELINE = "plain"  # speedups are against it
END_TO_END_DEPTH = 2
END_TO_END_VARIABLES = ("*fc*/kernel",)  # the dense kernels, as the dense twin expands them
# `--overparameterize` kinds: the plain layer classes the twin expands.
EXPANDABLE = {"dense": "Dense", "conv": "Conv2D"}  # --overparameterize kind -> keras.layers class name
# Collapse check: max |logit difference| <= COLLAPSE_RTOL * max(1, max |logit|).
COLLAPSE_RTOL = 1e-4
# The independent streams of one seed (`stream_seed`).
STREAMS = ("conv1", "conv2", "fc1", "fc2", "factors", "balanced", "dropout", "shuffle", "fit")


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run; defaults are the tutorial's recipe (its seed, 66478, first)."""

    epochs: int = 10
    steps: int = None  # cap on steps per epoch
    batch_size: int = 64
    eval_batch_size: int = 500  # validation and test; every replica must get examples
    optimizer: str = "momentum"
    learning_rate: float = None  # None: DEFAULT_LEARNING_RATES[optimizer]
    decay_rate: float = 0.95  # per epoch, staircase
    momentum: float = 0.9
    l2: float = 5e-4  # the tutorial's coefficient of sum(tf.nn.l2_loss) = 0.5 * ||w||^2
    overparameterize: tuple = ("dense",)  # keys of EXPANDABLE
    init_stddev: float = 0.1
    dropout: float = 0.5
    arms: tuple = tuple(ARMS)
    seeds: tuple = (66478, 66479, 66480)  # of SEEDED_ARMS
    other_seeds: tuple = (66478,)  # of the other arms
    seed: int = 66478  # the seed of the model being built (`for_seed`)
    validation_size: int = 5000
    train_examples: int = None  # None: all 55000; else the first n (CI scale)
    validation_examples: int = None
    test_examples: int = None
    window: int = 50  # batches in the running mean of the thresholds
    thresholds: tuple = (1.0, 0.3, 0.1, 0.05, 0.03)  # on the batch cross-entropy, fixed before the runs
    diagnostics_every: int = 100  # steps between OverparamTensorBoard values
    strategy: str = "none"
    manual_dir: str = None
    tfds_data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: 640 training examples (10 steps per epoch), 2 epochs, 2 seeds, seconds a model."""
        quick = dict(
            epochs=2,
            train_examples=640,
            validation_examples=128,
            test_examples=256,
            eval_batch_size=64,
            window=5,
            thresholds=(2.0, 1.5, 1.0),
            diagnostics_every=10,
            seeds=(66478, 66479),
        )
        return cls(**{**quick, **overrides})

    @property
    def resolved_learning_rate(self):
        return DEFAULT_LEARNING_RATES[self.optimizer] if self.learning_rate is None else self.learning_rate

    def seeds_of(self, arm):
        return self.seeds if arm in SEEDED_ARMS else self.other_seeds

    def plan(self):
        """The (arm, seed) pairs to train: the arms of `seeds` (plain, twin) seed by seed first,
        so that a run stopped early already holds the headline comparison, then the others."""
        seeds = dict.fromkeys([*self.seeds, *self.other_seeds])
        pairs = [(arm, seed) for seed in seeds for arm in self.arms if seed in self.seeds_of(arm)]
        return [pair for pair in pairs if pair[0] in SEEDED_ARMS] + [
            pair for pair in pairs if pair[0] not in SEEDED_ARMS
        ]

    def for_seed(self, seed):
        return dataclasses.replace(self, seed=seed)


def stream_seed(seed, stream):
    """An independent 30-bit seed for one use (`STREAMS`) of `seed`. Keras and TensorFlow
    stateless draws of different shapes from one integer seed share their first values, so
    `seed + offset` would make seed s's conv1 weights the start of seed s-1's conv2 weights."""
    return int(np.random.SeedSequence([seed, STREAMS.index(stream)]).generate_state(1)[0] >> 2)  # room for + offsets


# ----------------------------------------------------------------------------- models


def build_cnn(config):
    """The tutorial CNN as a Keras Sequential model with logits output (seed `config.seed`)."""

    def normal(stream):
        return keras.initializers.TruncatedNormal(stddev=config.init_stddev, seed=stream_seed(config.seed, stream))

    l2 = keras.regularizers.L2(config.l2 / 2.0) if config.l2 else None  # l2=0: no penalty at all
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(
                32,
                5,
                padding="same",
                activation="relu",
                kernel_initializer=normal("conv1"),
                bias_initializer="zeros",
                name="conv1",
            ),
            keras.layers.MaxPooling2D(2, padding="same", name="pool1"),
            keras.layers.Conv2D(
                64,
                5,
                padding="same",
                activation="relu",
                kernel_initializer=normal("conv2"),
                bias_initializer=keras.initializers.Constant(0.1),
                name="conv2",
            ),
            keras.layers.MaxPooling2D(2, padding="same", name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(
                512,
                activation="relu",
                kernel_initializer=normal("fc1"),
                bias_initializer=keras.initializers.Constant(0.1),
                kernel_regularizer=l2,
                bias_regularizer=l2,
                name="fc1",
            ),
            keras.layers.Dropout(config.dropout, seed=stream_seed(config.seed, "dropout"), name="dropout"),
            keras.layers.Dense(
                10,
                kernel_initializer=normal("fc2"),
                bias_initializer=keras.initializers.Constant(0.1),
                kernel_regularizer=l2,
                bias_regularizer=l2,
                name="fc2",
            ),
        ],
        name="plain",
    )


def build_twin(plain, config, factor_init="tutorial", regularize="end_to_end"):
    """The depth-2 overparameterized copy of `plain` (the layers not expanded and biases copied).

    factor_init: "tutorial" (each factor truncated normal std 0.1, a seed per layer) or
        "balanced" (a balanced factorisation of the plain kernels: the same function).
    regularize: "end_to_end" (the plain layer's L2 on the end-to-end kernel: the same
        objective) or "factors" (that L2 on each factor instead).
    """
    expanded = tuple(getattr(keras.layers, EXPANDABLE[kind]) for kind in config.overparameterize)
    factors_seed = stream_seed(config.seed, "factors")

    def layer_kwargs(layer):  # factor j of layer i: seed + 2 i + j, no seed used twice
        if factor_init != "tutorial":
            return {}
        return {
            "factor_initializer": keras.initializers.TruncatedNormal(
                stddev=config.init_stddev, seed=factors_seed + 2 * plain.layers.index(layer)
            )
        }

    with warnings.catch_warnings():  # the layers not expanded (convolutions by default) stay, as meant
        warnings.filterwarnings("ignore", message="overparameterize left these layers unchanged")
        twin = models_module.overparameterize(
            plain,
            depth=2,
            preserve_function=factor_init == "balanced",
            seed=stream_seed(config.seed, "balanced"),
            layers=expanded,
            layer_kwargs=layer_kwargs,
        )
    if regularize == "factors":
        # Same weights, the penalty moved from the end-to-end kernel to each factor.
        model_config = twin.get_config()
        for layer in model_config["layers"]:
            if "factor_regularizer" in layer["config"]:
                layer["config"]["factor_regularizer"] = layer["config"]["kernel_regularizer"]
                layer["config"]["kernel_regularizer"] = None
        rebuilt = keras.Sequential.from_config(model_config)
        rebuilt.set_weights(twin.get_weights())
        twin = rebuilt
    twin.name = "overparameterized"
    return twin


def build_arm(arm, config):
    """The (uncompiled) model of `arm` at seed `config.seed`."""
    plain = build_cnn(config)
    kind = ARMS[arm]
    model = build_twin(plain, config, factor_init=kind[1], regularize=kind[2]) if isinstance(kind, tuple) else plain
    model.name = arm
    return model


def make_optimizer(config, steps_per_epoch, arm="plain"):
    rate = keras.optimizers.schedules.ExponentialDecay(
        config.resolved_learning_rate, decay_steps=steps_per_epoch, decay_rate=config.decay_rate, staircase=True
    )
    if config.optimizer == "momentum":
        optimizer = keras.optimizers.SGD(rate, momentum=config.momentum)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(rate)
    else:
        optimizer = keras.optimizers.Adam(rate)
    if ARMS[arm] == "end_to_end":
        return optimizers_module.EndToEnd(optimizer, depth=END_TO_END_DEPTH, variables=list(END_TO_END_VARIABLES))
    return optimizer


def compile_model(model, config, steps_per_epoch, arm="plain"):
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch, arm),
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


def steps_to_threshold(values, threshold, window, sustained=True):
    """Steps (1-based) until the trailing mean over the full `window` batches n - window + 1 .. n
    is <= threshold: the first n from which it stays so at every later step (`sustained`, the
    `experiments._curves` rule), or the first n at which it is; None if never."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < window:
        return None
    means = running_mean(values, window)[window - 1 :]
    steps = np.arange(window, values.size + 1)
    return (_curves.sustained_crossing if sustained else _curves.first_crossing)(steps, means, threshold)


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
        manual_dir=config.manual_dir,
        data_dir=config.tfds_data_dir,
    )
    return train, validation, test


def train_batches(config, train):
    """The training pipeline of seed `config.seed`; call once per model: the same seed gives the
    same batches in the same order."""
    batches = mnist.train_pipeline(
        train, batch_size=config.batch_size, seed=stream_seed(config.seed, "shuffle"), take=config.train_examples
    )
    return batches.take(config.steps) if config.steps else batches


def count_train_steps(config):
    examples = config.train_examples or (NUM_TRAIN - config.validation_size)
    steps = examples // config.batch_size
    return min(steps, config.steps) if config.steps else steps


# ----------------------------------------------------------------------------- one model


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


def batch_penalty(record):
    """Each batch's penalty: its full loss minus its cross-entropy (the arm's own penalty)."""
    return np.asarray(record["batch_loss"]) - np.asarray(record["batch_cross_entropy"])


def train_one(arm, model, config, data, steps_per_epoch, run_dir):
    """Fits one arm's model at seed `config.seed`; returns (results dict, its test-set logits)."""
    train, validation, test = data
    tensorboard = run_dir / "tensorboard" / arm / f"seed_{config.seed}"
    recorder = _keras_classes.BatchRecorder(tensorboard / "batch")
    callbacks = [keras.callbacks.TensorBoard(str(tensorboard), update_freq="epoch", write_graph=False), recorder]
    if overparam_callbacks.find_overparam_layers(model):
        callbacks.append(
            overparam_callbacks.OverparamTensorBoard(str(tensorboard), update_freq=config.diagnostics_every)
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


def check_collapse(twin, twin_logits, test, path):
    """Collapses the twin, checks it predicts the same, saves it to `path` (atomically) and
    checks the reloaded copy."""
    folded = models_module.collapse(twin)
    # The deployment copy carries no training state (collapse copies the compile config).
    collapsed = keras.Sequential.from_config(folded.get_config())
    collapsed.set_weights(folded.get_weights())
    logits = collapsed.predict(test, verbose=0)
    save_atomic(collapsed.save, path, ".keras")
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


def run_files(run_dir, arm, seed):
    """(record .json, weights .weights.h5, collapsed .keras) of one arm and seed."""
    folder = pathlib.Path(run_dir) / "arms" / arm
    stem = f"seed_{seed}"
    return folder / f"{stem}.json", folder / f"{stem}.weights.h5", folder / f"{stem}.collapsed.keras"


def train_and_save(arm, config, data, steps_per_epoch, run_dir, strategy):
    """Builds, trains and saves one arm at seed `config.seed`: weights, then (twins) the
    collapsed model, then the record, each atomically; the record marks it finished."""
    record_path, weights_path, collapsed_path = run_files(run_dir, arm, config.seed)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with strategy.scope():
        model = build_arm(arm, config)
        compile_model(model, config, steps_per_epoch, arm)
    shutil.rmtree(run_dir / "tensorboard" / arm / f"seed_{config.seed}", ignore_errors=True)  # an interrupted try's
    results, logits = train_one(arm, model, config, data, steps_per_epoch, run_dir)
    save_atomic(model.save_weights, weights_path, ".weights.h5")
    if overparam_callbacks.find_overparam_layers(model):
        results["collapse"] = check_collapse(model, logits, data[2], collapsed_path)
    write_json_atomic(record_path, results)
    print(
        f"{arm}/{config.seed}: test accuracy {results['test_accuracy']:.4f}, "
        f"{results['fit_seconds']:.0f} s ({results['seconds_per_step'] * 1000:.0f} ms/step)"
    )
    return results


def load_finished(run_dir):
    """{(arm, seed): record} of every arm and seed finished in `run_dir` (record and weights saved)."""
    finished = {}
    for record_path in sorted(pathlib.Path(run_dir).glob("arms/*/seed_*.json")):
        record = json.loads(record_path.read_text())
        if run_files(run_dir, record["arm"], record["seed"])[1].exists():
            finished[(record["arm"], record["seed"])] = record
    return finished


# ----------------------------------------------------------------------------- over seeds


def over_seeds(per_seed):
    """{seed: value} -> median, [min, max] (None = never reached, counted as infinite) and the values."""
    median, (low, high) = _curves.median_and_range(list(per_seed.values()))
    return {"median": median, "range": [low, high], "per_seed": {str(seed): v for seed, v in per_seed.items()}}


def summarize(records, config):
    """The tables over seeds of finished `records` ({(arm, seed): record}): per arm the test
    accuracy, final cross-entropy, initial and final penalty and time per step; per threshold
    each arm's steps (sustained crossing, and first crossing) and its speedup over plain."""
    arms = [arm for arm in ARMS if any(a == arm for a, _ in records)]
    by_arm = {arm: {seed: r for (a, seed), r in sorted(records.items()) if a == arm} for arm in arms}
    table = {}
    for arm, runs in by_arm.items():
        row = {"seeds": list(runs), "parameters": next(iter(runs.values()))["parameters"]}
        for key in (
            "test_accuracy",
            "final_running_mean_cross_entropy",
            "initial_penalty",
            "final_running_mean_penalty",
            "median_batch_seconds",
        ):
            row[key] = over_seeds({seed: r[key] for seed, r in runs.items()})
        collapses = [r["collapse"]["passed"] for r in runs.values() if "collapse" in r]
        row["collapse_passed"] = all(collapses) if collapses else None
        table[arm] = row
    steps = {}
    for threshold in config.thresholds:
        row = {}
        for arm, runs in by_arm.items():
            sustained = {
                seed: steps_to_threshold(r["batch_cross_entropy"], threshold, config.window) for seed, r in runs.items()
            }
            first = {
                seed: steps_to_threshold(r["batch_cross_entropy"], threshold, config.window, sustained=False)
                for seed, r in runs.items()
            }
            row[arm] = {**over_seeds(sustained), "first_crossing": over_seeds(first)}
            if BASELINE in by_arm:
                ratio, (low, high) = _curves.speedup(
                    {s: row[BASELINE]["per_seed"][str(s)] for s in by_arm[BASELINE]}, sustained
                )
                row[arm].update(speedup=ratio, speedup_range=[low, high])
        steps[f"{threshold:g}"] = row
    return {
        "window": config.window,
        "thresholds": list(config.thresholds),
        "arms": table,
        "steps_to_cross_entropy": steps,
    }


def plot_curves(path, records, config, thresholds):
    """Per arm, the running mean over `config.window` batches of the batch cross-entropy and of
    the penalty: the median over seeds (line) and the min-max band; log y."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    arms = [arm for arm in ARMS if any(a == arm for a, _ in records)]
    for ax, title, values_of in (
        (axes[0], "batch cross-entropy", lambda r: r["batch_cross_entropy"]),
        (axes[1], "penalty (batch loss - cross-entropy)", batch_penalty),
    ):
        for i, arm in enumerate(arms):
            curves = [running_mean(values_of(r), config.window) for (a, _), r in records.items() if a == arm]
            length = min(len(c) for c in curves)
            curves = np.array([c[:length] for c in curves])
            steps = np.arange(1, length + 1)
            ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.2, linewidth=0)
            ax.plot(
                steps,
                np.median(curves, 0),
                color=f"C{i}",
                label=f"{arm} ({len(curves)} seed{'s' if len(curves) > 1 else ''})",
            )
        if values_of is not batch_penalty:
            for threshold in thresholds:
                ax.axhline(threshold, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"step (batch of {config.batch_size})")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"mean of the last {config.window} batches: median over seeds (line), min-max (band)")
    fig.tight_layout()
    replace_atomic(path, lambda file: fig.savefig(file, dpi=120, format="png"), binary=True)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _int_list(text, name, parser):
    try:
        values = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        parser.error(f"--{name} must be comma-separated integers, got {text!r}")
    if any(value < 0 for value in values):
        parser.error(f"--{name} must be integers >= 0, got {text!r}")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated arms to train (default all: {','.join(ARMS)})"
    )
    parser.add_argument(
        "--seeds", help="comma-separated seeds of plain and twin (default 66478,66479,66480; --quick 66478,66479)"
    )
    parser.add_argument(
        "--other-seeds", help="comma-separated seeds of balanced, factors and end_to_end (default 66478)"
    )
    parser.add_argument("--epochs", type=int, help="epochs (default 10, the tutorial's)")
    parser.add_argument("--steps", type=int, help="cap on steps per epoch (default: the whole training set)")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="momentum",
        help="momentum 0.9 (default, the tutorial's), plain sgd, or adam",
    )
    parser.add_argument(
        "--learning-rate", type=float, help="initial learning rate (default 0.01; adam 0.001), decayed x0.95 per epoch"
    )
    parser.add_argument(
        "--overparameterize",
        default="dense",
        help="comma-separated layer kinds the twins expand: dense (default), conv, or dense,conv",
    )
    parser.add_argument(
        "--strategy",
        choices=("none", "mirrored"),
        default="none",
        help="mirrored: tf.distribute.MirroredStrategy over 2 GPUs, or 2 logical CPU devices",
    )
    parser.add_argument("--manual-dir", help=f"folder of the four MNIST *-ubyte.gz files (or set {MNIST_ENV_VAR})")
    parser.add_argument(
        "--tfds-data-dir", help="where tfds keeps the prepared data (default tfds': ~/tensorflow_datasets)"
    )
    parser.add_argument("--out", help="output folder, new or empty (default runs/mnist_cnn/<UTC time>)")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR: finished arms and seeds are kept (same options; "
        "--arms, --seeds and --other-seeds may add more)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI scale: 640 training examples, 2 epochs, 2 seeds (the full default run: about "
        "1.3 hours on an idle 2-core machine)",
    )
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
        parser.error(
            f"--overparameterize must be a comma-separated subset of {sorted(EXPANDABLE)}, "
            f"got {args.overparameterize!r}"
        )
    arms = tuple(dict.fromkeys(arm.strip() for arm in args.arms.split(",")))
    if not set(arms) <= set(ARMS):
        parser.error(f"--arms must be a comma-separated subset of {','.join(ARMS)}, got {args.arms!r}")
    overrides = dict(
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        strategy=args.strategy,
        manual_dir=args.manual_dir,
        tfds_data_dir=args.tfds_data_dir,
        out=args.resume or args.out,
        steps=args.steps,
        overparameterize=kinds,
        arms=arms,
    )
    if args.seeds is not None:
        overrides["seeds"] = _int_list(args.seeds, "seeds", parser)
    if args.other_seeds is not None:
        overrides["other_seeds"] = _int_list(args.other_seeds, "other-seeds", parser)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return Config.quick(**overrides) if args.quick else Config(**overrides), args


# Seconds per step on an idle 2-core CPU machine (plain: a 10-epoch model in ~6 min; the twin
# without the end-to-end penalty about the same; the end-to-end penalty needs F1 F2 every step,
# ~1.5x; end_to_end: EndToEnd's eq. 24 direction of fc1 every step), and per model for
# validation, test, collapse and saving.
# ~2.1x (the --quick run's ratios to plain on this machine: twin 1.8, factors 1.07, end_to_end 2.5).
SECONDS_PER_STEP = {"plain": 0.042, "twin": 0.063, "balanced": 0.063, "factors": 0.042, "end_to_end": 0.088}
SECONDS_PER_MODEL = (5.0, 25.0)  # building and tracing; evaluation and collapse at 8590 steps (less on fewer)
# Keys of Config that a resumed run may change (the set grows) or that are not options.
RESUME_MAY_CHANGE = ("out", "manual_dir", "tfds_data_dir", "arms", "seeds", "other_seeds", "seed")


def estimate_seconds(plan, steps):
    fixed, scaled = SECONDS_PER_MODEL
    return sum(SECONDS_PER_STEP[arm] * steps + fixed + scaled * min(1.0, steps / 8590) for arm, _ in plan)


def run_config_record(config):
    """config.json's content: the options (not the per-model `seed`) and the provenance."""
    record = dataclasses.asdict(config)
    record.pop("seed")
    return record


def open_run(config, resume):
    """(run folder, finished {(arm, seed): record}, the config to record): a new folder, or with
    `resume` the folder of a run with the same options, whose finished arms and seeds are kept;
    the recorded arms and seeds become the union of the run's and the new ones."""
    if not resume:
        return make_run_dir(config.out, "mnist_cnn"), {}, config
    run_dir = pathlib.Path(config.out)
    saved = _runstate.check_same_config(run_dir, run_config_record(config), ignore=RESUME_MAY_CHANGE)
    union = dataclasses.replace(
        config,
        **{
            key: tuple(dict.fromkeys([*saved.get(key, ()), *getattr(config, key)]))
            for key in ("arms", "seeds", "other_seeds")
        },
    )
    union = dataclasses.replace(union, arms=tuple(arm for arm in ARMS if arm in union.arms))
    return run_dir, load_finished(run_dir), union


@cli
def main(argv=None):
    config, args = parse_args(argv)
    quiet_tensorflow()
    strategy = make_strategy(config.strategy)  # before anything initialises TensorFlow
    started = time.time()
    with user_errors():
        train, validation, test = load_data(config)
    validation = mnist.eval_pipeline(validation, batch_size=config.eval_batch_size, take=config.validation_examples)
    test = mnist.eval_pipeline(test, batch_size=config.eval_batch_size, take=config.test_examples)
    data = (train, validation, test)
    steps_per_epoch = count_train_steps(config)
    run_dir, finished, recorded = open_run(config, resume=args.resume is not None)
    plan = config.plan()
    todo = [key for key in plan if key not in finished]
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "strategy": config.strategy,
        "replicas": strategy.num_replicas_in_sync,
        "load_average_at_start": os.getloadavg(),
    }
    print(
        f"output: {run_dir}\nsteps per epoch: {steps_per_epoch}, epochs: {config.epochs}, "
        f"replicas: {strategy.num_replicas_in_sync}\n{len(plan)} models (arm/seed), {len(plan) - len(todo)} finished; "
        f"estimated time of the rest {format_seconds(estimate_seconds(todo, steps_per_epoch * config.epochs))} "
        "(idle 2-core machine)"
    )
    sitting = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine,
        "provenance": provenance(),
        "plan": [f"{arm}/{seed}" for arm, seed in todo],
    }
    sittings = json.loads((run_dir / "config.json").read_text()).get("sittings", []) if args.resume else []
    # The first sitting's machine and provenance on top; every sitting (a resume is one) listed.
    first = (sittings or [sitting])[0]
    write_json_atomic(
        run_dir / "config.json",
        {
            **run_config_record(recorded),
            "machine": first["machine"],
            "provenance": first["provenance"],
            "sittings": [*sittings, sitting],
        },
    )
    for arm, seed in plan:
        if (arm, seed) in finished:
            print(f"{arm}/{seed}: kept from the resumed run")

    def write_results():
        results = {
            "config": run_config_record(recorded),
            "machine": machine,
            "steps_per_epoch": steps_per_epoch,
            "finished": [f"{arm}/{seed}" for arm, seed in finished],
            "seconds": time.time() - started,
            **summarize(finished, config),
        }
        write_json_atomic(run_dir / "results.json", results)
        return results

    done = []
    try:
        for arm, seed in todo:
            finished[(arm, seed)] = train_and_save(arm, config.for_seed(seed), data, steps_per_epoch, run_dir, strategy)
            done.append(f"{arm}/{seed}")
            write_results()
    except KeyboardInterrupt:
        kept = [f"{arm}/{seed}" for arm, seed in plan if (arm, seed) in finished]
        raise RunInterrupted(
            f"kept {', '.join(kept) or 'no model'} ({len(kept)} of {len(plan)} arm/seed models) "
            f"in {run_dir}; continue with: {resume_command('experiments.mnist_cnn', run_dir, argv)}"
        ) from None
    plot_curves(run_dir / "batch_loss.png", finished, config, config.thresholds)
    results = write_results()
    print_summary(results)
    failed = [name for name, row in results["arms"].items() if row["collapse_passed"] is False]
    if failed:
        raise AssertionError(
            f"a collapsed twin does not predict as the twin it came from: {failed} (see arms/*/*.json)"
        )
    return run_dir


def _cell(statistic, digits=None, percent=False):
    """'median [min, max]' of `over_seeds`; '-' for never reached."""

    def text(value):
        if value is None:
            return "-"
        if percent:
            return f"{100 * value:.2f}"
        return f"{value:.{digits}f}" if digits is not None else f"{value:g}"

    low, high = statistic["range"]
    if low == high:  # one seed, or all alike (all never reached included)
        return text(statistic["median"])
    return f"{text(statistic['median'])} [{text(low)}, {text(high)}]"


def print_summary(results):
    arms, window = results["arms"], results["window"]
    print(f"\nmedian [min, max] over seeds; final: mean of the last {window} batches")
    header = (
        f"{'arm':11s} {'seeds':>5s} {'parameters':>10s} {'test acc %':>22s} {'final CE':>26s} {'penalty at step 1':>26s} "
        f"{'final penalty':>26s} {'ms/batch':>8s}"
    )
    print(header)
    for arm, row in arms.items():
        print(
            f"{arm:11s} {len(row['seeds']):5d} {row['parameters']:10,d} {_cell(row['test_accuracy'], percent=True):>22s} "
            f"{_cell(row['final_running_mean_cross_entropy'], 4):>26s} {_cell(row['initial_penalty'], 4):>26s} "
            f"{_cell(row['final_running_mean_penalty'], 4):>26s} "
            f"{1000 * row['median_batch_seconds']['median']:8.0f}"
        )
    print(
        f"steps until the mean batch cross-entropy of the last {window} batches stays <= the threshold "
        f"(speedup: plain's median / the arm's [per-seed ratios]):"
    )
    for threshold, row in results["steps_to_cross_entropy"].items():
        cells = []
        for arm, cell in row.items():
            speed = ""
            if arm != BASELINE and cell.get("speedup") is not None:
                low, high = cell["speedup_range"]
                speed = f" {cell['speedup']:.2f}x" + (
                    f" [{low:.2f}, {high:.2f}]" if low is not None and len(cell["per_seed"]) > 1 else ""
                )
            cells.append(f"{arm} {_cell(cell)}{speed}")
        print(f"  {threshold:>5s}: " + "; ".join(cells))
    passed = {arm: row["collapse_passed"] for arm, row in arms.items() if row["collapse_passed"] is not None}
    print(
        "collapsed twins predict as the twins: "
        + ", ".join(f"{a} {'ok' if p else 'FAILED'}" for a, p in passed.items())
    )
    print(f"total time: {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
