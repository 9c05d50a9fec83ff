"""Learning rates that find the edge: refinement around a coarse grid's best rate, a bisection
of the stability edge, and the per-target choice of the best rate by the median over seeds.

A coarse log grid steps by a factor (1.78x for 9 points over 2 decades), as large as some of
the effects measured. After it:

- `refine_around(rates, best)` proposes POINTS_PER_SIDE rates log-evenly spaced inside each
  interval next to the best rate (to its grid neighbours). A best rate on the grid's edge gets
  the missing neighbour one coarse step beyond the edge (the grid is extended), and
  `on_edge(rates, best)` tells the table to flag it if it is still on the edge afterwards.
- `stability_edge(is_stable, low, high)` narrows a bracket [largest stable, smallest unstable]
  by evaluating POINTS_PER_ROUND log-even rates inside it per round (a vectorised bisection:
  every round divides the bracket's log width by POINTS_PER_ROUND + 1).
- `choose_rates(...)` picks, per target, the rate whose median over seeds of the sustained
  iterations-to-target is smallest, among rates none of whose seeds is flagged (diverged,
  stalled or oscillating; `experiments.common.curves`); ties go to the lower median final loss.
"""

import math

import numpy as np

from experiments.common.curves import median_and_range

POINTS_PER_SIDE = 2
POINTS_PER_ROUND = 3
EDGE_ROUNDS = 6


def grid_step(rates):
    """The coarse grid's step factor (the median ratio of neighbouring sorted rates)."""
    rates = np.sort(np.asarray(rates, dtype=np.float64))
    return float(np.median(rates[1:] / rates[:-1])) if rates.size > 1 else 10.0


def _between(low, high, count):
    """`count` rates log-evenly spaced strictly between `low` and `high`."""
    return list(np.geomspace(low, high, count + 2)[1:-1])


def refine_around(rates, best, points_per_side=POINTS_PER_SIDE, step=None):
    """New rates around `best` (a rate in `rates`): `points_per_side` inside each interval to
    its neighbours, a missing neighbour (best on the grid's edge) taken one `step` (default:
    the grid's step) beyond it. Returns the sorted new rates, none of them already in `rates`."""
    rates = np.sort(np.asarray(rates, dtype=np.float64))
    if not np.any(np.isclose(rates, best, rtol=1e-12)):
        raise ValueError(f"`best` must be one of `rates`, got {best!r}.")
    step = grid_step(rates) if step is None else step
    i = int(np.argmin(np.abs(np.log(rates / best))))
    below = rates[i - 1] if i > 0 else best / step
    above = rates[i + 1] if i + 1 < rates.size else best * step
    new = _between(below, best, points_per_side) + _between(best, above, points_per_side)
    if i == 0:
        new.append(below)
    if i + 1 == rates.size:
        new.append(above)
    return np.array(sorted(r for r in new if not np.any(np.isclose(rates, r, rtol=1e-9))))


def on_edge(rates, best):
    """True if `best` is the smallest or largest of `rates` (flag it in the table)."""
    rates = np.asarray(rates, dtype=np.float64)
    return bool(np.isclose(best, rates.min(), rtol=1e-12) or np.isclose(best, rates.max(), rtol=1e-12))


def stability_edge(is_stable, low, high, rounds=EDGE_ROUNDS, points=POINTS_PER_ROUND):
    """Narrows the bracket (`low` stable, `high` unstable) around the stability edge.

    `is_stable(rates)` evaluates a 1-D array of rates at once and returns a boolean array.
    Each round evaluates `points` log-even rates inside the bracket and keeps the interval
    between the largest stable one and the smallest unstable one above it. Returns
    (low, high) after `rounds` rounds; log(high / low) shrinks by (points + 1)^rounds.
    """
    if not 0 < low < high:
        raise ValueError(f"`low` and `high` must satisfy 0 < low < high, got {low!r}, {high!r}.")
    for _ in range(rounds):
        candidates = np.array(_between(low, high, points))
        stable = np.asarray(is_stable(candidates), dtype=bool)
        unstable = np.flatnonzero(~stable)
        first_unstable = unstable[0] if unstable.size else candidates.size
        if first_unstable > 0:
            low = float(candidates[first_unstable - 1])
        if first_unstable < candidates.size:
            high = float(candidates[first_unstable])
    return low, high


def choose_rates(rates, seeds, reports, n_targets, finals):
    """The best rate per target, by the median over seeds.

    Args:
        rates, seeds: per grid point (1-D, equal length).
        reports: per grid point, `experiments.common.curves.curve_report` dicts.
        n_targets: number of targets in the reports.
        finals: per grid point, the final loss (NaN if diverged).

    Returns a list (one per target) of dicts: `rate` (None if no eligible rate reaches it),
    `median`, `range` (iterations, over seeds), `per_seed` (seed -> iterations) and
    `flagged_rates` (rates excluded because a seed is flagged).
    """
    rates, seeds = np.asarray(rates, dtype=np.float64), np.asarray(seeds)
    unique = np.unique(rates)
    flagged = [r for r in unique if any(reports[g]["flagged"] for g in np.flatnonzero(rates == r))]
    choices = []
    for k in range(n_targets):
        best = None
        for rate in unique:
            if rate in flagged:
                continue
            points = np.flatnonzero(rates == rate)
            median, span = median_and_range([reports[g]["iterations_to_target"][k] for g in points])
            if median is None:
                continue
            final = float(np.median(np.asarray(finals, dtype=np.float64)[points]))
            key = (median, final)
            if best is None or key < best[0]:
                per_seed = {int(seeds[g]): reports[g]["iterations_to_target"][k] for g in points}
                best = (key, {"rate": float(rate), "median": median, "range": span, "per_seed": per_seed})
        choice = best[1] if best else {"rate": None, "median": None, "range": (None, None), "per_seed": {}}
        choices.append({**choice, "flagged_rates": [float(r) for r in flagged]})
    return choices


def headline_rate(rates, seeds, reports, finals):
    """The rate to refine around: the one reaching the hardest target any rate reaches
    fastest (by `choose_rates` over that configuration's own reports), else the lowest
    median final loss among unflagged rates; None if every rate is flagged."""
    n_targets = len(reports[0]["iterations_to_target"]) if reports else 0
    for choice in reversed(choose_rates(rates, seeds, reports, n_targets, finals)):
        if choice["rate"] is not None:
            return choice["rate"]
    rates = np.asarray(rates, dtype=np.float64)
    finals = np.asarray(finals, dtype=np.float64)
    candidates = [r for r in np.unique(rates) if not any(reports[g]["flagged"] for g in np.flatnonzero(rates == r))]
    if not candidates:
        return None
    medians = [float(np.median(np.nan_to_num(finals[rates == r], nan=math.inf))) for r in candidates]
    return float(candidates[int(np.argmin(medians))])
