"""The l_p toy's figure: the error per coordinate at each method's largest stable rate, and the
iterations to the target against the rate (diverged rates drawn in a band of their own)."""

import numpy as np
from matplotlib.figure import Figure

from experiments.common.run_folder import replace_atomic
from experiments.lp_toy.protocol import LABELS, METHODS

COLORS = {"gd": "C0", "depth2": "C1", "end_to_end": "C2"}
DIVERGED_HEIGHT = 3.0  # the diverged band sits this factor above the longest run


def figure_of(results, config, quick=False):
    """The figure of one run's `results` (the dict `experiment.run` returns)."""
    figure = Figure(figsize=(13, 5), dpi=120)
    left, right = figure.subplots(1, 2)
    _errors_panel(left, results, config)
    _rates_panel(right, results, config)
    title = rf"$\ell_{{{config.p}}}$ toy, labels y = ({config.y1:g}, {config.y2:g}), target relative error {config.target:g}"
    if quick:
        title += f"\nquick run: {config.iterations} iterations, a coarse grid of rates"
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _errors_panel(ax, results, config):
    iterations = np.maximum(np.array(results["curves"]["iterations"]), 0.7)  # iteration 0 shown at the left edge
    below = results["stability"]["below"]
    for k, style in ((0, "-"), (1, "--")):
        ax.loglog(
            iterations,
            results["curves"]["gd_below_bound"][k],
            style,
            color="gray",
            lw=3,
            alpha=0.4,
            label=f"GD at (1 - margin) x bound, w{k + 1} (eta = {below['eta']:.3g})",
        )
    for method in METHODS:
        curve, edge = results["curves"].get(f"{method}_largest_stable"), results["headline"][method]
        if curve is None:
            continue
        for k, style in ((0, "-"), (1, "--")):
            ax.loglog(
                iterations,
                curve[k],
                style,
                color=COLORS[method],
                label=f"{LABELS[method]}, w{k + 1} (eta = {edge['eta']:.4g})",
            )
    ax.axhline(config.target, color="gray", lw=0.8, ls=":", label=f"target {config.target:g}")
    ax.set(
        xlabel="iteration",
        ylabel="relative error |w_k - y_k| / y_k",
        title="error per coordinate at each method's largest stable rate",
    )
    ax.legend(fontsize=7)


def _rates_panel(ax, results, config):
    top = DIVERGED_HEIGHT * config.iterations
    for method in METHODS:
        summary = results["methods"][method]
        rates = np.array(summary["rates"])
        reached = np.array([np.nan if n is None else n for n in summary["iterations_to_target"]], float)
        diverged = np.array([n is not None for n in summary["diverged_at"]])
        ax.loglog(rates, reached, "o-", ms=3, color=COLORS[method], label=f"{LABELS[method]}: reached the target")
        ax.plot(rates[diverged], np.full(diverged.sum(), top), "x", ms=7, color=COLORS[method])
        edge = results["headline"][method]
        if edge is not None and edge["iterations"] is not None:
            ax.plot([edge["eta"]], [edge["iterations"]], "*", ms=12, color=COLORS[method])
    ax.plot([], [], "kx", label="diverged (drawn in the band above)")
    ax.plot([], [], "k*", ms=10, label="largest stable rate")
    ax.axhspan(top / 1.6, top * 1.6, color="0.9", zorder=0)
    ax.text(0.02, top, "diverged", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.axvline(results["bound"], color="gray", lw=0.8, ls=":", label="GD bound 4 / y1^(p-2)")
    ax.set(
        xlabel="learning rate eta",
        ylabel=f"iterations to relative error <= {config.target:g}",
        title="iterations to the target against the learning rate",
    )
    ax.legend(fontsize=7, loc="lower left")


def save_figure(results, config, path, quick=False):
    """Writes `figure_of(results, config, quick)` to the PNG file `path` atomically."""
    figure = figure_of(results, config, quick)
    replace_atomic(path, lambda file: figure.savefig(file, format="png"), binary=True)
