"""The layer and the end-to-end direction on any Keras backend, as ratios to that backend's own
plain model and matmul. No TensorFlow needed off the TensorFlow backend, and no data set.

    python -m benchmarks.run --backend jax [--quick] [--out DIR]
    python -m benchmarks.run --backend tensorflow [--quick] [--out DIR]

1. The MNIST tutorial CNN's shapes built from Keras layers (`benchmarks.models.cnn`: no dropout
   and no L2 penalty), against its depth-2 twin (`overparameterize(depth=2)`, both dense layers as
   `OverparamDense`): train step (`train_on_batch`, SGD with momentum) and inference
   (`predict_on_batch`) on a random batch of 64, each as a ratio to the plain model.
2. The end-to-end direction (`end_to_end_direction`, eq. 24 at depth 2) of a 512x512 and a
   3136x512 float32 kernel, one step `W <- W - eta direction(W, G)` in a compiled loop, against
   one matmul of the cost of `W^T G` (the same loop with `A <- A Q`, Q a b x b orthogonal matrix:
   2 a b^2 FLOPs, as `W^T G`).

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
import sys

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


# ----------------------------------------------------------------------------- 1. the CNN


def cnn_section(config):
    """Train step and inference of the plain CNN and its twin; the twin's ratios to the plain."""
    import numpy as np

    from benchmarks.models import cnn, cnn_models
    from benchmarks.timing import measure, model_cases

    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(config.batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=config.batch)
    models = cnn_models(("plain", "overparameterized"), build=lambda penalized: cnn())
    timings = measure(model_cases(models, x, y), config.target_s, config.repeats)
    section = {"batch": config.batch, "jit_compile": models["plain"].jit_compile, "models": {}, "ratios": {}}
    for name, model in models.items():
        section["models"][name] = {
            "parameters": int(model.count_params()),
            **{kind: timings[f"{name}/{kind}"] for kind in ("train", "predict")},
        }
    for name, model in section["models"].items():
        section["ratios"][name] = {
            f"{kind}_time_vs_plain": model[kind]["seconds_per_step"]
            / section["models"]["plain"][kind]["seconds_per_step"]
            for kind in ("train", "predict")
        }
    return section


# ----------------------------------------------------------------------------- 2. the direction


def direction_section(config):
    """Per kernel shape: an eq. 24 step and a matmul of `W^T G`'s cost, and their ratio."""
    import numpy as np
    from keras import ops

    from benchmarks.timing import compiled_loop, measure
    from tf_overparam.preconditioning import end_to_end_direction

    rng = np.random.default_rng(0)
    cases = {}
    for rows, cols in config.kernels:
        kernel = ops.convert_to_tensor(rng.normal(scale=0.1, size=(rows, cols)).astype("float32"))
        grad = ops.convert_to_tensor(rng.normal(scale=0.01, size=(rows, cols)).astype("float32"))
        orthogonal = ops.convert_to_tensor(np.linalg.qr(rng.normal(size=(cols, cols)))[0].astype("float32"))
        key = f"{rows}x{cols}"
        cases[f"{key}/end_to_end"] = compiled_loop(
            lambda w, g=grad: w - UPDATE_RATE * end_to_end_direction(w, g, DEPTH), kernel, UNROLL
        )
        cases[f"{key}/matmul"] = compiled_loop(lambda a, q=orthogonal: ops.matmul(a, q), kernel, UNROLL)
    timings = measure(cases, config.target_s, config.repeats)
    section = {"depth": DEPTH, "kernels": {}}
    for name, timing in timings.items():
        key, case = name.split("/")
        section["kernels"].setdefault(key, {})[case] = timing
    for cases_ in section["kernels"].values():
        cases_["direction_vs_matmul"] = cases_["end_to_end"]["seconds_per_step"] / cases_["matmul"]["seconds_per_step"]
    return section


# ----------------------------------------------------------------------------- the command


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
    """Times the sections on the chosen backend; writes and returns the results file."""
    config = parse_args(sys.argv[1:] if argv is None else argv)
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND", config.backend) != config.backend:
        raise SystemExit(f"error: Keras is already imported with another backend than {config.backend!r}")
    os.environ["KERAS_BACKEND"] = config.backend  # before Keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from benchmarks.tables import format_tables
    from benchmarks.timing import machine_info
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
