"""The figure of rate x sharpness along the headline GD runs (sharpness.png): the largest
eigenvalue of the loss's Hessian with respect to the chain's factors, times the rate, median over
seeds, at the logged iterations (`lr_x_sharpness` in results.json), one line per rate, with the
iteration where a rate's first seed diverged marked. Gradient descent on a quadratic is stable
while this product is below 2 (the edge-of-stability reading of Cohen et al., ICLR 2021): depth 1
starts above 2 at its largest rates and falls, depth 2 climbs towards 2 along the whole run."""

import math

import numpy as np

from experiments.common.cli import lazy_pyplot
from experiments.gas_sensor.sensitivity import horizon_note, write_png

plt = lazy_pyplot()

PANEL_INCHES = (6.0, 4.5)
BOUND = 2.0  # GD's stability bound on rate x sharpness


def first_divergences(grid):
    """{rate: the first iteration at which one of its seeds diverged} of a results.json `grid`
    (rates where no seed diverged are left out)."""
    first = {}
    for rate, at in zip(grid["learning_rates"], grid["diverged_at"]):
        if at is not None:
            first[float(rate)] = min(first.get(float(rate), math.inf), int(at))
    return first


def _values(series):
    return np.array([math.nan if v is None else v for v in series], dtype=np.float64)


def sharpness_figure(summaries, quick=False):
    """One panel per configuration of `summaries` ({name: a results.json configuration with
    `label`, `spec`, `grid` and a non-empty `lr_x_sharpness`}): the median over seeds of rate x
    sharpness against the iteration, one line per rate (colour by rate), an x where the rate's
    first seed diverged, and the bound 2. A depth-1 panel has a log iteration axis, linear below 1 so
    that iteration 0 shows (its sharpness falls within the first thousand iterations), the others
    a linear one."""
    width, height = PANEL_INCHES
    fig, axes = plt.subplots(1, len(summaries), figsize=(len(summaries) * width, height + 0.8), squeeze=False)
    for ax, (name, summary) in zip(axes[0], summaries.items()):
        traces = sorted(summary["lr_x_sharpness"].items(), key=lambda item: float(item[0]))
        diverged = first_divergences(summary["grid"])
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(traces)))
        log_x = summary["spec"]["depth"] == 1
        for colour, (rate, trace) in zip(colours, traces):
            iterations, median = np.asarray(trace["iterations"], dtype=np.float64), _values(trace["median"])
            at = next((v for r, v in diverged.items() if math.isclose(r, float(rate), rel_tol=1e-9)), None)
            label = f"lr {float(rate):.4g}" + ("" if at is None else f", diverged at {at:,}")
            ax.plot(iterations, median, "-", color=colour, label=label, linewidth=1.2)
            finite = np.flatnonzero(np.isfinite(median))
            if at is not None and finite.size:
                ax.plot(at, median[finite[-1]], "x", color=colour, markersize=8, markeredgewidth=2)
        ax.axhline(BOUND, color="0.3", linestyle="--", linewidth=1.0, label="2: GD's stability bound")
        if log_x:  # iteration 0 stays on the axis: the early blow-ups are decided there
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("rate x sharpness (median over seeds)")
        ax.set_title(f"{name}: {summary['label']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    horizon = max(max(t["iterations"]) for s in summaries.values() for t in s["lr_x_sharpness"].values())
    fig.suptitle(
        f"Rate x sharpness along the run (x: where a rate's first seed diverged)\n{horizon_note(horizon, quick)}"
    )
    fig.tight_layout()
    return fig


def plot_sharpness(path, summaries, quick=False):
    """Writes `sharpness_figure(summaries, quick)` to the PNG file `path` atomically; returns `path`."""
    return write_png(sharpness_figure(summaries, quick), path)
