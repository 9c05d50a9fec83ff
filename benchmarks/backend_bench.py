"""The layer and the end-to-end direction on any Keras backend, as ratios to that backend's own
plain model and matmul. No TensorFlow needed off the TensorFlow backend, and no data set.

    python -m benchmarks.run --backend jax [--quick] [--precision] [--out DIR]
    python -m benchmarks.run --backend tensorflow [--quick] [--out DIR]

1. The MNIST tutorial CNN's shapes built from Keras layers (`benchmarks.models.cnn`: no dropout
   and no L2 penalty), against its depth-2 twin (`overparameterize(depth=2)`, both dense layers as
   `OverparamDense`): train step (`train_on_batch`, SGD with momentum) and inference
   (`predict_on_batch`) on a random batch of 64, each as a ratio to the plain model.
2. The end-to-end direction (`end_to_end_direction`, eq. 24 at depth 2) of a 512x512 and a
   3136x512 float32 kernel, one step `W <- W - eta direction(W, G)` in a compiled loop, against
   one matmul of the cost of `W^T G` (the same loop with `A <- A Q`, Q a b x b orthogonal matrix:
   2 a b^2 FLOPs, as `W^T G`).
3. With `--precision`: the float32 direction's accuracy (relative Frobenius error against a
   float64 NumPy SVD evaluation) and its cost in matmuls (section 2 again) under each matmul
   precision the backend offers: on JAX
   `jax.default_matmul_precision` "default" (TF32 on an NVIDIA GPU from Ampere on) and
   "highest"; on TensorFlow TF32 execution on and off. Kernels with log-spaced singular values
   (condition number 1e3), depths 2 and 4. On a CPU both precisions are the same; the numbers
   that matter come from a GPU. The device count is in `machine`.

On a machine with JAX (say with CUDA) and no TensorFlow, run it from the checkout with Keras and
its small dependencies added from wheels (keras, namex, optree, absl-py, h5py, rich,
markdown-it-py, mdurl, pygments, packaging; numpy and ml_dtypes come with JAX):

    pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.run --backend jax --precision --out DIR

Timings by `benchmarks.timing.measure` (interleaved repeats, medians). The results go to
`<out>/results-<backend>.json` (default runs/benchmarks/<UTC time>/), written atomically and
never over an earlier file, and are printed as Markdown tables.
"""

import argparse
import contextlib
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
    """What to time: `target_s` seconds per timed call, `repeats` interleaved rounds;
    `precision_kernels` (rows, cols) and `precision_depths` of the accuracy check."""

    backend: str = "jax"
    target_s: float = 0.2
    repeats: int = 15
    batch: int = 64
    kernels: tuple = ((512, 512), (3136, 512))
    precision: bool = False
    precision_kernels: tuple = ((512, 512), (3136, 512))
    precision_depths: tuple = (2, 4)
    precision_condition: float = 1e3
    out: str = None
    scale: str = "full"

    @classmethod
    def quick(cls, **overrides):
        """CI scale: short calls, few rounds, small kernels."""
        quick = dict(
            target_s=0.02, repeats=3, kernels=((64, 32), (128, 64)), precision_kernels=((64, 32),), scale="quick"
        )
        return cls(**{**quick, **overrides})


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


def direction_section(config, context=contextlib.nullcontext):
    """Per kernel shape: an eq. 24 step and a matmul of `W^T G`'s cost, and their ratio; every
    call (tracing included) inside `context()` (a matmul precision)."""
    import numpy as np
    from keras import ops

    from benchmarks.timing import Case, compiled_loop, measure
    from tf_overparam.preconditioning import end_to_end_direction

    def within(case):
        def run(units):
            with context():
                return case.run(units)

        return Case(run, case.steps_per_unit)

    rng = np.random.default_rng(0)
    cases = {}
    for rows, cols in config.kernels:
        kernel = ops.convert_to_tensor(rng.normal(scale=0.1, size=(rows, cols)).astype("float32"))
        grad = ops.convert_to_tensor(rng.normal(scale=0.01, size=(rows, cols)).astype("float32"))
        orthogonal = ops.convert_to_tensor(np.linalg.qr(rng.normal(size=(cols, cols)))[0].astype("float32"))
        key = f"{rows}x{cols}"
        cases[f"{key}/end_to_end"] = within(
            compiled_loop(lambda w, g=grad: w - UPDATE_RATE * end_to_end_direction(w, g, DEPTH), kernel, UNROLL)
        )
        cases[f"{key}/matmul"] = within(compiled_loop(lambda a, q=orthogonal: ops.matmul(a, q), kernel, UNROLL))
    timings = measure(cases, config.target_s, config.repeats)
    section = {"depth": DEPTH, "kernels": {}}
    for name, timing in timings.items():
        key, case = name.split("/")
        section["kernels"].setdefault(key, {})[case] = timing
    for cases_ in section["kernels"].values():
        cases_["direction_vs_matmul"] = cases_["end_to_end"]["seconds_per_step"] / cases_["matmul"]["seconds_per_step"]
    return section


# ----------------------------------------------------------------------------- 3. precision


def reference_direction(w, g, depth):
    """Eq. 24 in float64 from the SVD W = U S V^T: sum_j [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N},
    with the power 0 the identity (for a full-rank kernel, whose other powers are U S^2p U^T and
    V S^2q V^T)."""
    import numpy as np

    u, s, vt = np.linalg.svd(w, full_matrices=False)

    def power(basis, exponent):
        return np.eye(len(basis)) if exponent == 0 else (basis * s ** (2 * exponent)) @ basis.T

    return sum(power(u, (j - 1) / depth) @ g @ power(vt.T, (depth - j) / depth) for j in range(1, depth + 1))


def matmul_precisions():
    """name -> a context manager setting the backend's float32 matmul precision."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return {p: (lambda p=p: jax.default_matmul_precision(p)) for p in ("default", "highest")}
    if backend == "tensorflow":
        import tensorflow as tf

        @contextlib.contextmanager
        def tf32(enabled):
            saved = tf.config.experimental.tensor_float_32_execution_enabled()
            tf.config.experimental.enable_tensor_float_32_execution(enabled)
            try:
                yield
            finally:
                tf.config.experimental.enable_tensor_float_32_execution(saved)

        return {"default (TF32 on)": lambda: tf32(True), "highest (TF32 off)": lambda: tf32(False)}
    return {"default": contextlib.nullcontext}


def precision_section(config):
    """Per matmul precision: the float32 direction's relative error against
    `reference_direction`, and the direction section's timings (its cost in matmuls) under it."""
    import keras
    import numpy as np

    from benchmarks.models import benchmark_kernel

    rng = np.random.default_rng(0)
    precisions = matmul_precisions()
    rows = []
    for shape in config.precision_kernels:
        w = benchmark_kernel(rng, shape, config.precision_condition)
        g = rng.normal(size=shape)
        for depth in config.precision_depths:
            expected = reference_direction(w, g, depth)
            errors = {}
            for name, context in precisions.items():
                with context():
                    direction = _compiled_direction(depth)(w.astype("float32"), g.astype("float32"))
                computed = keras.ops.convert_to_numpy(direction).astype("float64")
                errors[name] = float(np.linalg.norm(computed - expected) / np.linalg.norm(expected))
            rows.append({"kernel": "x".join(map(str, shape)), "depth": depth, "errors": errors})
    cost = {name: direction_section(config, context) for name, context in precisions.items()}
    return {"condition": config.precision_condition, "precisions": list(precisions), "rows": rows, "cost": cost}


def _compiled_direction(depth):
    """`end_to_end_direction` at `depth` compiled by the backend, traced afresh for each call (so
    that the matmul precision in force is the one traced)."""
    import keras

    from tf_overparam.preconditioning import end_to_end_direction

    def direction(w, g):
        return end_to_end_direction(w, g, depth)

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(direction)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(direction)
    return direction


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
    parser.add_argument(
        "--precision", action="store_true", help="also the direction's accuracy per matmul precision (for a GPU)"
    )
    args = parser.parse_args(argv)
    overrides = dict(backend=args.backend, out=args.out, precision=args.precision)
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
    from experiments.common.run_folder import make_run_dir, write_json_atomic

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
    if config.precision:
        results["precision"] = precision_section(config)
    results["loadavg_end"] = os.getloadavg()
    results["modules_loaded"] = {"tensorflow": "tensorflow" in sys.modules}
    write_json_atomic(path, results)
    print(format_tables(results))
    print(f"\nresults: {path}")
    return pathlib.Path(path)


if __name__ == "__main__":
    main()
