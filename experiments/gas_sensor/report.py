"""The report of a gas sensor run: per-configuration summaries under the counting rules, the
shared targets and speedups against depth 1, results.json and the printed table."""

import dataclasses
import math

import numpy as np

from experiments.common import curves
from experiments.common import rates as rate_rules
from experiments.common.cli import format_seconds, lazy_import
from experiments.common.run_folder import write_json_atomic
from experiments.gas_sensor import stages
from experiments.gas_sensor.plan import TARGET_FACTORS
from experiments.gas_sensor.sensitivity import stays_below_from

keras = lazy_import("keras")


def target_key(target):
    """A target as a results.json key."""
    return f"{target:.6g}"


def points_at(result, rate):
    """The grid points of `result` (a `GridResult`) trained at `rate`."""
    return np.flatnonzero(result.learning_rates == rate)


def best_band(result, summary):
    """The median loss curve over seeds at the best rate, and its min and max (the band)."""
    losses = result.losses[:, points_at(result, summary["best_learning_rate"])]
    return np.median(losses, axis=1), np.min(losses, axis=1), np.max(losses, axis=1)


def summarize(result, targets, excluded=()):
    """Per-configuration summary of its full-horizon `GridResult` under the counting rules of
    `experiments.common.curves`: per target the best rate by the median over seeds
    (`rates.choose_rates`), the configuration's best rate (`stages.best_rate`: among the rates
    whose median final losses are equal within FINAL_LOSS_TOLERANCE, the fastest to the hardest
    target reached), its median final loss and range, and per grid point the flags and
    recovered spikes. Rates in `excluded` (unusable by the blow-up rule, or above the stability
    edge) count as flagged."""
    excluded = {float(r) for r in excluded}
    reports = stages.reports(result, targets, excluded)
    finals = result.losses[-1]
    flags = {
        "diverged_at": [r["diverged_at"] for r in reports],
        "spikes": [r["spikes"] for r in reports],
        "largest_spike": [r["largest_spike"] for r in reports],
        "stalled": [r["stalled"] for r in reports],
        "oscillating": [r["oscillating"] for r in reports],
    }
    choices = rate_rules.choose_rates(result.learning_rates, result.seeds, reports, len(targets), finals)
    best = stages.best_rate(result, targets, excluded)
    if best is None:
        return {
            "diverged": all(r["diverged_at"] is not None for r in reports),
            "excluded_rates": sorted(excluded),
            "best_learning_rate": None,
            "final_loss": None,
            "iterations_to_target": {},
            "per_target": {},
            "flags": flags,
        }
    points = points_at(result, best)
    return {
        "diverged": False,
        "best_learning_rate": float(best),
        "best_on_edge": rate_rules.on_edge(result.learning_rates, best),
        "excluded_rates": sorted(excluded),
        "final_loss": float(np.median(finals[points])),
        "final_loss_range": [float(finals[points].min()), float(finals[points].max())],
        "spikes_at_best": int(sum(reports[g]["spikes"] for g in points)),
        "iterations_to_target": {target_key(t): c["median"] for t, c in zip(targets, choices)},
        "per_target": {target_key(t): c for t, c in zip(targets, choices)},
        "flags": flags,
    }


def grid_table(result):
    """A `GridResult`'s rates, seeds, final losses and divergence marks, JSON-ready."""
    return {
        "learning_rates": result.learning_rates,
        "seeds": result.seeds,
        "final_losses": [None if not math.isfinite(v) else float(v) for v in result.losses[-1]],
        "diverged_at": [None if v < 0 else int(v) for v in result.diverged_at],
    }


def configuration_record(run, view, seconds):
    """What results.json holds of one configuration (`records.configuration_view`) before its
    summary: its full-horizon grid (final, below and edge rounds, early failures left out),
    the screen, every stage's rates, seeds and blow-up estimates, the early failures by seed,
    the unusable rates, the stability edge and the rate x sharpness."""
    screen = view["screen"]
    return {
        "label": run.label,
        "loss_p": run.spec.p,
        "spec": jsonable(run.spec),
        "data": run.data_key,
        "rate_shift_decades": run.rate_shift,
        "grid": grid_table(view["grid"]),
        "screen": {**grid_table(screen), "iterations": int(screen.iterations[-1])},
        "stages": view["stages"],
        "early_failures": view["failures"],
        "unusable_rates": view["unusable"],
        "stability_edge": view["edge"],
        "lr_x_sharpness": view["sharpness"],
        "seconds": seconds,
    }


def target_groups(runs):
    """Configurations that share targets: per loss on the default data ("l4", "l2"; baseline
    l<p>/gd-d1), per data variant for the preprocessing figure ("pre/<variant>"; baseline
    pre/<variant>/gd-d1). Returns {group: (baseline name, runs)}."""
    groups = {}
    for run in runs:
        group = f"l{run.spec.p:g}" if run.data_key == "default" else f"pre/{run.data_key}"
        baseline = f"{group}/gd-d1"
        groups.setdefault(group, (baseline, []))[1].append(run)
    return groups


def add_targets_and_ratios(summaries, results, groups, given=None, excluded=None):
    """Shared targets per group (`target_groups`; `given` {group: targets} where known, as the
    stage machine ranks with them, `stages.ranking_targets`; else multiples of its depth-1 GD's
    best final loss, the lowest median over seeds among its rates with no diverged seed) and
    every configuration's summary (`summarize`, with the rates `excluded[name]`) and speedup
    over that depth 1 per target: the ratio of the medians of the iterations-to-target (each
    at its own best rate for that target), with the range of the per-seed ratios (common
    seeds). Returns {group: targets}."""
    table, given, excluded = {}, given or {}, excluded or {}
    for group, (baseline, runs) in groups.items():
        runs = [r for r in runs if r.name in results]
        if baseline not in results:
            continue
        base = results[baseline]
        medians = []
        for rate in np.unique(base.learning_rates):
            points = points_at(base, rate)
            if all(curves.diverged_at(base.iterations, base.losses[:, g]) is None for g in points):
                medians.append(float(np.median(base.losses[-1, points])))
        targets = given.get(group)
        if targets is None:
            if not medians:
                continue
            targets = [factor * float(min(medians)) for factor in TARGET_FACTORS]
        for run in runs:
            summaries[run.name].update(summarize(results[run.name], targets, excluded.get(run.name, ())))
        base_targets = summaries[baseline]["per_target"]
        for run in runs:
            own = summaries[run.name]["per_target"]
            ratios = {}
            for key, base_choice in base_targets.items():
                ratio, span = curves.speedup(base_choice["per_seed"], own.get(key, {}).get("per_seed", {}))
                ratios[key] = {"ratio": ratio, "range": None if span[0] is None else list(span)}
            summaries[run.name]["acceleration_vs_depth1"] = ratios
        table[group] = targets
    return table


def preprocessing_shapes(results, summaries):
    """Per data variant of the preprocessing figure, the paper's l4 shape test: the median
    final loss of depth 1 over depth 2 (the paper: ~7x) and the logged iteration from which
    depth 2's median curve stays below depth 1's (the paper: late, ~150k of 10^6)."""
    shapes = {}
    for name in results:
        if not (name.startswith("pre/") and name.endswith("/gd-d1")):
            continue
        deep = name[: -len("gd-d1")] + "gd-d2-w1"
        if (
            deep not in results
            or summaries[name].get("best_learning_rate") is None
            or summaries[deep].get("best_learning_rate") is None
        ):
            continue
        shallow_curve = best_band(results[name], summaries[name])[0]
        deep_curve = best_band(results[deep], summaries[deep])[0]
        shapes[name.split("/")[1]] = {
            "final_ratio_depth1_over_depth2": float(shallow_curve[-1] / deep_curve[-1]),
            "depth2_below_from": stays_below_from(results[name].iterations, deep_curve, shallow_curve),
        }
    return shapes


def counting_rules():
    """The thresholds of the counting rules, recorded with the results."""
    names = (
        "FELL_FRACTION",
        "SPIKE_FACTOR",
        "STALL_FACTOR",
        "TAIL_FRACTION",
        "RISE_TOLERANCE",
        "OSCILLATION_MIN_RISES",
    )
    return {name.lower(): getattr(curves, name) for name in names}


def write_results(path, data, config, summaries, targets, results, sessions, extra=None):
    """Writes results.json atomically: the summaries, targets, best curves and rules, the wall
    time of every session of the run (`sessions`, list of {"started", "seconds"}) with their
    sum as `seconds`, and the sections of `extra`."""
    best_curves = {}
    for name, summary in summaries.items():
        if summary.get("best_learning_rate") is not None:
            median, low, high = best_band(results[name], summary)
            best_curves[name] = {
                "iterations": results[name].iterations,
                "loss": median,
                "loss_min": low,
                "loss_max": high,
            }
    write_json_atomic(
        path,
        {
            "data": data.description,
            "batches": list(data.batches),
            "rows": int(data.x.shape[0]),
            "iterations": config.iterations,
            "targets": targets,
            "seconds": sum(session["seconds"] for session in sessions),
            "sessions": sessions,
            "rules": counting_rules(),
            "configurations": summaries,
            "best_curves": best_curves,
            "preprocessing": preprocessing_shapes(results, summaries),
            **(extra or {}),
        },
    )


def print_summary(summaries, targets, seconds):
    """The table of best rates, final losses and speedups, on standard output."""
    print(
        f"\n{'configuration':34s} {'best lr':>9s} {'final loss (median, range)':>30s} {'spikes':>6s}  "
        "speedup vs depth 1 at targets: median ratio [per-seed range]"
    )
    for name, s in summaries.items():
        if s.get("best_learning_rate") is None:
            print(f"{name:34s} {'diverged' if s.get('diverged') else 'all flagged':>9s}")
            continue
        ratios = " ".join(
            "-"
            if not r or r["ratio"] is None
            else f"{r['ratio']:.2f}" + ("" if not r["range"] else f" [{r['range'][0]:.2f}-{r['range'][1]:.2f}]")
            for r in s.get("acceleration_vs_depth1", {}).values()
        )
        low, high = s["final_loss_range"]
        edge = "*" if s.get("best_on_edge") else " "
        print(
            f"{name:34s} {s['best_learning_rate']:8.3g}{edge} {s['final_loss']:11.4g} [{low:.4g}, {high:.4g}]"
            f" {s['spikes_at_best']:6d}  {ratios}"
        )
    print("*: best rate on the edge of the refined rates (flagged)")
    for loss, values in targets.items():
        print(f"targets {loss}: " + ", ".join(f"{v:.4g}" for v in values))
    print(f"total time: {format_seconds(seconds)} ({seconds:.0f} s, all sessions)")


def jsonable(obj):
    """A dataclass (a `Config`, a `ChainSpec`) as JSON-ready values; initializers serialized."""
    if dataclasses.is_dataclass(obj):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if not isinstance(obj, (str, int, float, list, tuple, dict, type(None))) and isinstance(
        obj, keras.initializers.Initializer
    ):
        return keras.initializers.serialize(obj)
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
