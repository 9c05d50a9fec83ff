"""The figures of a gas sensor run, drawn from the configurations finished so far.

Every figure is built by a function that returns it (the tests read its titles, labels and
size) and saved by `save_figure`. Panels sit in a grid at most `MAX_COLUMNS` wide, so that no
figure is wider than about 2,000 pixels; a panel with nothing to draw is left out.
"""

import math

import numpy as np

from experiments.common.cli import lazy_pyplot
from experiments.gas_sensor.plan import variant_keys
from experiments.gas_sensor.report import best_band, points_at

plt = lazy_pyplot()

MAX_COLUMNS = 4
PANEL_INCHES = (6.0, 4.5)
DPI = 80  # 4 panels of 6 inches: 1,920 pixels
SPARSE_POINTS = 100  # curves logged at fewer points get a marker at each one


def loss_name(p):
    """'ℓ4 loss' in mathtext: the script l cannot be read as a 1."""
    return rf"$\ell_{{{p:g}}}$ loss"


def plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def figure_title(title, config):
    """The figure's title; a run shorter than the paper's horizon says it is a quick run."""
    if config.is_quick:
        return f"{title}\nquick run: {config.iterations:,} iterations, not the paper's horizon"
    return f"{title}\n{config.iterations:,} iterations"


def panel_grid(count):
    """(rows, columns) of a grid of `count` panels."""
    columns = min(count, MAX_COLUMNS)
    return math.ceil(count / columns), columns


def build_panels(title, config, title_runs, draw_run, xlabel, ylabel, log_x=False):
    """One panel per (panel title, runs), in a grid; `draw_run(ax, color, run)` draws one
    configuration and returns whether it drew anything. Returns the figure, or None when no
    panel has anything to draw."""
    rows, columns = panel_grid(len(title_runs))
    width, height = PANEL_INCHES
    width = max(width, 8.0 / columns)  # a lone panel wide enough for the figure's title and legend
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.8), squeeze=False)
    axes = list(axes.flat)
    drawn = 0
    for ax, (panel_title, runs) in zip(axes, title_runs):
        if not any([draw_run(ax, f"C{i % 10}", run) for i, run in enumerate(runs)]):
            ax.remove()
            continue
        drawn += 1
        if log_x:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(title_runs) :]:
        ax.remove()
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(figure_title(title, config))
    fig.tight_layout()
    return fig


def save_figure(fig, path):
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def curves_figure(title, config, title_runs, results, summaries):
    """Each configuration's median loss curve over seeds at its best learning rate, with the
    band from the lowest to the highest seed; markers at the logged points when they are
    sparse (so that a fall between two logs is not read as a straight line)."""

    def draw(ax, color, run):
        summary = summaries.get(run.name, {})
        if summary.get("best_learning_rate") is None:
            return False
        result = results[run.name]
        median, low, high = best_band(result, summary)
        seeds = len(points_at(result, summary["best_learning_rate"]))
        edge = ", on edge" if summary.get("best_on_edge") else ""
        label = f"{run.label} (lr {summary['best_learning_rate']:.3g}{edge}, {plural(seeds, 'seed')})"
        marker = "o" if len(result.iterations) <= SPARSE_POINTS else None
        ax.plot(result.iterations, median, run.style, color=color, label=label, marker=marker, markersize=2.5)
        ax.fill_between(result.iterations, low, high, color=color, alpha=0.2, linewidth=0)
        return True

    return build_panels(title, config, title_runs, draw, "iteration", "training loss (median over seeds)")


def lr_grid_figure(title, config, title_runs, results):
    """Final loss against learning rate for every configuration (median over seeds, bars from
    the lowest to the highest seed); a rate at which a seed diverged is drawn as an x at the
    top of the panel, with a legend entry that says so."""

    def draw(ax, color, run):
        if run.name not in results:
            return False
        result = results[run.name]
        rates = np.unique(result.learning_rates)
        finals = [result.losses[-1, points_at(result, r)] for r in rates]
        diverged = np.array([not np.isfinite(f).all() for f in finals])
        median = np.array([np.median(f) if np.isfinite(f).all() else np.nan for f in finals])
        low = np.array([np.min(f) if np.isfinite(f).all() else np.nan for f in finals])
        high = np.array([np.max(f) if np.isfinite(f).all() else np.nan for f in finals])
        ax.errorbar(
            rates,
            median,
            yerr=[median - low, high - median],
            fmt="o" + run.style,
            color=color,
            label=run.label,
            markersize=4,
            capsize=2,
        )
        if diverged.any():
            top = ax.get_xaxis_transform()  # x in data, y in axes coordinates
            ax.plot(rates[diverged], np.full(diverged.sum(), 0.96), "x", color=color, transform=top, markersize=7)
            if not any(line.get_label() == DIVERGED_LABEL for line in ax.get_lines()):
                ax.plot([], [], "x", color="0.3", label=DIVERGED_LABEL)
        return True

    return build_panels(title, config, title_runs, draw, "learning rate", "final training loss", log_x=True)


DIVERGED_LABEL = "x: a seed diverged at this rate"


def figure_plan(config, figures, results):
    """Every figure of the run as (file name, builder, title, panels), the panels holding the
    configurations finished so far; `figures` maps a figure to its configurations."""

    def panels(title_runs):
        done = [(title, [r for r in runs if r.name in results]) for title, runs in title_runs]
        return [(title, runs) for title, runs in done if runs]

    def by_loss(runs, what):
        return panels([(f"{loss_name(p)}: {what}", [r for r in runs if r.spec.p == p]) for p in (4, 2)])

    plan = []
    if "depth" in figures:
        if "depth" in config.figures:
            panel_runs = by_loss(figures["depth"], "loss at each one's best rate")
            plan.append(("depth.png", "curves", "Depth and width of linear chains", panel_runs))
        if "lr-grid" in config.figures:
            panel_runs = by_loss(figures["depth"], "final loss per learning rate")
            plan.append(("lr_grid.png", "lr-grid", "Final loss over the learning-rate grid", panel_runs))
    if "optimizers" in figures:
        panel_runs = panels([(f"{loss_name(4)}: each optimizer at its best rate", figures["optimizers"])])
        plan.append(("optimizers.png", "curves", "Depth against adaptive optimizers", panel_runs))
    if "init" in figures:
        panel_runs = panels([(f"{loss_name(4)}: near-zero against identity init", figures["init"])])
        plan.append(("init.png", "curves", "Initialisation of deep chains", panel_runs))
    if "preprocessing" in figures:
        panel_runs = panels(
            [
                (f"{loss_name(4)}, {key}", [r for r in figures["preprocessing"] if r.data_key == key])
                for key in variant_keys()
            ]
        )
        plan.append(("preprocessing.png", "curves", "Depth 1 against depth 2 under each preprocessing", panel_runs))
    return plan


def plot_figures(run_dir, config, figures, results, summaries, only=None):
    """Draws the figures from the configurations finished so far; with `only` (a configuration
    name) just the figures that hold it. Returns the paths written."""
    written = []
    for name, kind, title, title_runs in figure_plan(config, figures, results):
        if not title_runs or (only is not None and not any(r.name == only for _, runs in title_runs for r in runs)):
            continue
        if kind == "curves":
            fig = curves_figure(title, config, title_runs, results, summaries)
        else:
            fig = lr_grid_figure(title, config, title_runs, results)
        if fig is not None:
            save_figure(fig, run_dir / name)
            written.append(run_dir / name)
    return written
