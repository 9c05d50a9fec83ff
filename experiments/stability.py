"""Whether a learning rate is stable, measured over many seeds, and the edge where it stops being.

Two ways a run blows up, and a test for each:

- **Early blow-up**, in the first iterations, decided by the initial draw: depth-1 gradient descent
  on the l4 loss diverges at once where the draw's curvature times the rate exceeds 2, and not
  otherwise. Whether a rate shows it is then a matter of chance, so it is measured as a
  probability: `blowup_probability` runs one rate over many seeds (SCREEN_SEEDS, a few hundred
  iterations each) and reports the fraction that diverged with a Wilson interval.
- **Late divergence**, over the whole horizon, decided by the trajectory: a deep chain's
  sharpness grows with the end-to-end norm until rate x sharpness crosses 2. It hardly depends
  on the draw, so a few full runs (LATE_SEEDS) tell.

A rate is **stable** (`StabilityCriterion`) when its early blow-up probability is below
BLOWUP_THRESHOLD and none of LATE_SEEDS full runs, from draws that did not blow up early,
diverges. A kept rate's early blow-ups are failures of those seeds, reported by seed
(`Verdict.early.blown_up`), not of the rate. `stability_edge` then finds the largest stable rate
by bisection on a log scale.

Every rate is screened on the same seeds, so that for a blow-up that grows with the rate seed by
seed (as at depth 1, where a draw diverges exactly above its own critical rate) the estimated
probability is monotone in the rate and the bisection's answer well defined.

Pure Python and NumPy: the runs themselves are the caller's functions.
"""

import collections
import dataclasses
import math
import numbers
import statistics

import numpy as np

from experiments.common import rates as rate_rules

# A rate is kept if fewer than one initial draw in twenty blows it up early. At that level a
# user who redraws a blown-up initialisation pays at most 1 / (1 - 0.05) - 1 = 5.3% more runs, so
# the rate is usable as the method's rate; well above it, whether the rate "works" is a property
# of the seeds drawn (where a quarter of the draws blow up, all of five seeds survive only 24% of
# the time). And SCREEN_SEEDS resolve it: with 200 seeds the 95% Wilson interval around 10
# blow-ups is [0.027, 0.090], within a factor of two on either side, where a level of 0.01 (two
# blow-ups: [0.003, 0.036]) could not be told from zero or from three times itself.
BLOWUP_THRESHOLD = 0.05
SCREEN_SEEDS = 200
# Late divergences follow the sharpness along the trajectory (rate x sharpness crossing 2, see
# `tf_overparam.diagnostics.sharpness`), which hardly depends on the draw, so a few full runs
# decide them: the final stage's five seeds.
LATE_SEEDS = 5
CONFIDENCE = 0.95
EDGE_REL_TOL = 0.02

Edge = collections.namedtuple("Edge", ["stable", "unstable"])
Edge.__doc__ = "The stability edge's bracket: the largest rate found stable, the smallest found unstable."


def wilson_interval(count, trials, confidence=CONFIDENCE):
    """The Wilson score interval of a binomial proportion `count / trials`: the p for which
    |count / trials - p| <= z sqrt(p (1 - p) / trials), z the normal quantile of the two-sided
    `confidence`. Unlike the normal (Wald) interval it is not empty at 0 blow-ups and keeps
    close to its coverage for proportions of a few percent."""
    if not 0 <= count <= trials or trials < 1:
        raise ValueError(f"`count` and `trials` must satisfy 0 <= count <= trials, trials >= 1; got {count}, {trials}.")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence!r}.")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    fraction, z2 = count / trials, z * z / trials
    centre = (fraction + z2 / 2) / (1 + z2)
    half = z * math.sqrt(fraction * (1 - fraction) / trials + z2 / (4 * trials)) / (1 + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class BlowupEstimate:
    """One rate's early blow-ups: the seeds run, those that diverged, and the probability."""

    rate: float
    seeds: tuple
    blown_up: tuple
    confidence: float = CONFIDENCE

    @property
    def probability(self):
        return len(self.blown_up) / len(self.seeds)

    @property
    def interval(self):
        return wilson_interval(len(self.blown_up), len(self.seeds), self.confidence)

    def decided(self, threshold=BLOWUP_THRESHOLD):
        """Whether the interval lies wholly on one side of `threshold` (the call is not close)."""
        low, high = self.interval
        return high < threshold or low >= threshold

    def as_dict(self):
        """For results.json: the rate, the seed count, the blown-up seeds, the probability and
        its interval."""
        return {
            "rate": self.rate,
            "seeds": len(self.seeds),
            "blown_up_seeds": list(self.blown_up),
            "probability": self.probability,
            "interval": list(self.interval),
            "confidence": self.confidence,
        }


def _seed_list(seeds, name="seeds"):
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"`{name}` must be a positive count or a sequence of seeds, got {seeds!r}.")
        return tuple(range(int(seeds)))
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`{name}` must hold at least one seed and no seed twice, got {seeds!r}.")
    return seeds


def _check_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate < math.inf:
        raise ValueError(f"`rate` must be a finite positive number, got {rate!r}.")
    return float(rate)


def _run(diverges, rate, seeds, batched):
    flags = diverges(rate, list(seeds)) if batched else [diverges(rate, s) for s in seeds]
    flags = [bool(f) for f in flags]
    if len(flags) != len(seeds):
        raise ValueError(f"`diverges` returned {len(flags)} flags for {len(seeds)} seeds.")
    return tuple(s for s, f in zip(seeds, flags) if f)


def blowup_probability(diverges, rate, seeds=SCREEN_SEEDS, confidence=CONFIDENCE, batched=False):
    """The early blow-up probability of one rate.

    Args:
        diverges: `diverges(rate, seed) -> bool`, True if that seed's run (its first few hundred
            iterations) diverged; with `batched`, `diverges(rate, seeds) -> sequence of bools`.
        rate: positive float.
        seeds: a count n (seeds 0 .. n - 1) or a sequence of distinct ints.
        confidence: of the Wilson interval.

    Returns a `BlowupEstimate`.
    """
    rate, seeds = _check_rate(rate), _seed_list(seeds)
    wilson_interval(0, 1, confidence)  # checks `confidence`
    return BlowupEstimate(rate, seeds, _run(diverges, rate, seeds, batched), confidence)


def blowup_screen(diverges, rates, seeds=SCREEN_SEEDS, confidence=CONFIDENCE, batched=False):
    """`blowup_probability` at every rate of `rates`, on the same seeds; a list of estimates."""
    return [blowup_probability(diverges, rate, seeds, confidence, batched) for rate in rates]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a rate is stable: its early screen and the full runs that followed it."""

    early: BlowupEstimate
    late_seeds: tuple
    late_diverged: tuple
    threshold: float = BLOWUP_THRESHOLD

    @property
    def rate(self):
        return self.early.rate

    @property
    def stable(self):
        return self.early.probability < self.threshold and not self.late_diverged

    def as_dict(self):
        return {
            **self.early.as_dict(),
            "threshold": self.threshold,
            "late_seeds": list(self.late_seeds),
            "late_diverged_seeds": list(self.late_diverged),
            "stable": self.stable,
        }


class StabilityCriterion:
    """`is_stable(rate)` for `stability_edge`: early blow-up probability below `threshold` and
    no late divergence over `late_seeds` full runs; every verdict is kept in `verdicts`.

    Args:
        diverges_early: `diverges_early(rate, seed) -> bool` over the first few hundred
            iterations (with `batched`, over a list of seeds at once).
        diverges_late: `diverges_late(rate, seed) -> bool` over the whole horizon (with
            `batched`, over a list of seeds at once), or None where only early blow-ups count.
            It runs only where the early screen passed, on the first `late_seeds` seeds that
            did not blow up early.
        seeds: the screen's seeds (a count or a sequence), the same for every rate.
        late_seeds: positive int, K.
        threshold: the blow-up probability at and above which a rate is unstable.
        confidence: of the reported intervals.
        batched: whether both functions take a list of seeds (one vectorised run per rate).
    """

    def __init__(
        self,
        diverges_early,
        diverges_late=None,
        seeds=SCREEN_SEEDS,
        late_seeds=LATE_SEEDS,
        threshold=BLOWUP_THRESHOLD,
        confidence=CONFIDENCE,
        batched=False,
    ):
        if not 0 < threshold <= 1:
            raise ValueError(f"`threshold` must lie in (0, 1], got {threshold!r}.")
        if isinstance(late_seeds, bool) or not isinstance(late_seeds, numbers.Integral) or late_seeds < 1:
            raise ValueError(f"`late_seeds` must be a positive int, got {late_seeds!r}.")
        wilson_interval(0, 1, confidence)
        self.diverges_early, self.diverges_late = diverges_early, diverges_late
        self.seeds, self.late_seeds = _seed_list(seeds), int(late_seeds)
        self.threshold, self.confidence, self.batched = float(threshold), confidence, batched
        self.verdicts = []

    def verdict(self, rate):
        """The `Verdict` of one rate (also appended to `verdicts`)."""
        early = blowup_probability(self.diverges_early, rate, self.seeds, self.confidence, self.batched)
        late_seeds, late_diverged = (), ()
        if self.diverges_late is not None and early.probability < self.threshold:
            late_seeds = tuple(s for s in self.seeds if s not in set(early.blown_up))[: self.late_seeds]
            late_diverged = _run(self.diverges_late, early.rate, late_seeds, self.batched)
        verdict = Verdict(early, late_seeds, late_diverged, self.threshold)
        self.verdicts.append(verdict)
        return verdict

    def __call__(self, rate):
        return self.verdict(rate).stable


def stability_edge(is_stable, low, high, rel_tol=EDGE_REL_TOL, check_bracket=True):
    """The largest stable rate, by bisection on a log scale.

    Args:
        is_stable: `is_stable(rate) -> bool`, e.g. a `StabilityCriterion`; stable below the edge
            and unstable above it.
        low, high: a bracket, 0 < low < high, `low` stable and `high` unstable.
        rel_tol: positive float; the bisection stops once unstable / stable <= 1 + rel_tol.
        check_bracket: evaluate `low` and `high` first and raise a `ValueError` naming the one
            on the wrong side (two more evaluations; skip them for a bracket already known).

    Returns an `Edge(stable, unstable)`: the edge lies between them, at most `rel_tol` apart.
    Each step evaluates the geometric mean of the bracket (`experiments.common.rates.stability_edge`
    with one point per round), ceil(log2(log(high / low) / log(1 + rel_tol))) steps in all.
    """
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, numbers.Real) or not 0 < rel_tol < math.inf:
        raise ValueError(f"`rel_tol` must be a finite positive number, got {rel_tol!r}.")
    if not (isinstance(low, numbers.Real) and isinstance(high, numbers.Real) and 0 < low < high < math.inf):
        raise ValueError(f"`low` and `high` must satisfy 0 < low < high < inf, got {low!r}, {high!r}.")
    low, high = float(low), float(high)
    if check_bracket:
        if not is_stable(low):
            raise ValueError(f"`low` = {low!r} is not stable: lower it so that the bracket holds the edge.")
        if is_stable(high):
            raise ValueError(f"`high` = {high!r} is stable: raise it so that the bracket holds the edge.")
    # The margin keeps the last bracket within `rel_tol` despite the rounding of the midpoints.
    rounds = max(0, math.ceil(math.log2(math.log(high / low) / (math.log1p(rel_tol) * (1 - 1e-9)))))
    low, high = rate_rules.stability_edge(
        lambda rates: np.array([bool(is_stable(float(r))) for r in rates]), low, high, rounds=rounds, points=1
    )
    return Edge(low, high)
