"""The MNIST experiment's tables: per arm the median and [min, max] over seeds of its results,
the steps to each cross-entropy threshold and the speedups over plain; and their printout."""

from experiments.common import curves
from experiments.mnist_cnn.curves import steps_to_threshold
from experiments.mnist_cnn.protocol import ARMS, BASELINE


def over_seeds(per_seed):
    """{seed: value} -> median, [min, max] (None = never reached, counted as infinite) and the values."""
    median, (low, high) = curves.median_and_range(list(per_seed.values()))
    return {"median": median, "range": [low, high], "per_seed": {str(seed): v for seed, v in per_seed.items()}}


def summarize(records, config):
    """The tables over seeds of finished `records` ({(arm, seed): record}): per arm the test
    accuracy, final cross-entropy, initial and final penalty and time per step; per threshold
    each arm's steps (sustained crossing, and first crossing) and its speedup over plain."""
    arms = [arm for arm in ARMS if any(a == arm for a, _ in records)]
    by_arm = {arm: {seed: r for (a, seed), r in sorted(records.items()) if a == arm} for arm in arms}
    table = {}
    for arm, runs in by_arm.items():
        row = {"seeds": list(runs), "parameters": next(iter(runs.values()))["parameters"]}
        for key in (
            "test_accuracy",
            "final_running_mean_cross_entropy",
            "initial_penalty",
            "final_running_mean_penalty",
            "median_batch_seconds",
        ):
            row[key] = over_seeds({seed: r[key] for seed, r in runs.items()})
        collapses = [r["collapse"]["passed"] for r in runs.values() if "collapse" in r]
        row["collapse_passed"] = all(collapses) if collapses else None
        table[arm] = row
    steps = {}
    for threshold in config.thresholds:
        row = {}
        for arm, runs in by_arm.items():
            sustained = {
                seed: steps_to_threshold(r["batch_cross_entropy"], threshold, config.window) for seed, r in runs.items()
            }
            first = {
                seed: steps_to_threshold(r["batch_cross_entropy"], threshold, config.window, sustained=False)
                for seed, r in runs.items()
            }
            row[arm] = {**over_seeds(sustained), "first_crossing": over_seeds(first)}
            if BASELINE in by_arm:
                ratio, (low, high) = curves.speedup(
                    {s: row[BASELINE]["per_seed"][str(s)] for s in by_arm[BASELINE]}, sustained
                )
                row[arm].update(speedup=ratio, speedup_range=[low, high])
        steps[f"{threshold:g}"] = row
    return {
        "window": config.window,
        "thresholds": list(config.thresholds),
        "arms": table,
        "steps_to_cross_entropy": steps,
    }


def _cell(statistic, digits=None, percent=False):
    """'median [min, max]' of `over_seeds`; '-' for never reached."""

    def text(value):
        if value is None:
            return "-"
        if percent:
            return f"{100 * value:.2f}"
        return f"{value:.{digits}f}" if digits is not None else f"{value:g}"

    low, high = statistic["range"]
    if low == high:  # one seed, or all alike (all never reached included)
        return text(statistic["median"])
    return f"{text(statistic['median'])} [{text(low)}, {text(high)}]"


def print_summary(results):
    arms, window = results["arms"], results["window"]
    print(f"\nmedian [min, max] over seeds; final: mean of the last {window} batches")
    header = (
        f"{'arm':11s} {'seeds':>5s} {'parameters':>10s} {'test acc %':>22s} {'final CE':>26s} {'penalty at step 1':>26s} "
        f"{'final penalty':>26s} {'ms/batch':>8s}"
    )
    print(header)
    for arm, row in arms.items():
        print(
            f"{arm:11s} {len(row['seeds']):5d} {row['parameters']:10,d} {_cell(row['test_accuracy'], percent=True):>22s} "
            f"{_cell(row['final_running_mean_cross_entropy'], 4):>26s} {_cell(row['initial_penalty'], 4):>26s} "
            f"{_cell(row['final_running_mean_penalty'], 4):>26s} "
            f"{1000 * row['median_batch_seconds']['median']:8.0f}"
        )
    print(
        f"steps until the mean batch cross-entropy of the last {window} batches stays <= the threshold "
        f"(speedup: plain's median / the arm's [per-seed ratios]):"
    )
    for threshold, row in results["steps_to_cross_entropy"].items():
        cells = []
        for arm, cell in row.items():
            speed = ""
            if arm != BASELINE and cell.get("speedup") is not None:
                low, high = cell["speedup_range"]
                speed = f" {cell['speedup']:.2f}x" + (
                    f" [{low:.2f}, {high:.2f}]" if low is not None and len(cell["per_seed"]) > 1 else ""
                )
            cells.append(f"{arm} {_cell(cell)}{speed}")
        print(f"  {threshold:>5s}: " + "; ".join(cells))
    passed = {arm: row["collapse_passed"] for arm, row in arms.items() if row["collapse_passed"] is not None}
    print(
        "collapsed twins predict as the twins: "
        + ", ".join(f"{a} {'ok' if p else 'FAILED'}" for a, p in passed.items())
    )
    print(f"total time: {results['seconds']:.0f} s")
