"""The circulation experiment's figure: the field and its curl, the convergence of the
trapezoid rule, and the circulations it converges to (zero for the gradient N = 1 only)."""

import numpy as np
from matplotlib.figure import Figure

from experiments.common.run_folder import replace_atomic
from experiments.not_a_regularizer.integrals import curl, field

ROUND_OFF_FLOOR = 1e-18  # exact zeros are drawn here, below round-off


def figure_of(results, config, quick=False):
    """The figure of one run's `results` (the dict `integrals.run` returns)."""
    figure = Figure(figsize=(16, 5), dpi=120)
    left, middle, right = figure.subplots(1, 3)
    _field_panel(figure, left, config)
    _convergence_panel(middle, results, config)
    _limits_panel(right, results)
    title = "The single-output end-to-end field is not a gradient: its circulation around a circle is not zero"
    if quick:
        title += f"\nquick run: K up to {max(config.ks)}"
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _field_panel(figure, ax, config):
    depth = config.depths[0]
    grid = np.linspace(-1.0, 3.0, 121)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    values = field(points, depth, config.hessian, config.minimizer).numpy()
    curls = curl(points, depth, config.hessian, config.minimizer).reshape(xx.shape)
    limit = np.nanmax(np.abs(curls))
    image = ax.pcolormesh(xx, yy, curls, cmap="RdBu_r", vmin=-limit, vmax=limit, shading="auto")
    figure.colorbar(image, ax=ax, label="curl F")
    ax.streamplot(
        xx, yy, values[:, 0].reshape(xx.shape), values[:, 1].reshape(xx.shape), color="k", linewidth=0.5, density=1.2
    )
    t = np.linspace(0, 2 * np.pi, 200)
    for circle in config.circles:
        ax.plot(
            circle.center[0] + circle.radius * np.cos(t),
            circle.center[1] + circle.radius * np.sin(t),
            lw=2,
            label=circle.name,
        )
    ax.plot(*config.minimizer, "k*", ms=10, label="w*")
    ax.set(
        xlabel="w1", ylabel="w2", aspect="equal", title=f"F (N = {depth}) and curl F, A = diag{tuple(config.hessian)}"
    )
    ax.legend(fontsize=7, loc="lower right")


def _convergence_panel(ax, results, config):
    ks = np.array(config.ks)
    for depth, per_circle in results["depths"].items():
        for name, entry in per_circle.items():
            ax.semilogy(ks[1:], np.maximum(entry["differences"], ROUND_OFF_FLOOR), "o-", label=f"N = {depth}, {name}")
    for name, values in results["depth_1"].items():
        ax.semilogy(ks, np.maximum(np.abs(values), ROUND_OFF_FLOOR), "x--", label=f"N = 1, {name}: |I_K| itself")
    ax.set_xscale("log", base=2)
    ax.set_ylim(ROUND_OFF_FLOOR / 10, 1.0)
    ax.set(
        xlabel="quadrature points K",
        ylabel=r"$|I_K - I_{K/2}|$",
        title="convergence of the trapezoid rule I_K",
    )
    ax.legend(fontsize=7)


def _limits_panel(ax, results):
    """Per circle, a bar per depth at the circulation of the largest K, its value written on it,
    and Green's theorem's disk integral as a marker."""
    circles = list(results["depth_1"])
    depths = ["1", *results["depths"]]
    width = 0.8 / len(depths)
    for j, depth in enumerate(depths):
        limits, stokes = [], []
        for name in circles:
            if depth == "1":
                limits.append(results["depth_1"][name][-1])
                stokes.append(np.nan)
            else:
                limits.append(results["depths"][depth][name]["limit"])
                stokes.append(results["depths"][depth][name]["stokes"])
        x = np.arange(len(circles)) + (j - (len(depths) - 1) / 2) * width
        label = "N = 1 (a gradient)" if depth == "1" else f"N = {depth}"
        bars = ax.bar(x, limits, width, color=f"C{j}", label=label)
        ax.bar_label(bars, labels=[f"{value:.4g}" for value in limits], fontsize=7, padding=2)
        ax.plot(x, stokes, "k_", ms=12, mew=2)
    ax.plot([], [], "k_", ms=12, mew=2, label="curl F over the disk (Green)")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(circles)), circles)
    ax.set(
        xlabel="circle",
        ylabel=f"circulation I_K, K = {results['ks'][-1]}",
        title="the circulations at the largest K (their limits)",
    )
    ax.margins(y=0.15)
    ax.legend(fontsize=7)


def save_figure(results, config, path, quick=False):
    """Writes `figure_of(results, config, quick)` to the PNG file `path` atomically."""
    figure = figure_of(results, config, quick)
    replace_atomic(path, lambda file: figure.savefig(file, format="png"), binary=True)
