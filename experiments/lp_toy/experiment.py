"""The l_p toy's runs on the shared full-batch engine: each method over a grid of rates, the
per-rate outcomes, the bisected stability edge and the headline."""

import math
import time

import keras
import numpy as np

from experiments.common import curves as counting
from experiments.common import rates as rate_rules
from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer, log_schedule
from experiments.lp_toy.protocol import METHODS, predicted_slow_iterations, rate_grid, stability_bound
from tf_overparam import initializers


def spec(method, config):
    """The engine's `ChainSpec` of a method (see the module docstring)."""
    if method == "gd":
        return ChainSpec(depth=1, initializer="zeros", p=config.p)
    start = keras.initializers.Constant(config.init_scale / math.sqrt(2))
    balanced = initializers.Balanced(start, seed=0)
    update = "end_to_end" if method == "end_to_end" else "chain"
    return ChainSpec(depth=2, hidden_units=config.hidden_units, update=update, initializer=balanced, p=config.p)


def run_method(method, config, rates, schedule):
    """Runs `method` at every rate for `schedule[-1]` full-batch steps on the shared engine.

    Returns a dict of NumPy arrays, R = len(rates), T = len(schedule): `iterations` (T,);
    `losses` (T, R); `history` (T, R, 2), the relative errors |w_k - y_k| / y_k at the logs
    (NaN once diverged); `diverged_at` (R,), the engine's divergence iteration, else the
    bounded blow-up rule's logged iteration (-1 if neither); `iterations_to_target` (R, 2),
    the sustained crossing per coordinate (-1 if not reached); `final_error` (R, 2).
    """
    labels = config.labels
    trainer = FullBatchTrainer(
        np.eye(2), labels[:, np.newaxis], spec(method, config), rates, blowup=config.divergence_factor, dtype="float64"
    )
    errors = []

    def on_log(trainer, iteration, losses):
        error = np.abs(trainer.kernel().numpy()[..., 0] - labels) / labels
        errors.append(np.where(np.isfinite(losses)[:, np.newaxis], error, np.nan))

    result = trainer.run(int(schedule[-1]), schedule=schedule, on_log=on_log)
    history = np.asarray(errors)
    diverged = np.array(
        [
            engine if engine >= 0 else _or_minus_one(counting.diverged_at(result.iterations, result.losses[:, g]))
            for g, engine in enumerate(result.diverged_at)
        ]
    )
    history[:, diverged >= 0] = np.where(
        result.iterations[:, np.newaxis, np.newaxis] < diverged[diverged >= 0, None], history[:, diverged >= 0], np.nan
    )
    reached = np.array(
        [
            [
                _or_minus_one(counting.sustained_crossing(result.iterations, history[:, g, k], config.target))
                for k in (0, 1)
            ]
            for g in range(len(rates))
        ]
    )
    return {
        "iterations": result.iterations,
        "losses": result.losses,
        "history": history,
        "diverged_at": diverged,
        "iterations_to_target": reached,
        "final_error": history[-1],
    }


def _or_minus_one(value):
    return -1 if value is None else value


def _iterations_or_none(value):
    return None if value < 0 else int(value)


def _errors_or_none(errors):
    """Errors as JSON lists, a diverged run's NaN as None (strict JSON)."""
    return [None if math.isnan(e) else e for e in np.asarray(errors).tolist()]


def _both(outcome):
    """Iterations until both coordinates stay within the target (-1: not reached)."""
    per_coordinate = outcome["iterations_to_target"]
    return np.where((per_coordinate >= 0).all(axis=1), per_coordinate.max(axis=1), -1)


def _entry(rates, outcome, i):
    """One rate's outcome, JSON-ready."""
    both = _both(outcome)
    return {
        "index": int(i),
        "eta": float(rates[i]),
        "diverged_at": _iterations_or_none(outcome["diverged_at"][i]),
        "iterations": _iterations_or_none(both[i]),
        "iterations_per_coordinate": [_iterations_or_none(n) for n in outcome["iterations_to_target"][i]],
        "final_error": _errors_or_none(outcome["final_error"][i]),
    }


def summarize(rates, outcome):
    """Per-rate outcomes, the best rate (fastest to target, both coordinates), the largest
    rate below the first diverging one (the contiguous stable range) and the best there."""
    both = _both(outcome)
    converged = both >= 0
    diverged = outcome["diverged_at"] >= 0
    first_divergent = int(np.argmax(diverged)) if diverged.any() else len(rates)

    def best(mask):
        if not mask.any():
            return None
        candidates = np.flatnonzero(mask)
        return _entry(rates, outcome, int(candidates[np.argmin(both[candidates])]))

    return {
        "rates": rates.tolist(),
        "diverged_at": [_iterations_or_none(n) for n in outcome["diverged_at"]],
        "iterations_to_target": [_iterations_or_none(n) for n in both],
        "iterations_to_target_per_coordinate": [
            [_iterations_or_none(n) for n in row] for row in outcome["iterations_to_target"]
        ],
        "final_error": [_errors_or_none(row) for row in outcome["final_error"]],
        "best": best(converged),
        "first_divergent_rate": float(rates[first_divergent]) if first_divergent < len(rates) else None,
        "largest_rate_below_first_divergence": float(rates[first_divergent - 1]) if first_divergent else None,
        "best_below_first_divergence": best(converged & (np.arange(len(rates)) < first_divergent)),
    }


def largest_stable(method, config, rates, outcome, summary, schedule):
    """Bisects the stability edge between the largest grid rate below the first divergence and
    that first diverging rate (grid run: `rates`, `outcome`, `summary`); returns the edge
    bracket, the outcome at its stable end (the method's largest stable rate) and its curve.
    None if the grid has no such bracket."""
    low, high = summary["largest_rate_below_first_divergence"], summary["first_divergent_rate"]
    if low is None or high is None:
        return None
    runs = {float(eta): (rates, outcome, i) for i, eta in enumerate(rates)}

    def is_stable(candidates):
        result = run_method(method, config, candidates, schedule)
        runs.update({float(eta): (candidates, result, i) for i, eta in enumerate(candidates)})
        return result["diverged_at"] < 0

    low, high = rate_rules.stability_edge(is_stable, low, high, rounds=config.edge_rounds)
    at_rates, at_outcome, i = runs[low]
    return {"bracket": [low, high], "at_edge": _entry(at_rates, at_outcome, i), "curve": at_outcome["history"][:, i].T}


def run(config):
    """Runs the whole experiment; returns the results dict (JSON-ready)."""
    bound = stability_bound(config.p, config.y1)
    near_bound = np.array([(1 - config.margin) * bound, (1 + config.margin) * bound])
    grid = rate_grid(config)
    schedule = log_schedule(config.iterations, config.log_points)
    results = {"bound": bound, "bound_formula": "eta < 4 / y1^(p-2)  (loss averaged over the m = 2 points)"}
    curves = {"iterations": schedule.tolist()}
    methods, seconds = {}, {}
    for method in METHODS:
        rates = np.sort(np.concatenate([grid, near_bound])) if method == "gd" else grid
        start = time.perf_counter()
        outcome = run_method(method, config, rates, schedule)
        summary = summarize(rates, outcome)
        edge = largest_stable(method, config, rates, outcome, summary, schedule)
        seconds[method] = time.perf_counter() - start
        if edge is not None:
            summary["stability_edge"] = edge["bracket"]
            summary["at_largest_stable_rate"] = edge["at_edge"]
            curves[f"{method}_largest_stable"] = edge["curve"].tolist()
        methods[method] = summary
        if method == "gd":
            below, above = (int(np.flatnonzero(rates == eta)[0]) for eta in near_bound)
            results["stability"] = {
                "margin": config.margin,
                "below": _entry(rates, outcome, below),
                "above": _entry(rates, outcome, above),
                "predicted_iterations_coordinate_2": predicted_slow_iterations(
                    config.p, near_bound[0], config.y2, config.target
                ),
            }
            curves["gd_below_bound"] = outcome["history"][:, below].T.tolist()
        best = summary["best"]
        curves[method] = None if best is None else outcome["history"][:, best["index"]].T.tolist()
    results["methods"] = methods
    results["headline"] = headline(methods)
    results["curves"] = curves
    results["seconds"] = seconds
    return results


def headline(methods):
    """Each method at its largest stable rate: iterations to target (both coordinates, and
    per coordinate) and the speedup over GD at GD's largest stable rate."""
    rows = {}
    gd = (methods["gd"].get("at_largest_stable_rate") or {}).get("iterations")
    for method, summary in methods.items():
        at_edge = summary.get("at_largest_stable_rate")
        if at_edge is None:
            rows[method] = None
            continue
        n = at_edge["iterations"]
        rows[method] = {
            "eta": at_edge["eta"],
            "iterations": n,
            "iterations_per_coordinate": at_edge["iterations_per_coordinate"],
            "speedup_vs_gd": gd / n if gd and n else None,
        }
    return rows
