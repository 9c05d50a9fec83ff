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


def _lp_losses(x, y, kernels, p):
    """The mean over examples of (1/p)|x w - y|^p, for each column w of `kernels`."""
    return np.mean(np.abs(x @ kernels - y) ** p, axis=0) / p


def _rerun(x, y, spec, rates, seeds, logged):
    """Plain GD on the chains w = W1 W2 of every grid point (rate, seed) side by side: with
    r = x w - y and g = dL/dw = (1/n) x^T (|r|^(p-1) sign r), the factor gradients are
    dL/dW1 = g W2^T and dL/dW2 = W1^T g. Returns the loss after each iteration of `logged`,
    (logged, grid points), NaN from the step whose loss is non-finite or above BLOWUP x the
    initial loss (as the engine marks divergence); a diverged point stops moving."""
    p, rates = spec["p"], np.asarray(rates, dtype=np.float64)
    chains = [_initial_chain(spec, seed, x.shape[1], y.shape[1]) for seed in seeds]
    w1 = np.stack([c[0] for c in chains])  # (points, inputs, hidden)
    w2 = np.stack([c[1] for c in chains])  # (points, hidden, 1)
    bound = BLOWUP * _lp_losses(x, y, (w1 @ w2)[:, :, 0].T, p)
    diverged = np.zeros(len(rates), dtype=bool)
    losses, log_at = {}, {int(t) for t in logged}
    with np.errstate(invalid="ignore", over="ignore"):  # a diverged point may overflow
        for step in range(int(logged[-1]) + 1):
            residual = x @ (w1 @ w2)[:, :, 0].T - y  # (examples, points)
            loss = np.mean(np.abs(residual) ** p, axis=0) / p
            diverged |= ~(loss <= bound)
            if step in log_at:
                losses[step] = np.where(diverged, math.nan, loss)
            g = (x.T @ (np.abs(residual) ** (p - 1) * np.sign(residual)) / x.shape[0]).T[:, :, None]
            moving = np.where(diverged, 0.0, rates)[:, None, None]
            w1, w2 = w1 - moving * (g @ w2.transpose(0, 2, 1)), w2 - moving * (w1.transpose(0, 2, 1) @ g)
    return np.stack([losses[int(t)] for t in logged])


def test_numpy_rerun_matches_a_quick_run(quick_gas_sensor_run, gas_sensor_dir):
    run_dir = quick_gas_sensor_run  # `--quick`: 2000 iterations, 3 seeds for the headline configurations
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
    mine = _rerun(x, y, spec, rates, seeds, logged)

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
