"""What results.json holds beyond the summaries: each configuration's view of its stages (the
grid it is summarised on, the blow-up estimates, the early failures, the edge, the rate x
sharpness), the sensitivity of the headline to depth 1's rate, and what a rerun needs."""

import inspect
import warnings

import numpy as np

from experiments import stability
from experiments.common import rates as rate_rules
from experiments.common.cli import lazy_import
from experiments.gas_sensor import plan, sensitivity, sharpness_plots, stages

fullbatch = lazy_import("experiments.engine.fullbatch")
initializers = lazy_import("tf_overparam.initializers")

DEEP_HEADLINE = ("l4/gd-d2-w1", "l4/e2e-d2")  # compared with depth 1 in the sensitivity table


def rate_key(rate):
    """A rate as a results.json key (10 significant digits: edge rounds' rates lie 0.5% apart)."""
    return f"{float(rate):.10g}"


def stage_record(part):
    """One finished stage (`stages.Counted`): its rates, seeds, horizon, early screen (seeds,
    iterations, per rate a `BlowupEstimate`) and early failures."""
    stage = part.stage
    return {
        "kind": stage.kind,
        "learning_rates": list(stage.learning_rates),
        "seeds": list(stage.seeds),
        "iterations": stage.iterations,
        "early": {
            "seeds": len(stage.early_seeds),
            "iterations": stage.early_iterations,
            "threshold": stability.BLOWUP_THRESHOLD,
            "estimates": [part.estimates[float(r)].as_dict() for r in stage.learning_rates],
        },
        "early_failures": {rate_key(r): seeds for r, seeds in sorted(part.failures.items())},
        "unusable_rates": sorted(part.unusable),
    }


def lr_x_sharpness(parts):
    """{rate: {"iterations", "median", "max"}} of rate x sharpness over the seeds of the
    full-horizon stages `parts` that computed it; {} where none did."""
    table = {}
    for part in parts:
        grid = part.grid
        values = getattr(grid, "sharpness", None)
        if values is None or np.size(values) == 0:
            continue
        for rate in np.unique(grid.learning_rates):
            scaled = float(rate) * np.asarray(values)[:, grid.learning_rates == rate]
            finite = np.where(np.isfinite(scaled), scaled, np.nan)
            # A log where every seed had diverged is all NaN: NaN is its answer, not a warning.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                median, top = np.nanmedian(finite, axis=1), np.nanmax(finite, axis=1)
            table[rate_key(rate)] = {
                "iterations": [int(i) for i in grid.sharpness_iterations],
                "median": [None if not np.isfinite(v) else float(v) for v in median],
                "max": [None if not np.isfinite(v) else float(v) for v in top],
            }
    return table


def configuration_view(config, run, state):
    """A configuration from its `stages.Machine` state: `grid` (its full-horizon stages merged,
    early failures left out), `excluded` rates (unusable, or above the edge's stable rate),
    `failures`, `unusable`, `edge`, `stages`, `sharpness`, `screen` and `sensitivity`."""
    screen, full = state.parts[0], state.parts[1:]
    grid = stages.merge([p.grid for p in full])
    unusable = sorted(set().union(*(p.unusable for p in full)))
    excluded = set(unusable)
    edge = None if state.edge is None else state.edge.record
    if edge is not None and edge["stable"] is not None:
        excluded |= {float(r) for r in np.unique(grid.learning_rates) if r > edge["stable"]}
    failures = {}
    for part in full:
        for rate, seeds in part.failures.items():
            failures.setdefault(rate_key(rate), []).extend(seeds)
    records = {p.stage.name: stage_record(p) for p in state.parts}
    if state.sensitivity is not None:
        records[state.sensitivity.stage.name] = stage_record(state.sensitivity)
    return {
        "grid": grid,
        "excluded": excluded,
        "failures": failures,
        "unusable": unusable,
        "edge": edge,
        "stages": records,
        "sharpness": lr_x_sharpness(full),
        "screen": screen.raw,
        "sensitivity": state.sensitivity,
    }


def sensitivity_section(run_dir, config, views, results, summaries):
    """The sensitivity table (`experiments.gas_sensor.sensitivity`), once `l4/gd-d1`'s
    sensitivity stage and a deep headline configuration are done, and its figure
    (sensitivity.png); None before."""
    baseline = views.get(plan.HEADLINE[0], {}).get("sensitivity")
    others = {
        name: (results[name], summaries[name])
        for name in DEEP_HEADLINE
        if name in results and summaries.get(name, {}).get("best_learning_rate") is not None
    }
    if baseline is None or not others:
        return None
    table = sensitivity.sensitivity_table(baseline.raw, others, baseline.failures or None)
    sensitivity.plot_sensitivity(run_dir / "sensitivity.png", table, config.is_quick)
    return table


SHARPNESS_FIGURE = ("l4/gd-d1", "l4/gd-d2-w1")  # GD chains: there 2 / rate bounds the sharpness


def sharpness_section(run_dir, config, summaries):
    """sharpness.png (`experiments.gas_sensor.sharpness_plots`) of the configurations of
    SHARPNESS_FIGURE that have rate x sharpness traces; nothing before the first has."""
    traced = {name: summaries[name] for name in SHARPNESS_FIGURE if summaries.get(name, {}).get("lr_x_sharpness")}
    if traced:
        sharpness_plots.plot_sharpness(run_dir / "sharpness.png", traced, config.is_quick)


def constants(config):
    """The counting constants of the protocol: the blow-up rule's, the edge's, the ranking's and
    the engine's divergence bound (a loss above this factor x the initial loss diverged)."""
    bound = inspect.signature(fullbatch.FullBatchTrainer.__init__).parameters["blowup"].default
    return {
        "blowup_rule": stages.BLOWUP_RULE,
        "blowup_threshold": stability.BLOWUP_THRESHOLD,
        "screen_seeds": config.screen_seeds,
        "early_iterations": config.early_iterations,
        "late_seeds": config.late_seeds,
        "confidence": stability.CONFIDENCE,
        "edge_rel_tol": stability.EDGE_REL_TOL,
        "edge_points_per_round": config.edge_points,
        "edge_max_rounds": stages.EDGE_MAX_ROUNDS,
        "final_loss_tolerance": rate_rules.FINAL_LOSS_TOLERANCE,
        "target_factors": list(plan.TARGET_FACTORS),
        "sensitivity_low": plan.SENSITIVITY_LOW,
        "sensitivity_points": config.sensitivity_points,
        "divergence_bound_factor": bound,
    }


def rerun_info(config, datas, views, rules):
    """What a rerun needs: every stage's rates, seeds and horizon (and its early screen's), the
    initialiser and its stddev, the data files (sha256, rows) and preprocessing, the constants."""
    from experiments.gas_sensor.report import jsonable

    data = datas["default"]
    return {
        "stages": {
            name: {k: record[k] for k in ("learning_rates", "seeds", "iterations")}
            | {"early_seeds": record["early"]["seeds"], "early_iterations": record["early"]["iterations"]}
            for view in views.values()
            for name, record in view["stages"].items()
        },
        "initializer": jsonable(initializers.NearZero(config.init_stddev)),
        "init_stddev": config.init_stddev,
        "data_files": data.files,
        "rows": int(data.x.shape[0]),
        "preprocessing": {key: d.description for key, d in datas.items()},
        "constants": {**rules, **constants(config)},
        "log_points": config.log_points,
    }
