"""An independent rerun: a quick gas sensor run through its command line, then depth-2 width-1
GD on the l4 loss recomputed with plain NumPy float64 code from what the run folder records
(rates, seeds, the configuration's spec, the data files' sha256, the logged iterations), and
compared with the losses the run logged and the final loss results.json reports.

The data are loaded with the experiment's own loader and the initial chain is drawn with the
library's initialiser, seeded as the engine seeds it: they are inputs, not what is tested.
The gradient descent and the loss are this file's own code."""

import hashlib
import json
import math

import numpy as np
import pytest

from experiments import gas_sensor
from experiments.data import gas_sensor as gas_data
from tf_overparam.initializers import initialize_chain, seeded

NAME = "l4/gd-d2-w1"
ITERATIONS = 2000
BLOWUP = 1e6  # the engine's default divergence bound: a loss above 10^6 x the initial loss
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def _sha256(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def _initial_chain(spec, seed, inputs, units):
    """The engine's draw for one grid point: the chain's factors from the library initialiser
    with the grid point's seed, as float64, then held in float32 as the engine holds them."""
    shapes = [(inputs, spec["hidden_units"]), (spec["hidden_units"], units)]
    chain = initialize_chain(seeded(spec["initializer"], seed), shapes, dtype="float64")
    return [np.asarray(f, dtype=np.float32).astype(np.float64) for f in chain]


def _lp_loss(x, y, w, p):
    """The mean over examples of (1/p)|x w - y|^p."""
    return float(np.mean(np.abs(x @ w - y) ** p) / p)


def _rerun(x, y, spec, rate, seed, logged):
    """Plain GD on the chain w = W1 W2: with g = dL/dw = (1/n) x^T (|r|^(p-1) sign r), r = x w - y,
    the factor gradients are dL/dW1 = g W2^T and dL/dW2 = W1^T g. Returns the loss after each
    iteration of `logged`, NaN from the step whose loss is non-finite or above BLOWUP x the
    initial loss (as the engine marks divergence)."""
    p = spec["p"]
    w1, w2 = _initial_chain(spec, seed, x.shape[1], y.shape[1])
    bound = BLOWUP * _lp_loss(x, y, w1 @ w2, p)
    losses, diverged, log_at = {}, False, {int(t) for t in logged}
    for step in range(int(logged[-1]) + 1):
        loss = _lp_loss(x, y, w1 @ w2, p)
        diverged = diverged or not loss <= bound
        if step in log_at:
            losses[step] = math.nan if diverged else loss
        if diverged:
            break
        residual = x @ (w1 @ w2) - y
        g = x.T @ (np.abs(residual) ** (p - 1) * np.sign(residual)) / x.shape[0]
        w1, w2 = w1 - rate * g @ w2.T, w2 - rate * w1.T @ g
    return np.array([losses.get(int(t), math.nan) for t in logged])


def test_numpy_rerun_matches_a_quick_run(gas_sensor_dir, tmp_path):
    # The smallest figure that holds depth-2 GD: l4 GD depth 1, depth 2 and depth 2 from the
    # identity; 3 seeds for the headline configurations.
    argv = ["--quick", "--figure", "init", "--seeds", "1", "--headline-seeds", "3"]
    argv += ["--iterations", str(ITERATIONS), "--data-dir", str(gas_sensor_dir), "--out", str(tmp_path)]
    run_dir = gas_sensor.main(argv)
    config = json.loads((run_dir / "config.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    record = results["configurations"][NAME]
    with np.load(run_dir / "grids" / (NAME.replace("/", "__") + ".npz")) as grid:
        logged, run_losses = grid["iterations"], grid["losses"]

    # The data the run read: the same files (by sha256), then the loader's z-scoring.
    for name, entry in config["data_files"].items():
        assert _sha256(entry["path"]) == entry["sha256"], name
    data = gas_data.load_ethanol(config["data_dir"] or str(gas_sensor_dir))
    x, y = data.x.astype(np.float64), data.y.astype(np.float64)
    assert x.shape[0] == results["rows"]

    spec = record["spec"]
    assert (spec["depth"], spec["hidden_units"], spec["update"], spec["optimizer"], spec["p"]) == (
        2,
        1,
        "chain",
        "gd",
        4,
    )
    assert spec["weight_decay"] == 0
    rates, seeds = record["grid"]["learning_rates"], record["grid"]["seeds"]
    assert len(set(seeds)) == 3 and logged[-1] == ITERATIONS
    mine = np.stack([_rerun(x, y, spec, rate, seed, logged) for rate, seed in zip(rates, seeds)], axis=1)

    # float32 against float64 from the same float32 start: each step's gradient is a float32
    # sum over n examples, relative rounding about sqrt(n) u (u = 2^-24); gradient descent on
    # a non-expanding map carries such errors along without growing them, so after T steps
    # they are at most about T sqrt(n) u (here 2000 x 36 x 6e-8, 4e-3).
    rtol = ITERATIONS * math.sqrt(x.shape[0]) * FLOAT32_UNIT_ROUNDOFF
    np.testing.assert_array_equal(np.isnan(mine), np.isnan(run_losses))
    assert np.isfinite(mine[-1]).any()
    np.testing.assert_allclose(mine, run_losses, rtol=rtol)
    # The reported final loss: the median over seeds at the best rate.
    best = record["best_learning_rate"]
    at_best = [g for g, rate in enumerate(rates) if rate == best]
    assert len(at_best) == 3
    assert record["final_loss"] == pytest.approx(float(np.median(mine[-1, at_best])), rel=rtol)
    assert results["best_curves"][NAME]["loss"] == pytest.approx(list(np.median(mine[:, at_best], axis=1)), rel=rtol)
