"""Counting rules for logged loss curves: when a target counts as reached, what is diverged,
what is flagged, and how seeds are summarised.

Every rule reads one curve, `losses[t]` logged at `iterations[t]` (NaN where the engine
stopped a diverged run), and is a small pure NumPy function. The thresholds are module
constants, stated here and in the README:

- Sustained crossing: a target counts as reached at the first logged iteration from which the
  loss stays <= the target at EVERY later logged iteration (NaN counts as above). A spike above
  the target after a first crossing moves the crossing past the spike.
- Divergence (`diverged_at`): the engine's verdict (NaN: non-finite, or 10^6 x the initial
  loss), or a bounded blow-up: after the loss has fallen to FELL_FRACTION (1/10) of its initial
  value or below, it rises above the initial value and stays above it at every later logged
  iteration (it never comes back down).
- Spikes (`spikes`): an excursion above SPIKE_FACTOR (2) x the best loss so far that comes back
  below SPIKE_FACTOR x that best before the end. Spikes are counted and their largest height
  (peak / best before it) reported; they are not divergence. An excursion still up at the end
  is not a spike (it is a blow-up or a stall).
- Stall (`stalled`): the final loss is above STALL_FACTOR (1.5) x the best logged loss: the run
  ended well above what it once reached.
- Oscillation (`oscillating`): in the last TAIL_FRACTION (10%) of the horizon the loss rises
  (by more than RISE_TOLERANCE, 1%, relative, from one logged value to the next) at least
  OSCILLATION_MIN_RISES (3) times. A converging or flat tail never rises by 1%.
- A run that is diverged, stalled or oscillating is `flagged`; selection never picks a flagged
  run silently (`experiments.common.rates.choose_rates` excludes them).

Seeds: a configuration's iterations-to-target is the median over seeds (a seed that never
reaches counts as infinite), with the min-max range; a speedup is the ratio of the medians,
with the range of the per-seed ratios (seed s against seed s).
"""

import math

import numpy as np

FELL_FRACTION = 0.1
SPIKE_FACTOR = 2.0
STALL_FACTOR = 1.5
TAIL_FRACTION = 0.1
RISE_TOLERANCE = 0.01
OSCILLATION_MIN_RISES = 3
LOG_SPACING = 0.005  # the log schedule's largest gap, as a fraction of the horizon


def _finite_or_inf(losses):
    return np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=np.inf, posinf=np.inf)


def sustained_crossing(iterations, losses, target):
    """The first logged iteration from which `losses` <= `target` at every later log, or None."""
    above = np.flatnonzero(~(_finite_or_inf(losses) <= target))
    start = 0 if above.size == 0 else above[-1] + 1
    return int(iterations[start]) if start < len(iterations) else None


def first_crossing(iterations, losses, target):
    """The first logged iteration at which `losses` <= `target` (spikes after it ignored), or None."""
    reached = np.flatnonzero(_finite_or_inf(losses) <= target)
    return int(iterations[reached[0]]) if reached.size else None


def diverged_at(iterations, losses):
    """The logged iteration at which the run diverged, or None (see the module docstring):
    the first NaN/inf, or the start of a bounded blow-up that never comes back down."""
    losses = _finite_or_inf(losses)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        return int(iterations[bad[0]])
    initial = losses[0]
    fell = np.flatnonzero(losses <= FELL_FRACTION * initial)
    if not fell.size:
        return None
    below = np.flatnonzero(losses <= initial)
    start = below[-1] + 1  # from here on the loss stays above its initial value
    if start < len(losses) and start > fell[0]:
        return int(iterations[start])
    return None


def spikes(losses):
    """Recovered spikes: (count, largest peak / best-before-it ratio, 1.0 if none)."""
    losses = _finite_or_inf(losses)
    best = np.minimum.accumulate(losses)
    count, largest, peak, inside = 0, 1.0, 0.0, False
    for value, low in zip(losses, best):
        if value > SPIKE_FACTOR * low:
            if not inside:
                inside, peak, base = True, value, low
            peak = max(peak, value)
        elif inside:  # back below SPIKE_FACTOR x the best before the spike
            inside, count = False, count + 1
            largest = max(largest, peak / base)
    return count, largest


def stalled(losses):
    """True if the final loss is above STALL_FACTOR x the best logged loss."""
    losses = _finite_or_inf(losses)
    return bool(losses[-1] > STALL_FACTOR * np.min(losses))


def oscillating(iterations, losses):
    """True if the loss rises by > RISE_TOLERANCE at least OSCILLATION_MIN_RISES times in the
    last TAIL_FRACTION of the horizon."""
    iterations, losses = np.asarray(iterations), _finite_or_inf(losses)
    tail = losses[iterations >= iterations[-1] * (1 - TAIL_FRACTION)]
    with np.errstate(invalid="ignore"):
        rises = tail[1:] > tail[:-1] * (1 + RISE_TOLERANCE)
    return int(np.sum(rises)) >= OSCILLATION_MIN_RISES


def curve_report(iterations, losses, targets):
    """Every rule on one curve: a JSON-ready dict (iterations to each target, sustained and
    first crossing, divergence, spikes, the flags)."""
    diverged = diverged_at(iterations, losses)
    count, height = spikes(losses)
    report = {
        "iterations_to_target": [sustained_crossing(iterations, losses, t) for t in targets],
        "first_crossing": [first_crossing(iterations, losses, t) for t in targets],
        "diverged_at": diverged,
        "spikes": count,
        "largest_spike": height,
        "stalled": diverged is None and stalled(losses),
        "oscillating": diverged is None and oscillating(iterations, losses),
    }
    report["flagged"] = diverged is not None or report["stalled"] or report["oscillating"]
    return report


def check_log_schedule(schedule, horizon):
    """Raises ValueError unless `schedule` starts at 0, ends at `horizon` and never leaves a
    gap above LOG_SPACING x horizon (sustained crossings need dense logs)."""
    schedule = np.asarray(schedule)
    gaps = np.diff(schedule)
    if schedule[0] != 0 or schedule[-1] != horizon or gaps.max() > LOG_SPACING * horizon:
        raise ValueError(
            f"`schedule` must run from 0 to {horizon} with gaps <= {LOG_SPACING:g} x the horizon, "
            f"got a largest gap of {int(gaps.max())}; use more log points."
        )


def median_and_range(values):
    """Median and (min, max) of per-seed values, None (never reached) counting as infinite;
    a median that is infinite is returned as None."""
    array = np.array([math.inf if v is None else v for v in values], dtype=np.float64)
    if array.size == 0:
        return None, (None, None)

    def clean(x):
        return None if not math.isfinite(x) else float(x)

    return clean(float(np.median(array))), (clean(array.min()), clean(array.max()))


def speedup(baseline, other):
    """Speedup of `other` over `baseline` from per-seed iterations-to-target (dicts seed ->
    iterations, None = not reached): the ratio of the medians (each over its own seeds) and
    the (min, max) of the per-seed ratios over the seeds both have. None where undefined."""
    base_median, _ = median_and_range(list(baseline.values()))
    own_median, _ = median_and_range(list(other.values()))
    ratio = base_median / own_median if base_median and own_median else None
    per_seed = [baseline[s] / other[s] for s in other if s in baseline and baseline[s] and other[s]]
    return ratio, ((min(per_seed), max(per_seed)) if per_seed else (None, None))
