"""Benchmarks of tf_overparam: the full-batch engine, the layer and the update rule.

    python -m benchmarks.run --data-dir ../shared/data/gas_sensor [--quick] [--out DIR]

1. Full batch (the gas sensor experiment's workload: 1316 x 128 Ethanol rows, l4 loss, one
   output, no bias, GD): steps per second of `model.fit` (one epoch = one full batch), of
   `model.fit` with `steps_per_execution` (the batch repeated by tf.data), and of
   `FullBatchTrainer.advance` (depth 1, a depth-2 width-1 chain, the eq. 24 rule at depth 2),
   for one learning rate and for the experiment's 9-point grid (3 with --quick). For the grid the Keras
   baselines train 9 models one after another; a grid step is one step of every point. Next
   to them the machine's bound: the FLOPs of a step (`step_flops`) at the rate of the engine's
   two data matmuls run alone in the same kind of loop, and at the peak rate of a large square
   matmul.
2. The layer: the MNIST tutorial CNN (`experiments.mnist_cnn.build_cnn`) with plain `Dense`,
   with `OverparamDense` (`overparameterize(depth=2)`) and after `collapse`; train step
   (`train_on_batch`) and inference (`predict_on_batch`) on a random batch of 64.
3. The update rule: one eq. 24 step (`end_to_end_direction`, depth 2) against one SGD step and
   in units of one `W^T G` matmul of the same kernel, exact and amortised (`refresh_every`),
   each in a compiled loop, per kernel shape (a single output takes the closed form, eq. 27).

Every number is a median over interleaved repeats (`benchmarks.timing.measure`); the first
call (tracing) is reported apart. Ratios are taken within one run, so that a shared machine's
load, which moves the absolute numbers, moves them less. The results are written atomically to
`<out>/results.json` (default runs/benchmarks/<UTC time>/) and printed as Markdown tables.

With `--backend NAME` (tensorflow, jax, torch) it runs instead the CNN and the end-to-end
direction on that Keras backend, without TensorFlow off it (`benchmarks/backend_bench.py`).
"""

import sys

if __name__ == "__main__":  # dispatched before TensorFlow and Keras are imported below
    from benchmarks import backend_bench

    if backend_bench.requested_backend(sys.argv[1:]) is not None:
        backend_bench.main(sys.argv[1:])
        sys.exit(0)

import argparse
import dataclasses
import datetime
import math
import os
import platform

import keras
import numpy as np
import tensorflow as tf

from benchmarks.timing import Case, compiled_loop, load_sentence, measure, model_cases
from experiments import gas_sensor as gas_experiment
from experiments import mnist_cnn
from experiments._common import make_run_dir, write_json_atomic
from experiments.data import gas_sensor
from experiments.engine.fullbatch import UNROLL, ChainSpec, FullBatchTrainer
from tf_overparam.initializers import NearZero
from tf_overparam.losses import LpLoss
from tf_overparam.models import collapse, overparameterize
from tf_overparam.optimizers import EndToEnd
from tf_overparam.preconditioning import (
    NEWTON_SCHULZ_MIN_COLUMNS,
    _square_roots,
    apply_preconditioner,
    compute_preconditioner,
    end_to_end_direction,
)

P = 4  # the l4 loss of the experiment's headline figure
DEPTH = 2  # depth emulated by the update rule and of the overparameterized CNN
UPDATE_RATE = 1e-3  # learning rate of the update-rule loops
# The engine's configurations: name -> (label, spec); near-zero init as in the experiment.
_INIT = NearZero(gas_experiment.Config().init_stddev)
ENGINE_SPECS = {
    "engine": ("engine, GD depth 1", ChainSpec(depth=1, p=P, initializer=_INIT)),
    "engine_depth2": ("engine, GD depth 2 width 1", ChainSpec(depth=2, hidden_units=1, p=P, initializer=_INIT)),
    "engine_end_to_end": ("engine, eq. 24 depth 2", ChainSpec(depth=2, update="end_to_end", p=P, initializer=_INIT)),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """What to time. `target_s`: seconds per timed call; `repeats`: interleaved rounds;
    `fit_epochs`: epochs per naive `fit` call, which amortise its per-call set-up."""

    target_s: float = 0.2
    repeats: int = 15
    fit_epochs: int = 5
    steps_per_execution: int = 1000
    single_learning_rate: float = 1e-3
    grid_points: int = 9
    peak_size: int = 1024
    cnn_batch: int = 64
    kernels: tuple = ((1, 128), (128, 1), (128, 128), (512, 512), (3136, 512))
    # (rows, cols, cond(W)): log-spaced singular values, where depth 2 declines Newton-Schulz
    conditioned_kernels: tuple = ((3136, 512, 1e3),)
    data_dir: str = None
    out: str = None
    scale: str = "full"

    @classmethod
    def quick(cls, **overrides):
        """CI scale: short calls, 3 rounds, a 3-point grid, the small kernels only."""
        quick = dict(
            scale="quick",
            target_s=0.02,
            repeats=3,
            fit_epochs=1,
            steps_per_execution=100,
            grid_points=3,
            peak_size=512,
            kernels=((1, 128), (128, 1), (128, 128)),
            conditioned_kernels=((300, 128, 1e3),),
        )
        return cls(**{**quick, **overrides})


def step_flops(examples, features, grid):
    """FLOPs of one full-batch l4 GD step of a depth-1 grid of `grid` points.

    matmul: X K (examples x features by features x grid) and R^T X, 2 n d G each.
    elementwise, one FLOP per element per op: per residual entry (n G) the subtraction of y,
    r^2 and r^4, the sum of the loss, and r^3 for the slope (r r^2): 6; per kernel entry
    (d G) the update's scaling and subtraction: 2.
    """
    matmul = 4 * examples * features * grid
    elementwise = 6 * examples * grid + 2 * features * grid
    return {"matmul": matmul, "elementwise": elementwise, "total": matmul + elementwise}


# ----------------------------------------------------------------------------- 1. full batch


def _keras_linear(learning_rate, features, steps_per_execution=1):
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(1, use_bias=False, kernel_initializer=NearZero(_INIT.stddev, seed=0)),
        ]
    )
    model.compile(keras.optimizers.SGD(learning_rate), loss=LpLoss(p=P), steps_per_execution=steps_per_execution)
    return model


def keras_fit_case(x, y, rates, epochs):
    """Naive `fit`, one epoch = one full batch: a unit is one `fit` of `epochs` epochs of each
    model in turn."""
    models = [_keras_linear(rate, x.shape[1]) for rate in rates]

    def run(units):
        for model in models:
            model.fit(x, y, batch_size=len(x), epochs=units * epochs, shuffle=False, verbose=0)

    return Case(run, steps_per_unit=epochs)


def keras_fit_spe_case(x, y, rates, steps_per_execution):
    """`fit` with `steps_per_execution` over the full batch repeated; a unit is one execution
    of each model in turn."""
    models = [_keras_linear(rate, x.shape[1], steps_per_execution) for rate in rates]
    data = tf.data.Dataset.from_tensors((x, y)).repeat()

    def run(executions):
        for model in models:
            model.fit(data, epochs=1, steps_per_epoch=executions * steps_per_execution, shuffle=False, verbose=0)

    return Case(run, steps_per_unit=steps_per_execution)


def data_matmuls_case(x, grid):
    """The engine's two data matmuls alone (X K^T, then R^T X), in the engine's kind of loop;
    X is scaled to spectral norm 1 so the iterates stay finite."""
    unit_x = tf.constant(x / np.linalg.norm(x, 2))
    rows = tf.constant(np.random.default_rng(0).normal(size=(grid, x.shape[1])), tf.float32)
    return compiled_loop(
        lambda k: tf.matmul(tf.matmul(unit_x, k, transpose_b=True), unit_x, transpose_a=True), rows, UNROLL
    )


def peak_matmul_case(size):
    """A large square matmul by an orthogonal matrix (norms stay put), one matmul per step."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(size, size)))
    q = tf.constant(q, tf.float32)
    return compiled_loop(lambda a: tf.matmul(a, q), q, UNROLL)


def fullbatch_cases(config, x, y, grids):
    """The peak matmul, and per grid ("<grid>/<method>") the Keras baselines, the engine's
    configurations and the data matmuls alone."""
    cases = {"peak_matmul": peak_matmul_case(config.peak_size)}
    for name, rates in grids.items():
        cases[f"{name}/keras_fit"] = keras_fit_case(x, y, rates, config.fit_epochs)
        cases[f"{name}/keras_fit_spe"] = keras_fit_spe_case(x, y, rates, config.steps_per_execution)
        for method, (_, spec) in ENGINE_SPECS.items():
            cases[f"{name}/{method}"] = Case(FullBatchTrainer(x, y, spec, rates).advance)
        cases[f"{name}/data_matmuls"] = data_matmuls_case(x, len(rates))
    return cases


def fullbatch_section(config, x, y):
    """Section 1: steps per second, ratios to naive `fit` and to the bound, per grid."""
    spec = ENGINE_SPECS["engine"][1]
    grids = {
        "single": [config.single_learning_rate],
        "grid": list(gas_experiment.Config(grid_points=config.grid_points).learning_rates(spec)),
    }
    timings = measure(fullbatch_cases(config, x, y, grids), config.target_s, config.repeats)
    peak = timings.pop("peak_matmul")
    peak_rate = 2 * config.peak_size**3 / peak["seconds_per_step"]
    section = {
        "examples": x.shape[0],
        "features": x.shape[1],
        "p": P,
        "keras_jit_compile": _keras_linear(1.0, x.shape[1]).jit_compile,  # "auto", as resolved here
        "peak_matmul": {**peak, "size": config.peak_size, "flops_per_s": peak_rate},
    }
    for name, rates in grids.items():
        methods = {key.split("/")[1]: value for key, value in timings.items() if key.startswith(f"{name}/")}
        section[name] = grid_result(x.shape, rates, methods, peak_rate)
    return section


def grid_result(shape, rates, methods, peak_rate):
    """One grid's timings, FLOPs, bounds and ratios (ratios of seconds per step)."""
    flops = step_flops(*shape, len(rates))
    matmul_rate = flops["matmul"] / methods["data_matmuls"]["seconds_per_step"]
    bound = flops["total"] / matmul_rate
    peak_bound = flops["total"] / peak_rate
    ratios = {
        method: {
            "vs_keras_fit": methods["keras_fit"]["seconds_per_step"] / timing["seconds_per_step"],
            "vs_keras_fit_spe": methods["keras_fit_spe"]["seconds_per_step"] / timing["seconds_per_step"],
            "of_bound": bound / timing["seconds_per_step"],
            "of_peak_bound": peak_bound / timing["seconds_per_step"],
        }
        for method, timing in methods.items()
        if method != "data_matmuls"
    }
    return {
        "grid": len(rates),
        "learning_rates": rates,
        "flops": flops,
        "matmul_flops_per_s": matmul_rate,
        "bound_seconds_per_step": bound,
        "peak_bound_seconds_per_step": peak_bound,
        "methods": methods,
        "ratios": ratios,
    }


# ----------------------------------------------------------------------------- 2. the layer


def _compiled(model, optimizer=None):
    model.compile(
        optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def cnn_models():
    """The tutorial CNN in the variants of section 2, compiled (momentum SGD, cross-entropy).

    With the tutorial's L2 penalty on the dense layers (`kernel_regularizer`, which on the twin
    acts on the end-to-end kernel and so needs the product F_1 F_2 every step): plain, the
    depth-2 twin (`overparameterize`), the twin collapsed, and the plain CNN trained by
    `EndToEnd(depth=2)` on its dense kernels (the twin's dynamics without its factors). Without
    the penalty: plain and the twin, where nothing needs the product.
    """
    plain = mnist_cnn.build_cnn(mnist_cnn.Config())
    twin = overparameterize(plain, depth=DEPTH)
    unpenalized = mnist_cnn.build_cnn(mnist_cnn.Config(l2=0.0))
    end_to_end = EndToEnd(keras.optimizers.SGD(0.01, momentum=0.9), depth=DEPTH, variables=["*fc*/kernel"])
    models = {
        "plain": plain,
        "overparameterized": twin,
        "collapsed": collapse(twin),
        "plain, EndToEnd optimizer": (mnist_cnn.build_cnn(mnist_cnn.Config()), end_to_end),
        "plain, no L2": unpenalized,
        "overparameterized, no L2": overparameterize(unpenalized, depth=DEPTH),
    }
    return {name: _compiled(*(model if isinstance(model, tuple) else (model,))) for name, model in models.items()}


# Each model's baseline: the plain CNN with the same objective.
_CNN_BASELINES = {"plain, no L2": "plain, no L2", "overparameterized, no L2": "plain, no L2"}


def layer_section(config):
    """Section 2: train step and inference time of the CNN variants, as ratios to the plain CNN
    with the same objective (and the `EndToEnd` optimizer's step also to the twin's)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-0.5, 0.5, size=(config.cnn_batch, 28, 28, 1)), tf.float32)
    y = tf.constant(rng.integers(0, 10, size=config.cnn_batch))
    models = cnn_models()
    timings = measure(model_cases(models, x, y), config.target_s, config.repeats)
    section = {"batch": config.cnn_batch, "jit_compile": models["plain"].jit_compile, "models": {}, "ratios": {}}
    for name, model in models.items():
        section["models"][name] = {
            "parameters": int(model.count_params()),
            "baseline": _CNN_BASELINES.get(name, "plain"),
            **{kind: timings[f"{name}/{kind}"] for kind in ("train", "predict")},
        }

    def ratio(name, baseline, kind):
        return section["models"][name][kind]["seconds_per_step"] / section["models"][baseline][kind]["seconds_per_step"]

    for name, model in section["models"].items():
        section["ratios"][name] = {
            f"{kind}_time_vs_plain": ratio(name, model["baseline"], kind) for kind in ("train", "predict")
        }
    section["ratios"]["plain, EndToEnd optimizer"]["train_time_vs_overparameterized"] = ratio(
        "plain, EndToEnd optimizer", "overparameterized", "train"
    )
    return section


# ----------------------------------------------------------------------------- 3. the update rule


REFRESH_EVERY = 10  # the amortised rule's k reported


def _update_case(kernel, direction, grad):
    """w <- w - r direction(w, G(w)) in a compiled loop; G(w) = G + 1e-3 w, so that no step's work
    is loop-invariant (a constant preconditioner applied to a constant G could be hoisted)."""
    return compiled_loop(lambda w: w - UPDATE_RATE * direction(w, grad + 1e-3 * w), kernel, UNROLL)


def _gram_eigh_step(w, g):
    """G, after the float32 eigh of W^T W (its eigenvalues enter with weight 0, so it runs)."""
    oriented = tf.transpose(w) if w.shape[0] < w.shape[1] else w
    eigenvalues = tf.linalg.eigh(tf.matmul(oriented, oriented, transpose_a=True))[0]
    return g + 0.0 * tf.reduce_sum(eigenvalues)


def floor_direction(w, g):
    """Eq. 24 at depth 2 with only the work that no arrangement of the products avoids, for a
    kernel of full rank: the Gram matrix A = W^T W (W oriented tall), its float32 `eigh`,
    W^T G, and G R + W (C (W^T G)) with R = A^{1/2} and C = A^{-1/2}, since
    (W W^T)^{1/2} = W A^{-1/2} W^T. Once R and C are known the output still needs two products of
    G's size (2 a b^2 multiply-adds). No rounding mask and no finiteness check: the floor that
    `end_to_end_direction`'s exact case is set against."""
    wide = w.shape[0] < w.shape[1]
    if wide:
        w, g = tf.transpose(w), tf.transpose(g)
    eigenvalues, basis = tf.linalg.eigh(tf.matmul(w, w, transpose_a=True))
    root = tf.sqrt(eigenvalues)
    direct = tf.matmul(basis * root, basis, transpose_b=True)
    inverse = tf.matmul(basis / root, basis, transpose_b=True)
    direction = tf.matmul(g, direct) + tf.matmul(w, tf.matmul(inverse, tf.matmul(w, g, transpose_a=True)))
    return tf.transpose(direction) if wide else direction


def _benchmark_kernel(rng, shape, condition):
    """N(0, 0.01) entries, or (with `condition`) singular values log-spaced from that Gaussian's
    largest, 0.1 (sqrt(a) + sqrt(b)), down by the factor `condition`, in random bases."""
    if condition is None:
        return rng.normal(scale=0.1, size=shape)
    rank = min(shape)
    left, _ = np.linalg.qr(rng.normal(size=(shape[0], rank)))
    right, _ = np.linalg.qr(rng.normal(size=(shape[1], rank)))
    values = 0.1 * (np.sqrt(shape[0]) + np.sqrt(shape[1])) * np.logspace(0, -np.log10(condition), rank)
    return (left * values) @ right.T


def update_rule_section(config):
    """Section 3: the eq. 24 direction in units of one `W^T G` matmul of the same kernel.

    Cases per kernel, each a whole step w <- w - r d(w): `sgd` (d = G), `matmuls` (d = W (W^T G),
    two matmuls of the `W^T G` kind), `exact` (d = eq. 24 at the current W),
    `between_refreshes` (d = P(W_0) G with a preconditioner kept from the start: the step of the
    amortised rule between refreshes) and `gram_eigh` (d = G, plus the Gram matrix of the
    current W and its float32 `eigh`, the part of `exact` no rearrangement of products saves;
    its input changes every step, as in training: an `eigh` of a loop-invariant matrix timed
    about 40% cheaper here) and, for kernels with both sides above 1, `floor` (d =
    `floor_direction`, the exact depth-2 direction through the eigh with nothing but its
    unavoidable work) and `refresh` (d = P(W) G with P(W) computed at the current W,
    `compute_preconditioner` then `apply_preconditioner`: the amortised rule's step at a refresh,
    which eigendecomposes also where the exact direction takes Newton-Schulz). One matmul is half
    the `matmuls` step; the amortised rule with refresh_every = k costs
    between_refreshes + (refresh - between_refreshes) / k on average.
    Kernels: Gaussian N(0, 0.01) of `config.kernels` (cond(W) about 2.4 at 3136 x 512, where
    depth 2 takes Newton-Schulz), and `config.conditioned_kernels` with log-spaced singular
    values (where it declines and takes the eigh). `newton_schulz` says which, for the kernel
    the loop starts from.
    """
    rng = np.random.default_rng(0)
    cases, shapes = {}, {}
    kernels = [(shape, None) for shape in config.kernels] + [(spec[:2], spec[2]) for spec in config.conditioned_kernels]
    for shape, condition in kernels:
        kernel = tf.constant(_benchmark_kernel(rng, shape, condition), tf.float32)
        grad = tf.constant(rng.normal(scale=0.01, size=shape), tf.float32)
        kept = compute_preconditioner(kernel, DEPTH)
        key = "x".join(map(str, shape)) + ("" if condition is None else f", cond(W) {condition:g}")
        oriented = kernel if shape[0] >= shape[1] else tf.transpose(kernel)
        shapes[key] = {
            "shape": list(shape),
            "newton_schulz": min(shape) >= NEWTON_SCHULZ_MIN_COLUMNS
            and bool(_square_roots(tf.matmul(oriented, oriented, transpose_a=True))[2]),
        }
        cases[f"{key}/sgd"] = _update_case(kernel, lambda w, g: g, grad)
        cases[f"{key}/matmuls"] = _update_case(
            kernel, lambda w, g: tf.matmul(w, tf.matmul(w, g, transpose_a=True)), grad
        )
        cases[f"{key}/exact"] = _update_case(kernel, lambda w, g: end_to_end_direction(w, g, DEPTH), grad)
        cases[f"{key}/between_refreshes"] = _update_case(kernel, lambda w, g, p=kept: apply_preconditioner(p, g), grad)
        cases[f"{key}/refresh"] = _update_case(
            kernel, lambda w, g: apply_preconditioner(compute_preconditioner(w, DEPTH), g), grad
        )
        cases[f"{key}/gram_eigh"] = _update_case(kernel, _gram_eigh_step, grad)
        if min(shape) > 1:  # a single output takes eq. 27's closed form, below any eigh
            cases[f"{key}/floor"] = _update_case(kernel, floor_direction, grad)
    timings = measure(cases, config.target_s, config.repeats)
    section = {
        "depth": DEPTH,
        "refresh_every": REFRESH_EVERY,
        "kernels": {key: dict(spec) for key, spec in shapes.items()},
    }
    for name, timing in timings.items():
        key, rule = name.split("/")
        section["kernels"][key][rule] = timing
    for rules in section["kernels"].values():
        seconds = {
            rule: rules[rule]["seconds_per_step"]
            for rule in ("sgd", "matmuls", "exact", "between_refreshes", "refresh", "gram_eigh")
        }
        matmul = seconds["matmuls"] / 2
        rules["exact_vs_sgd"] = seconds["exact"] / seconds["sgd"]
        rules["exact_in_matmuls"] = seconds["exact"] / matmul
        rules["between_refreshes_in_matmuls"] = seconds["between_refreshes"] / matmul
        rules["refresh_in_matmuls"] = seconds["refresh"] / matmul
        rules["gram_eigh_in_matmuls"] = (seconds["gram_eigh"] - seconds["sgd"]) / matmul
        rules["amortised_in_matmuls"] = (
            seconds["between_refreshes"] + (seconds["refresh"] - seconds["between_refreshes"]) / REFRESH_EVERY
        ) / matmul
        if "floor" in rules:
            rules["floor_in_matmuls"] = rules["floor"]["seconds_per_step"] / matmul
    return section


# ----------------------------------------------------------------------------- report


def machine_info():
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "devices": [d.name for d in tf.config.list_logical_devices()],
    }


def _rate(steps_per_second):
    """Steps per second to 3 significant digits, without an exponent."""
    decimals = 2 - math.floor(math.log10(steps_per_second))
    return f"{round(steps_per_second, decimals):,.{max(decimals, 0)}f}"


def _method(rules):
    """How the exact direction of a kernel was computed (eq. 27 for a single output)."""
    if min(rules["shape"]) == 1:
        return "eq. 27"
    return "Newton-Schulz" if rules["newton_schulz"] else "eigh"


def format_tables(results):
    """The results as Markdown tables (what the README's Performance section shows)."""
    machine, fullbatch = results["machine"], results["fullbatch"]
    lines = [
        f"{results['date']}, TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, "
        f"{machine['cpus']} CPUs ({machine['processor'] or machine['platform']}); "
        + load_sentence(results, machine["cpus"]),
        "",
        f"Full batch, gas sensor {fullbatch['examples']} x {fullbatch['features']}, l{fullbatch['p']}, "
        f"one output (steps/s; a grid step trains all {fullbatch['grid']['grid']} points; Keras "
        f"jit_compile={fullbatch['keras_jit_compile']}):",
        "",
        "| method | 1 rate: steps/s | x naive fit | x of bound | grid: steps/s | x naive fit | x of bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "keras_fit": f"`model.fit`, one epoch per step, {results['config']['fit_epochs']} epochs a call (naive)",
        "keras_fit_spe": f"`model.fit`, steps_per_execution={results['config']['steps_per_execution']}",
        **{method: label for method, (label, _) in ENGINE_SPECS.items()},
    }
    grids = (fullbatch["single"], fullbatch["grid"])
    for method, label in labels.items():
        cells = [
            f"{_rate(1 / g['methods'][method]['seconds_per_step'])} | "
            f"{g['ratios'][method]['vs_keras_fit']:,.0f}x | {g['ratios'][method]['of_bound']:.2f}"
            for g in grids
        ]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    for key, label in (
        ("bound_seconds_per_step", "bound: FLOPs at the data matmuls' rate"),
        ("peak_bound_seconds_per_step", "bound: FLOPs at peak matmul rate"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{_rate(1 / g[key])} | | " for g in grids) + " |")
    lines += [
        "",
        f"Data matmuls alone: {grids[0]['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (1 rate), "
        f"{grids[1]['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (grid); peak "
        f"({fullbatch['peak_matmul']['size']}^2 matmul) {fullbatch['peak_matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s.",
        "",
        f"MNIST CNN, batch {results['layer']['batch']} (ms; x plain: against the plain CNN with the same objective):",
        "",
        "| model | parameters | train step | x plain | inference | x plain | first train call (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    layer = results["layer"]
    for name, model in layer["models"].items():
        ratio = layer["ratios"][name]
        lines.append(
            f"| {name} | {model['parameters']:,} | {1e3 * model['train']['seconds_per_step']:.1f} | "
            f"{ratio['train_time_vs_plain']:.2f} | {1e3 * model['predict']['seconds_per_step']:.1f} | "
            f"{ratio['predict_time_vs_plain']:.2f} | {model['train']['first_call_s']:.1f} |"
        )
    lines += [
        "",
        "The `EndToEnd` optimizer's train step is "
        f"{layer['ratios']['plain, EndToEnd optimizer']['train_time_vs_overparameterized']:.2f}x the twin's.",
    ]
    lines += [
        "",
        f"Update rule, depth {results['update_rule']['depth']}: eq. 24 direction in `W^T G` matmuls of the "
        "same kernel (a whole step each, compiled loop):",
        "",
        f"| kernel | SGD step (us) | eq. 24 step (us) | x SGD | exact (matmuls) | between refreshes (matmuls) | "
        f"refresh step (matmuls) | refresh_every={results['update_rule']['refresh_every']}, average (matmuls) | exact by | Gram + eigh alone (matmuls) | "
        "eigh path's floor: Gram, eigh, W^T G, G R, W (C W^T G) (matmuls) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for key, rules in results["update_rule"]["kernels"].items():
        lines.append(
            f"| {key} | {1e6 * rules['sgd']['seconds_per_step']:,.1f} | {1e6 * rules['exact']['seconds_per_step']:,.1f} | "
            f"{rules['exact_vs_sgd']:.1f}x | {rules['exact_in_matmuls']:.1f} | {rules['between_refreshes_in_matmuls']:.1f} | "
            f"{rules['refresh_in_matmuls']:.1f} | "
            f"{rules['amortised_in_matmuls']:.1f} | {_method(rules)} | {rules['gram_eigh_in_matmuls']:.1f} | "
            + (f"{rules['floor_in_matmuls']:.1f} |" if "floor_in_matmuls" in rules else "- |")
        )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help=f"folder of the gas sensor batch*.dat files (or set {gas_sensor.ENV_VAR})")
    parser.add_argument("--out", help="output folder (default runs/benchmarks/<UTC time>)")
    parser.add_argument(
        "--quick", action="store_true", help="CI scale: short calls, a 3-point grid, small kernels (under a minute)"
    )
    args = parser.parse_args(argv)
    overrides = dict(data_dir=args.data_dir, out=args.out)
    return Config.quick(**overrides) if args.quick else Config(**overrides)


def main(argv=None):
    """Runs the three sections; writes and returns `<out>/results.json`, prints the tables."""
    config = parse_args(argv)
    data = gas_sensor.load_ethanol(config.data_dir)
    run_dir = make_run_dir(config.out, "benchmarks")
    keras.utils.set_random_seed(0)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": dataclasses.asdict(config),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "data": data.description,
    }
    results["fullbatch"] = fullbatch_section(config, data.x, data.y)
    results["layer"] = layer_section(config)
    results["update_rule"] = update_rule_section(config)
    results["loadavg_end"] = os.getloadavg()
    write_json_atomic(run_dir / "results.json", results)
    print(format_tables(results))
    print(f"\nresults: {run_dir / 'results.json'}")
    return run_dir / "results.json"


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")  # the benign "retracing" notes of the many models' functions
    main()
