"""How much the headline depends on depth 1's learning rate: a table and a figure of the deep
configurations' speedup and final ratio against depth-1 GD, at each rate of depth 1 from 0.002
up to its stability edge, the deep configurations each at their own best rate.

Definitions (curves are `GridResult` columns logged at `iterations`; NaN after a divergence):

- Used seeds: depth 1's seeds at rate r, less the `excluded` ones (seeds that blew up in the
  first iterations at r: that seed's failure, reported, left out of every median). A used
  seed that diverges (`experiments.common.curves.diverged_at`) stays in: its loss counts as
  infinite from then on, so its final loss and its iterations-to-target are infinite.
- Depth 1's final loss at r: the median over used seeds of the final logged loss, with its
  range (min, max; None where infinite). Where every used seed diverged, or none is used,
  every entry of the row but the seed lists is None.
- Speedup at r: as `report.add_targets_and_ratios` defines it for one target, with the target
  T = depth 1's final loss at r: per seed, the iterations to T by the sustained-crossing rule
  (`curves.sustained_crossing`: the first logged iteration from which the loss stays <= T at
  every later log); the speedup is the median over depth 1's used seeds divided by the median
  over the other configuration's seeds at its best rate (`curves.speedup`; a seed that never
  reaches T counts as infinite; None where a median is infinite), with the range of the
  per-seed ratios over the seeds both have.
- Final ratio at r: depth 1's final loss at r over the other configuration's median final
  loss at its best rate (above 1: the other ends lower).
- Below from at r (`stays_below_from`): the first logged iteration from which the other's
  median curve over seeds (at its best rate) stays strictly below depth 1's median curve over
  used seeds at r, at every later log; None if it does not end below. In both medians a
  diverged seed counts as infinitely high.

An other configuration's best rate is its summary's `best_learning_rate` (`report.summarize`);
where that is None, its entries are None. Depth 1 and the others must share the log schedule.
"""

import math

import numpy as np

from experiments.common import curves
from experiments.common.cli import lazy_pyplot
from experiments.common.run_folder import replace_atomic

plt = lazy_pyplot()

PANEL_INCHES = (6.0, 4.5)
DPI = 80  # as the run's other figures


def _infinite_where_nan(values):
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=math.inf, posinf=math.inf)


def stays_below_from(iterations, curve, reference):
    """The first logged iteration from which `curve` < `reference` at every later log, or None
    (NaN counts as infinitely high, in either curve)."""
    below = _infinite_where_nan(curve) < _infinite_where_nan(reference)
    above = np.flatnonzero(~below)
    start = 0 if above.size == 0 else above[-1] + 1
    return int(iterations[start]) if start < len(iterations) else None


def _finite_or_none(value):
    return float(value) if value is not None and math.isfinite(value) else None


def _median_and_range(finals):
    median = float(np.median(finals))
    return _finite_or_none(median), [_finite_or_none(finals.min()), _finite_or_none(finals.max())]


def _points(result, rate):
    return np.flatnonzero(result.learning_rates == rate)


def _seed_curves(result, points):
    """{seed: curve} of the grid points `points`, NaN as infinite."""
    return {int(result.seeds[g]): _infinite_where_nan(result.losses[:, g]) for g in points}


def _rate_key(rates, rate, argument):
    matches = [r for r in rates if math.isclose(r, float(rate), rel_tol=1e-9)]
    if not matches:
        raise ValueError(f"`{argument}` names the rate {rate!r}, which depth 1 was not trained at ({list(rates)}).")
    return matches[0]


def _excluded_by_rate(baseline, rates, excluded):
    """`excluded` as {rate of `rates`: set of seeds}, each seed checked against the grid."""
    table = {r: set() for r in rates}
    for rate, seeds in (excluded or {}).items():
        key = _rate_key(rates, rate, "excluded")
        trained = {int(s) for s in baseline.seeds[_points(baseline, key)]}
        unknown = {int(s) for s in seeds} - trained
        if unknown:
            raise ValueError(
                f"`excluded` names seeds {sorted(unknown)} at rate {rate!r}; depth 1 has {sorted(trained)}."
            )
        table[key] |= {int(s) for s in seeds}
    return table


def _other_at_best(name, result, summary):
    """The other configuration at its best rate: per-seed curves, median curve and final loss."""
    best = summary.get("best_learning_rate")
    if best is None:
        return {"label": summary.get("label", name), "learning_rate": None}
    points = _points(result, best)
    if not points.size:
        raise ValueError(f"`others[{name!r}]`: its best rate {best!r} is not one of its grid's rates.")
    seed_curves = _seed_curves(result, points)
    median = np.median(np.stack(list(seed_curves.values()), axis=1), axis=1)
    return {
        "label": summary.get("label", name),
        "learning_rate": float(best),
        "curves": seed_curves,
        "median_curve": median,
        "final_loss": _finite_or_none(median[-1]),
    }


def _against(other, iterations, base_curves, base_median, base_final):
    """One other configuration's entries at one depth-1 rate (see the module docstring)."""
    if other["learning_rate"] is None or base_final is None:
        return {"speedup": None, "speedup_range": None, "final_ratio": None, "below_from": None}

    def to_target(seed_curves):
        return {s: curves.sustained_crossing(iterations, c, base_final) for s, c in seed_curves.items()}

    ratio, span = curves.speedup(to_target(base_curves), to_target(other["curves"]))
    final = other["final_loss"]
    return {
        "speedup": ratio,
        "speedup_range": None if span[0] is None else [float(span[0]), float(span[1])],
        "final_ratio": base_final / final if final else None,
        "below_from": stays_below_from(iterations, other["median_curve"], base_median),
    }


def sensitivity_table(baseline, others, excluded=None):
    """The speedup, final ratio and below-from of each deep configuration against depth-1 GD at
    each of depth 1's rates (definitions: the module docstring).

    Args:
        baseline: `GridResult` of depth-1 GD at several rates x seeds.
        others: {name: (GridResult, summary)}; `summary["best_learning_rate"]` the rate the
            configuration is compared at (None: not compared), `summary["label"]` its label.
        excluded: {rate: [seeds]} of depth-1 seeds left out at that rate, or None.

    Returns:
        A JSON-ready dict: "horizon" (the last logged iteration), "configurations" ({name:
        {"label", "learning_rate", "final_loss"}}) and "rows", one per depth-1 rate, ascending:
        {"learning_rate", "final_loss", "final_loss_range", "seeds_used", "seeds_excluded",
        "seeds_diverged" (lists of seeds), "against": {name: {"speedup", "speedup_range",
        "final_ratio", "below_from"}}}.
    """
    iterations = np.asarray(baseline.iterations)
    if baseline.losses.ndim != 2 or baseline.losses.shape != (len(iterations), len(baseline.learning_rates)):
        raise ValueError(
            f"`baseline` must hold losses of shape (logged iterations, grid points), got {baseline.losses.shape}."
        )
    for name, (result, _) in others.items():
        if not np.array_equal(np.asarray(result.iterations), iterations):
            raise ValueError(f"`others[{name!r}]` is logged at other iterations than `baseline`; they must match.")
    rates = [float(r) for r in np.unique(baseline.learning_rates)]
    excluded = _excluded_by_rate(baseline, rates, excluded)
    prepared = {name: _other_at_best(name, result, summary) for name, (result, summary) in others.items()}
    rows = []
    for rate in rates:
        points = _points(baseline, rate)
        used = [g for g in points if int(baseline.seeds[g]) not in excluded[rate]]
        diverged = [g for g in used if curves.diverged_at(iterations, baseline.losses[:, g]) is not None]
        row = {
            "learning_rate": rate,
            "final_loss": None,
            "final_loss_range": None,
            "seeds_used": [int(baseline.seeds[g]) for g in used],
            "seeds_excluded": sorted(excluded[rate]),
            "seeds_diverged": [int(baseline.seeds[g]) for g in diverged],
        }
        base_curves = _seed_curves(baseline, used)
        base_median = base_final = None
        if used and len(diverged) < len(used):
            base_median = np.median(np.stack(list(base_curves.values()), axis=1), axis=1)
            base_final, row["final_loss_range"] = _median_and_range(np.array([c[-1] for c in base_curves.values()]))
            row["final_loss"] = base_final
        row["against"] = {
            name: _against(other, iterations, base_curves, base_median, base_final) for name, other in prepared.items()
        }
        rows.append(row)
    return {
        "horizon": int(iterations[-1]),
        "configurations": {
            name: {"label": o["label"], "learning_rate": o["learning_rate"], "final_loss": o.get("final_loss")}
            for name, o in prepared.items()
        },
        "rows": rows,
    }


def _series(table, name, key):
    """One entry of every row against `name`, None as NaN (a gap in the line)."""
    values = [row["against"][name][key] for row in table["rows"]]
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def sensitivity_figure(table, quick=False):
    """The figure of `sensitivity_table`'s result: the speedup and the final ratio of every
    other configuration against depth 1's rate, one line per configuration."""
    rates = [row["learning_rate"] for row in table["rows"]]
    width, height = PANEL_INCHES
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height + 0.8))
    panels = (
        (axes[0], "speedup", "speedup to depth 1's final loss", "iterations to the target: depth 1 / deeper"),
        (axes[1], "final_ratio", "final loss ratio", "final loss: depth 1 / deeper"),
    )
    for ax, key, title, ylabel in panels:
        for i, (name, other) in enumerate(table["configurations"].items()):
            rate = other["learning_rate"]
            label = other["label"] + ("" if rate is None else f" (lr {rate:.3g})")
            ax.plot(rates, _series(table, name, key), "o-", color=f"C{i % 10}", label=label, markersize=4)
        ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--", label="1: no better than depth 1")
        ax.set_xscale("log")
        ax.set_xlabel("depth 1's learning rate")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, against depth 1's rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    title = "Sensitivity of the headline to depth 1's learning rate (deeper at its own best rate)"
    fig.suptitle(f"{title}\n{horizon_note(table['horizon'], quick)}")
    fig.tight_layout()
    return fig


def horizon_note(horizon, quick):
    """A figure's second title line: the horizon, and whether it is a quick run's."""
    horizon = f"{horizon:,} iterations"
    return f"quick run (short horizon): {horizon}, not the paper's" if quick else horizon


def write_png(fig, path):
    """Writes `fig` to the PNG file `path` atomically and closes it; returns `path`."""
    try:
        replace_atomic(path, lambda file: fig.savefig(file, format="png", dpi=DPI), binary=True)
    finally:
        plt.close(fig)
    return path


def plot_sensitivity(path, table, quick=False):
    """Writes `sensitivity_figure(table, quick)` to the PNG file `path` atomically; returns `path`."""
    return write_png(sensitivity_figure(table, quick), path)


def _number(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(table):
    """`sensitivity_table`'s result as a Markdown table: one row per depth-1 rate; per other
    configuration its speedup (with the per-seed range), final ratio and below-from."""
    names = list(table["configurations"])
    head = ["depth-1 rate", "depth-1 final loss (median [range])", "seeds used"]
    for name in names:
        other = table["configurations"][name]
        rate = "" if other["learning_rate"] is None else f", lr {other['learning_rate']:.3g}"
        head += [f"{other['label']}{rate}: speedup", "final ratio", "below from"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        low, high = row["final_loss_range"] or (None, None)
        final = _number(row["final_loss"], ".4g")
        if row["final_loss"] is not None:
            final += f" [{_number(low, '.4g')}, {_number(high, '.4g')}]"
        seeds = str(len(row["seeds_used"]))
        notes = [
            f"{len(row[k])} {what}" for k, what in (("seeds_excluded", "excluded"), ("seeds_diverged", "diverged"))
        ]
        notes = [n for n in notes if not n.startswith("0 ")]
        seeds += f" ({', '.join(notes)})" if notes else ""
        cells = [f"{row['learning_rate']:.3g}", final, seeds]
        for name in names:
            entry = row["against"][name]
            speedup = _number(entry["speedup"], ".2f")
            if entry["speedup"] is not None and entry["speedup_range"] is not None:
                speedup += f"x [{entry['speedup_range'][0]:.2f}-{entry['speedup_range'][1]:.2f}]"
            elif entry["speedup"] is not None:
                speedup += "x"
            ratio = "-" if entry["final_ratio"] is None else f"{entry['final_ratio']:.2f}x"
            below = "-" if entry["below_from"] is None else f"{entry['below_from']:,}"
            cells += [speedup, ratio, below]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
