"""`EndToEnd` under `tf.distribute.MirroredStrategy`: how much of the preconditioner's work the
replicas repeat.

Under a `tf.distribute` strategy `EndToEnd.apply` runs in each replica, on that replica's own
gradient (eq. 24 is linear in G, so the replicas' directions sum to the direction of the summed
gradient); P(W) of the replicas' common W is computed once per step for all of them
(`backend.once_per_step`), and each replica applies it to its own gradient. The section times, in a
subprocess that splits the CPU into `replicas` logical devices before TensorFlow starts (so that
the main run's TensorFlow keeps one device), a training step (`model.train_function`, what `fit`
calls per step) of SGD, `EndToEnd(SGD)` exact and `EndToEnd(SGD, refresh_every=k)` on one device
(the default strategy) and on `replicas` replicas of a `MirroredStrategy`, at the same global
batch (each replica gets its share), all interleaved (`benchmarks.timing.measure`, medians).

Reported per `EndToEnd` variant: its extra time over SGD's step on one device and on the
replicas, and their ratio, `extra_ratio`. The logical devices share the machine's cores: the
replicas' forward and backward passes split one batch, so SGD's step changes little, while every
replica repeats only the products with its own gradient. A ratio near 1 means the
preconditioner's work is not repeated; near `replicas`, that it is.

    python -m benchmarks.distributed CONFIG_JSON OUT_JSON   (the subprocess; benchmarks.run starts it)
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def optimizer_names(config):
    return ("SGD", "EndToEnd(SGD)", f"EndToEnd(SGD, refresh_every={config.refresh_every})")


def replica_counts(config):
    return (1, config.replicas)


def summary(config, steps):
    """The extra times from `steps` ({optimizer: {str(replicas): seconds per step}}): per
    `EndToEnd` variant and replica count its step over SGD's (`vs_sgd`) and its step minus SGD's
    (`extra_s`), and `extra_ratio`, the extra on the replicas over the extra on one device."""
    counts = [str(r) for r in replica_counts(config)]
    sgd = steps["SGD"]
    rows = {}
    for optimizer in optimizer_names(config)[1:]:
        extra = {r: steps[optimizer][r] - sgd[r] for r in counts}
        rows[optimizer] = {
            "vs_sgd": {r: steps[optimizer][r] / sgd[r] for r in counts},
            "extra_s": extra,
            "extra_ratio": extra[counts[1]] / extra[counts[0]],
        }
    return rows


def distributed_section(config):
    """Runs the timing in a subprocess (`config.timeout_s` at most) and adds `summary`."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "distributed.json"
        env = {
            **os.environ,
            "KERAS_BACKEND": "tensorflow",
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        command = [sys.executable, "-m", "benchmarks.distributed", json.dumps(dataclasses.asdict(config)), str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=config.timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"the distributed benchmark's subprocess failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["optimizers"] = summary(config, result["steps"])
    return result


# ----------------------------------------------------------------------------- the subprocess


def _split_cpu(replicas):
    """Splits the CPU into `replicas` logical devices; must run before TensorFlow initialises."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _models(config, strategy, build):
    """optimizer name -> (the model compiled with it under `strategy`, its optimizer built)."""
    import keras

    from benchmarks.models import compiled
    from benchmarks.side_by_side import end_to_end_api

    make, _, _ = end_to_end_api()
    rate = config.learning_rate
    news = dict(
        zip(
            optimizer_names(config),
            (
                lambda model: keras.optimizers.SGD(rate),
                lambda model: make(model, keras.optimizers.SGD(rate), None),
                lambda model: make(model, keras.optimizers.SGD(rate), config.refresh_every),
            ),
        )
    )
    models = {}
    with strategy.scope():
        for name, new in news.items():
            keras.utils.set_random_seed(0)
            model = build()
            compiled(model, new(model)).optimizer.build(model.trainable_variables)
            model.make_train_function()
            models[name] = model
    return models


def _step(model, data):
    """One training step of `model` on `data`, waited for (its logs read)."""
    import keras
    import numpy as np

    def step():
        logs = model.train_function([data])
        keras.tree.map_structure(np.asarray, logs)

    return step


def _worker(config, out):
    from experiments.common.cli import quiet_tensorflow

    quiet_tensorflow()
    devices = _split_cpu(config.replicas)
    import numpy as np
    import tensorflow as tf

    from benchmarks.models import side_by_side_model
    from benchmarks.timing import StepClock, measure

    tf.get_logger().setLevel("ERROR")
    build, input_shape, classes = side_by_side_model(config.model, 32, 10)
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(config.batch, *input_shape)).astype("float32")
    y = rng.integers(0, classes, size=config.batch)
    mirrored = tf.distribute.MirroredStrategy(devices[: config.replicas])
    share = config.batch // config.replicas

    def shard(context):
        part = slice(context.replica_id_in_sync_group * share, (context.replica_id_in_sync_group + 1) * share)
        return tf.constant(x[part]), tf.constant(y[part])

    data = {
        1: (tf.constant(x), tf.constant(y)),
        config.replicas: mirrored.experimental_distribute_values_from_function(shard),
    }
    strategies = {1: tf.distribute.get_strategy(), config.replicas: mirrored}
    clocks, models = {}, {}
    for replicas, strategy in strategies.items():
        for name, model in _models(config, strategy, build).items():
            k = config.refresh_every if "refresh_every" in name else 1
            clocks[name, replicas] = StepClock(_step(model, data[replicas]), k)
            models[name, replicas] = model
    timings = measure({f"{n} / {r}": c.case for (n, r), c in clocks.items()}, config.target_s, config.repeats)
    result = {
        "model": config.model,
        "batch": config.batch,
        "input_shape": list(input_shape),
        "replicas": list(replica_counts(config)),
        "devices": devices,
        "num_replicas_in_sync": {str(r): s.num_replicas_in_sync for r, s in strategies.items()},
        "tensorflow": tf.__version__,
        "timings": timings,
        "steps": {n: {} for n in optimizer_names(config)},
        "p95_over_median": {n: {} for n in optimizer_names(config)},
        "finite": {n: {} for n in optimizer_names(config)},
    }
    for (name, replicas), clock in clocks.items():
        result["steps"][name][str(replicas)] = timings[f"{name} / {replicas}"]["seconds_per_step"]
        result["p95_over_median"][name][str(replicas)] = clock.percentile(95) / clock.percentile(50)
        weights = models[name, replicas].get_weights()
        result["finite"][name][str(replicas)] = bool(all(np.all(np.isfinite(w)) for w in weights))
    pathlib.Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    from benchmarks.config import Distributed

    _worker(Distributed(**json.loads(sys.argv[1])), sys.argv[2])
