"""Section 1 of `benchmarks.run`: the full-batch engine against Keras' `fit` on the gas sensor
workload (1316 x 128 Ethanol rows, l4 loss, one output, no bias, GD), and the machine's bound."""

import keras
import numpy as np
import tensorflow as tf

from benchmarks.timing import Case, compiled_loop, measure
from experiments import gas_sensor as gas_experiment
from experiments.engine.fullbatch import UNROLL, ChainSpec, FullBatchTrainer
from tf_overparam.initializers import NearZero
from tf_overparam.losses import LpLoss

P = 4  # the l4 loss of the experiment's headline figure
# The engine's configurations: name -> (label, spec); near-zero init as in the experiment.
_INIT = NearZero(gas_experiment.Config().init_stddev)
ENGINE_SPECS = {
    "engine": ("engine, GD depth 1", ChainSpec(depth=1, p=P, initializer=_INIT)),
    "engine_depth2": ("engine, GD depth 2 width 1", ChainSpec(depth=2, hidden_units=1, p=P, initializer=_INIT)),
    "engine_end_to_end": ("engine, eq. 24 depth 2", ChainSpec(depth=2, update="end_to_end", p=P, initializer=_INIT)),
}


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
    """Steps per second, ratios to naive `fit` and to the bound, per grid."""
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
        "labels": {
            "keras_fit": f"`model.fit`, one epoch per step, {config.fit_epochs} epochs a call (naive)",
            "keras_fit_spe": f"`model.fit`, steps_per_execution={config.steps_per_execution}",
            **{method: label for method, (label, _) in ENGINE_SPECS.items()},
        },
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
