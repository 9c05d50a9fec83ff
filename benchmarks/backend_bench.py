"""The layer and the end-to-end direction on any Keras backend, as ratios to that backend's own
plain model and matmul. No TensorFlow needed off the TensorFlow backend, and no data set.

    python -m benchmarks.run --backend jax [--quick] [--out DIR]
    python -m benchmarks.run --backend tensorflow [--quick] [--out DIR]

1. The MNIST tutorial CNN's shapes built from Keras layers (conv 5x5x32, pool, conv 5x5x64,
   pool, dense 3136 -> 512 relu, dense 512 -> 10; no dropout and no L2 penalty), against its
   depth-2 twin (`overparameterize(depth=2)`, both dense layers as `OverparamDense`): train step
   (`train_on_batch`, SGD with momentum) and inference (`predict_on_batch`) on a random batch of
   64, each as a ratio to the plain model on the same backend.
2. The end-to-end direction (`end_to_end_direction`, eq. 24 at depth 2) of a 512x512 and a
   3136x512 float32 kernel, one step `W <- W - eta direction(W, G)` in a compiled loop,
   against one matmul of the cost of `W^T G` (the same loop with `A <- A Q`, Q a b x b
   orthogonal matrix: 2 a b^2 FLOPs, as `W^T G`).

On a machine with JAX (say with CUDA) and no TensorFlow, run it from the checkout with Keras and
its small dependencies added from wheels (keras, namex, optree, absl-py, h5py, rich,
markdown-it-py, mdurl, pygments, packaging; numpy and ml_dtypes come with JAX):

    pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.run --backend jax --out DIR

Timings by `benchmarks.timing.measure` (interleaved repeats, medians). The results go to
`<out>/results-<backend>.json` (default runs/benchmarks/<UTC time>/), written atomically and
never over an earlier file, and are printed as Markdown tables.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import warnings

from benchmarks.timing import Case, load_sentence, measure, model_cases

BACKENDS = ("tensorflow", "jax", "torch")
DEPTH = 2
UPDATE_RATE = 1e-3
UNROLL = 10


@dataclasses.dataclass(frozen=True)
class Config:
    """What to time: `target_s` seconds per timed call, `repeats` interleaved rounds."""

    backend: str = "jax"
    target_s: float = 0.2
    repeats: int = 15
    batch: int = 64
    kernels: tuple = ((512, 512), (3136, 512))
    out: str = None
    scale: str = "full"

    @classmethod
    def quick(cls, **overrides):
        """CI scale: short calls, few rounds, small kernels."""
        return cls(**{"target_s": 0.02, "repeats": 3, "kernels": ((64, 32), (128, 64)), "scale": "quick", **overrides})


def requested_backend(argv):
    """The value of `--backend` in `argv`, or None (then `benchmarks.run` runs its own sections)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- compiled loops


def compiled_loop(step, initial, unroll=UNROLL):
    """A `timing.Case` running `state = step(state)` `unroll` times per unit, all units in one
    compiled call of the current backend; a call returns once the result is computed."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        from benchmarks.timing import compiled_loop as tf_compiled_loop

        return tf_compiled_loop(step, initial, unroll)
    if backend == "jax":
        import jax

        def body(_, state):
            for _ in range(unroll):
                state = step(state)
            return state

        loop = jax.jit(lambda units: jax.numpy.sum(jax.lax.fori_loop(0, units, body, initial)))
        return Case(lambda units: float(loop(units)), steps_per_unit=unroll)

    def eager(units):  # torch: no graph compiler in the loop; eager steps
        state = initial
        for _ in range(units * unroll):
            state = step(state)
        return float(keras.ops.sum(state))

    return Case(eager, steps_per_unit=unroll)


# ----------------------------------------------------------------------------- 1. the CNN


def cnn(name="plain"):
    """The tutorial CNN's layers (logits out), seeded."""
    import keras

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool1"),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, padding="same", name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(512, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ],
        name=name,
    )


def cnn_models():
    """The plain CNN and its depth-2 twin, compiled alike."""
    import keras

    from tf_overparam.models import overparameterize

    keras.utils.set_random_seed(0)
    plain = cnn()
    with warnings.catch_warnings():  # the convolutions stay plain, as in the paper's twin
        warnings.filterwarnings("ignore", message="overparameterize left these layers unchanged")
        twin = overparameterize(plain, depth=DEPTH)
    models = {"plain": plain, "overparameterized": twin}
    for model in models.values():
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    return models


def cnn_section(config):
    """Train step and inference of the plain CNN and its twin; the twin's ratios to the plain."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(config.batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=config.batch)
    models = cnn_models()
    timings = measure(model_cases(models, x, y), config.target_s, config.repeats)
    section = {"batch": config.batch, "jit_compile": models["plain"].jit_compile, "models": {}}
    for name, model in models.items():
        section["models"][name] = {
            "parameters": int(model.count_params()),
            **{kind: timings[f"{name}/{kind}"] for kind in ("train", "predict")},
        }
    plain, twin = section["models"]["plain"], section["models"]["overparameterized"]
    section["ratios"] = {
        f"{kind}_time_vs_plain": twin[kind]["seconds_per_step"] / plain[kind]["seconds_per_step"]
        for kind in ("train", "predict")
    }
    return section


# ----------------------------------------------------------------------------- 2. the direction


def direction_section(config):
    """Per kernel shape: an eq. 24 step and a matmul of `W^T G`'s cost, and their ratio."""
    import numpy as np
    from keras import ops

    from tf_overparam.preconditioning import end_to_end_direction

    rng = np.random.default_rng(0)
    cases = {}
    for rows, cols in config.kernels:
        kernel = ops.convert_to_tensor(rng.normal(scale=0.1, size=(rows, cols)).astype("float32"))
        grad = ops.convert_to_tensor(rng.normal(scale=0.01, size=(rows, cols)).astype("float32"))
        orthogonal = ops.convert_to_tensor(np.linalg.qr(rng.normal(size=(cols, cols)))[0].astype("float32"))
        key = f"{rows}x{cols}"
        cases[f"{key}/end_to_end"] = compiled_loop(
            lambda w, g=grad: w - UPDATE_RATE * end_to_end_direction(w, g, DEPTH), kernel
        )
        cases[f"{key}/matmul"] = compiled_loop(lambda a, q=orthogonal: ops.matmul(a, q), kernel)
    timings = measure(cases, config.target_s, config.repeats)
    section = {"depth": DEPTH, "kernels": {}}
    for name, timing in timings.items():
        key, case = name.split("/")
        section["kernels"].setdefault(key, {})[case] = timing
    for cases_ in section["kernels"].values():
        cases_["direction_vs_matmul"] = cases_["end_to_end"]["seconds_per_step"] / cases_["matmul"]["seconds_per_step"]
    return section


# ----------------------------------------------------------------------------- report


def machine_info():
    """What the numbers were measured on: the backend, its version and devices."""
    import keras

    backend = keras.backend.backend()
    info = {
        "backend": backend,
        "keras": keras.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }
    if backend == "jax":
        import jax

        info.update(version=jax.__version__, devices=[str(d.device_kind) for d in jax.devices()])
    elif backend == "tensorflow":
        import tensorflow as tf

        info.update(version=tf.__version__, devices=[d.name for d in tf.config.list_logical_devices()])
    elif backend == "torch":
        import torch

        info.update(
            version=torch.__version__, devices=[torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
        )
    return info


def format_tables(results):
    """The results as Markdown tables."""
    machine, layer = results["machine"], results["cnn"]
    lines = [
        f"{results['date']}, Keras {machine['keras']} on {machine['backend']} {machine['version']}, "
        f"devices {', '.join(machine['devices'])}, {machine['cpus']} CPUs; " + load_sentence(results, machine["cpus"]),
        "",
        f"CNN, batch {layer['batch']} (ms; jit_compile={layer['jit_compile']}):",
        "",
        "| model | parameters | train step | x plain | inference | x plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, model in layer["models"].items():
        ratios = layer["ratios"] if name != "plain" else {"train_time_vs_plain": 1.0, "predict_time_vs_plain": 1.0}
        lines.append(
            f"| {name} | {model['parameters']:,} | {1e3 * model['train']['seconds_per_step']:.2f} | "
            f"{ratios['train_time_vs_plain']:.2f} | {1e3 * model['predict']['seconds_per_step']:.2f} | "
            f"{ratios['predict_time_vs_plain']:.2f} |"
        )
    direction = results["direction"]
    lines += [
        "",
        f"End-to-end direction, depth {direction['depth']}, float32, one step in a compiled loop (us):",
        "",
        "| kernel | W^T G matmul | eq. 24 step | x matmul |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, cases in direction["kernels"].items():
        lines.append(
            f"| {key} | {1e6 * cases['matmul']['seconds_per_step']:,.1f} | "
            f"{1e6 * cases['end_to_end']['seconds_per_step']:,.1f} | {cases['direction_vs_matmul']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run --backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", required=True, choices=BACKENDS, help="the Keras backend to time")
    parser.add_argument("--out", help="output folder (default runs/benchmarks/<UTC time>)")
    parser.add_argument("--quick", action="store_true", help="CI scale: short calls, small kernels")
    args = parser.parse_args(argv)
    overrides = dict(backend=args.backend, out=args.out)
    return Config.quick(**overrides) if args.quick else Config(**overrides)


def main(argv=None):
    """Times both sections on the chosen backend; writes and returns the results file."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", config.backend) != config.backend:
        raise SystemExit(f"error: Keras is already imported with another backend than {config.backend!r}")
    os.environ["KERAS_BACKEND"] = config.backend  # before Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from experiments._common import make_run_dir, write_json_atomic

    path = make_run_dir(config.out, "benchmarks") / f"results-{config.backend}.json"
    if path.exists():
        print(f"error: {path} exists; choose another --out", file=sys.stderr)
        raise SystemExit(2)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": dataclasses.asdict(config),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
    }
    assert keras.backend.backend() == config.backend
    results["cnn"] = cnn_section(config)
    results["direction"] = direction_section(config)
    results["loadavg_end"] = os.getloadavg()
    results["modules_loaded"] = {"tensorflow": "tensorflow" in sys.modules}
    write_json_atomic(path, results)
    print(format_tables(results))
    print(f"\nresults: {path}")
    return pathlib.Path(path)


if __name__ == "__main__":
    main()
