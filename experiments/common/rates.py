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
- `fastest_among_equals(...)` ranks rates whose median final losses lie within
  FINAL_LOSS_TOLERANCE (relative) of the lowest by how soon they reach each target, instead of
  by a final loss that does not tell them apart (an adaptive optimizer's final losses can lie
  within 1% over a decade of rates, and the lowest is then a tiny rate).
- `round_below(rates, flagged)`: when every rate of a refined set is flagged, the rates of a
  second round, one coarse grid step below the set.
"""

import math

import numpy as np

from experiments.common.curves import median_and_range

POINTS_PER_SIDE = 2
POINTS_PER_ROUND = 3
EDGE_ROUNDS = 6
FINAL_LOSS_TOLERANCE = 0.01  # median final losses within 1% of the lowest count as equal


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


def _unflagged(rates, reports):
    return [r for r in np.unique(rates) if not any(reports[g]["flagged"] for g in np.flatnonzero(rates == r))]


def fastest_among_equals(rates, seeds, reports, finals, tolerance=FINAL_LOSS_TOLERANCE):
    """The best rate when final losses do not separate the rates.

    The rates that count are the unflagged ones whose median final loss over seeds is at most
    (1 + `tolerance`) x the lowest. Among them, per target of the reports (the hardest first),
    the rate with the smallest median sustained iterations-to-target wins (`choose_rates` over
    those rates only); if none of them reaches any target, the lowest median final loss.

    Args:
        rates, seeds: per grid point (1-D, equal length).
        reports: per grid point, `experiments.common.curves.curve_report` dicts; their targets
            should come from the baseline (depth-1 GD), which therefore runs first.
        finals: per grid point, the final loss (NaN if diverged).
        tolerance: relative width of the band of equal final losses, >= 0.

    Returns:
        (rate, equals): the chosen rate (None if every rate is flagged) and the rates found
        equal in final loss.
    """
    if not tolerance >= 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance!r}.")
    rates = np.asarray(rates, dtype=np.float64)
    finals = np.nan_to_num(np.asarray(finals, dtype=np.float64), nan=math.inf)
    candidates = _unflagged(rates, reports)
    if not candidates:
        return None, []
    medians = {r: float(np.median(finals[rates == r])) for r in candidates}
    lowest = min(medians.values())
    equals = [r for r in candidates if medians[r] <= (1 + tolerance) * lowest]
    keep = np.isin(rates, equals)
    n_targets = len(reports[0]["iterations_to_target"]) if reports else 0
    choices = choose_rates(
        rates[keep], np.asarray(seeds)[keep], [r for r, k in zip(reports, keep) if k], n_targets, finals[keep]
    )
    for choice in reversed(choices):
        if choice["rate"] is not None:
            return choice["rate"], [float(r) for r in equals]
    return float(min(equals, key=lambda r: medians[r])), [float(r) for r in equals]


def round_below(rates, flagged, step, points_per_side=POINTS_PER_SIDE):
    """The rates of a second round when every rate of `rates` is flagged, else None.

    The round is centred one coarse grid `step` (a factor > 1) below the smallest rate of the
    set, with `points_per_side` log-even rates inside each interval to its neighbours one step
    further down and up (the smallest flagged rate); the flagged rates are not repeated.

    Args:
        rates: the refined rates tried (1-D).
        flagged: per rate, whether it is flagged (any seed diverged, stalled or oscillating).
        step: the coarse grid's step factor (`grid_step` of the coarse grid).
    """
    rates, flagged = np.asarray(rates, dtype=np.float64), np.asarray(flagged, dtype=bool)
    if rates.shape != flagged.shape or rates.size == 0:
        raise ValueError(f"`rates` and `flagged` must be 1-D of equal length, got {rates.shape} and {flagged.shape}.")
    if not step > 1:
        raise ValueError(f"`step` must be > 1, got {step!r}.")
    if not flagged.all():
        return None
    centre = rates.min() / step
    new = refine_around([centre / step, centre, rates.min()], centre, points_per_side)
    return np.sort(np.append(new[new < rates.min() * (1 - 1e-9)], centre))
