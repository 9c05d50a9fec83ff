"""The MNIST experiment's figure: per arm, the batch cross-entropy and the penalty over the
training steps (the median over seeds and the min-max band)."""

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from experiments.common.run_folder import replace_atomic
from experiments.mnist_cnn.curves import batch_penalty, running_mean
from experiments.mnist_cnn.protocol import ARMS

STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v")
MARKS_PER_CURVE = 10
ARMS_INDEX = {arm: index for index, arm in enumerate(ARMS)}  # an arm keeps its style in every run


def _plural(count, word, plural=None):
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _median_and_band(ax, curves, index, label):
    """One arm's curves (seeds x steps): the median as a styled line, the min-max as a band."""
    length = min(len(c) for c in curves)
    curves = np.array([c[:length] for c in curves])
    steps = np.arange(1, length + 1)
    color = f"C{index}"
    if len(curves) > 1:
        ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2, linewidth=0)
    ax.plot(
        steps,
        np.median(curves, 0),
        color=color,
        linestyle=STYLES[index % len(STYLES)],
        marker=MARKERS[index % len(MARKERS)],
        markevery=max(1, length // MARKS_PER_CURVE),
        markersize=4,
        label=label,
    )


def batch_loss_figure(records, config):
    """The figure of the finished `records` ({(arm, seed): record}): the running mean over
    `config.window` batches of the batch cross-entropy, of the penalty, and of the penalty
    relative to its first value (arms that start alike, such as plain and balanced, part there)."""
    figure = Figure(figsize=(15, 4.8), dpi=120)
    axes = figure.subplots(1, 3)
    panels = (
        ("batch cross-entropy", "cross-entropy", lambda r: r["batch_cross_entropy"], "log"),
        ("penalty (batch loss - cross-entropy)", "penalty", batch_penalty, "log"),
        (
            "penalty relative to step 1",
            "penalty / penalty at step 1",
            lambda r: batch_penalty(r) / batch_penalty(r)[0],
            "linear",
        ),
    )
    arms = [arm for arm in ARMS if any(a == arm for a, _ in records)]
    for ax, (title, label, values_of, scale) in zip(axes, panels):
        for arm in arms:
            curves = [running_mean(values_of(r), config.window) for (a, _), r in records.items() if a == arm]
            _median_and_band(ax, curves, ARMS_INDEX[arm], f"{arm} ({_plural(len(curves), 'seed')})")
        if ax is axes[0]:
            for threshold in config.thresholds:
                ax.axhline(threshold, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale(scale)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"step (batch of {config.batch_size})")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    title = (
        f"MNIST tutorial CNN, mean of the last {_plural(config.window, 'batch', 'batches')}: "
        "median over seeds (line) and min-max (band)"
    )
    if config.scale_note:
        title += f"\n{config.scale_note}"
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def save_batch_loss_figure(path, records, config):
    """Writes `batch_loss_figure` to the PNG file `path` atomically."""
    figure = batch_loss_figure(records, config)
    replace_atomic(path, lambda file: figure.savefig(file, format="png"), binary=True)
