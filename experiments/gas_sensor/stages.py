"""Which stage of a configuration comes next, from the grids finished so far (`next_stage`), and
the rules it follows. The same machine replays a resumed run from its saved grids.

1. `<name>.screen`: the coarse grid, seed 0. Its best rate seeds the final stage: the fastest
   to the targets among the rates whose final losses are equal (`rates.fastest_among_equals`),
   which needs the group's targets (its `gd-d1` final stage); the baseline's own screen, with
   no targets yet, takes the lowest final loss.
2. `<name>`: the final stage, the screen's best rate and its refined neighbours, every seed.
3. `<name>.below`: only when every final rate is flagged, one coarse step below
   (`rates.round_below`); its grid joins the final one.
4. `<name>.edge1`, `.edge2`, ...: for the `edge_configurations` (default HEADLINE), rounds of a vectorised
   bisection of the stability edge (three rates per round) until unstable / stable <= 1 +
   EDGE_REL_TOL. The best rate is then chosen among the rates up to the edge's stable one.
5. `l4/gd-d1.sensitivity`: depth 1 at SENSITIVITY_POINTS rates from SENSITIVITY_LOW to its edge.

Every stage also runs an early screen (its rates x `screen_seeds` seeds for `early_iterations`;
grid `<stage>.early`). The blow-up rule (`experiments.stability`): a rate whose early blow-up
probability is at least BLOWUP_THRESHOLD is flagged, unusable; below it, a seed of a full run
that diverged within `early_iterations` is that seed's failure, left out of the rate's medians
and listed, not a flag on the rate. A rate is stable when its probability is below the threshold
and none of its other seeds (at most `late_seeds`) diverges later (`stability.Verdict`).
"""

import dataclasses

import numpy as np

from experiments import stability
from experiments.common import curves
from experiments.common import rates as rate_rules
from experiments.gas_sensor import plan
from experiments.gas_sensor.plan import TARGET_FACTORS

WAIT = "wait"  # `next_stage`'s answer while the group's targets are not known yet
EDGE_MAX_ROUNDS = 8  # a bracket of a coarse step closes to 2% in 3 rounds; 8 allow a moving edge

BLOWUP_RULE = (
    "a rate whose early blow-up probability (over screen_seeds seeds, early_iterations iterations) is at least "
    "blowup_threshold is flagged; below it, a seed that diverged within early_iterations is that seed's failure: "
    "left out of the rate's medians and listed under early_failures"
)


@dataclasses.dataclass
class Counted:
    """A stage's grid under the blow-up rule: `grid` without the early failures, `failures`
    {rate: [seeds]}, the `unusable` rates and every rate's `estimates` (`BlowupEstimate`)."""

    stage: object
    grid: object
    raw: object
    failures: dict
    unusable: set
    estimates: dict


def subset(grid, keep):
    """The grid points of `grid` (a `GridResult`) where `keep` is True."""
    keep = np.asarray(keep, dtype=bool)
    changes = dict(
        learning_rates=grid.learning_rates[keep],
        seeds=grid.seeds[keep],
        losses=grid.losses[:, keep],
        diverged_at=grid.diverged_at[keep],
    )
    if grid.kernels is not None and np.ndim(grid.kernels) and len(grid.kernels) == keep.size:
        changes["kernels"] = grid.kernels[keep]
    sharpness = getattr(grid, "sharpness", None)
    if sharpness is not None and np.ndim(sharpness) == 2 and sharpness.shape[1] == keep.size:
        changes["sharpness"] = sharpness[:, keep]
    return dataclasses.replace(grid, **changes)


def merge(grids):
    """One `GridResult` of grids logged at the same iterations, their points side by side."""
    grids = [g for g in grids if g is not None]
    if len(grids) == 1:
        return grids[0]

    def join(field, axis=0):
        values = [getattr(g, field, None) for g in grids]
        if any(v is None or np.ndim(v) == 0 for v in values):
            return values[0]
        try:
            return np.concatenate(values, axis=axis)
        except ValueError:  # differing shapes (no kernels kept, or no sharpness)
            return values[0]

    changes = dict(
        learning_rates=join("learning_rates"),
        seeds=join("seeds"),
        losses=join("losses", axis=1),
        diverged_at=join("diverged_at"),
        kernels=join("kernels"),
    )
    if getattr(grids[0], "sharpness", None) is not None:
        same = all(np.array_equal(g.sharpness_iterations, grids[0].sharpness_iterations) for g in grids)
        if same and all(np.ndim(g.sharpness) == 2 for g in grids):
            changes["sharpness"] = np.concatenate([g.sharpness for g in grids], axis=1)
    return dataclasses.replace(grids[0], **changes)


def early_estimates(early):
    """{rate: `stability.BlowupEstimate`} of an early-screen grid: a seed blew up if it diverged."""
    estimates = {}
    for rate in np.unique(early.learning_rates):
        points = np.flatnonzero(early.learning_rates == rate)
        seeds = tuple(int(s) for s in early.seeds[points])
        blown = tuple(int(early.seeds[g]) for g in points if early.diverged_at[g] >= 0)
        estimates[float(rate)] = stability.BlowupEstimate(float(rate), seeds, blown)
    return estimates


def count(stage, grid, early, early_iterations, threshold=stability.BLOWUP_THRESHOLD):
    """`Counted`: `grid` (a stage's full run) under the blow-up rule of its `early` screen."""
    estimates = early_estimates(early)
    unusable = {rate for rate, estimate in estimates.items() if estimate.probability >= threshold}
    at_usable = ~np.isin(grid.learning_rates, sorted(unusable))
    failed = (grid.diverged_at >= 0) & (grid.diverged_at < early_iterations) & at_usable
    failures = {}
    for g in np.flatnonzero(failed):
        failures.setdefault(float(grid.learning_rates[g]), []).append(int(grid.seeds[g]))
    return Counted(stage, subset(grid, ~failed), grid, failures, unusable, estimates)


def counted(grids, stage):
    """The `Counted` of `stage` if it finished (its grid and its early screen), else None."""
    grid, early = grids.get(stage.name), grids.early(stage.name)
    if grid is None or early is None:
        return None
    return count(stage, grid, early, stage.early_iterations)


def reports(grid, targets, excluded=()):
    """`curves.curve_report` per grid point; a point at a rate in `excluded` is flagged."""
    out = [curves.curve_report(grid.iterations, grid.losses[:, g], targets) for g in range(grid.losses.shape[1])]
    for report, rate in zip(out, grid.learning_rates):
        if float(rate) in excluded:
            report["flagged"] = True
    return out


def best_rate(grid, targets, excluded=()):
    """The best rate of `grid`: among the unflagged rates whose median final losses are equal
    within FINAL_LOSS_TOLERANCE, the fastest to the hardest target reached
    (`rates.fastest_among_equals`); with no targets, the lowest median final loss. None if all
    are flagged."""
    if grid.losses.shape[1] == 0:
        return None
    rate, _ = rate_rules.fastest_among_equals(
        grid.learning_rates, grid.seeds, reports(grid, targets, excluded), grid.losses[-1]
    )
    return rate


def final_stage(config, run, screen, targets):
    """The final stage after the `Counted` screen: its best rate (`best_rate`) and
    `refine_points` rates on each side, with every seed."""
    coarse = np.unique(screen.raw.learning_rates)
    best = best_rate(screen.grid, targets, screen.unusable)
    best = coarse[0] if best is None else best  # all flagged: refine below the smallest rate
    rates = np.sort(np.append(rate_rules.refine_around(coarse, best, config.refine_points), best))
    return plan.make_stage(config, run, "final", rates, plan.seeds_for(config, run.name))


def flagged_rates(counted_stage):
    """Per rate of a `Counted` stage (sorted), whether it is flagged: unusable, no seed left, or
    a seed flagged by the counting rules."""
    grid, rates = counted_stage.grid, np.unique(counted_stage.raw.learning_rates)
    flags = [r["flagged"] for r in reports(grid, [])]
    return rates, np.array(
        [
            float(r) in counted_stage.unusable
            or not np.any(grid.learning_rates == r)
            or any(flags[g] for g in np.flatnonzero(grid.learning_rates == r))
            for r in rates
        ]
    )


def settled(config, run, grids, targets):
    """The `Counted` screen, final and below stages of `run` (below None when not needed), or
    the first of them still to train (a `Stage`), or WAIT when the final needs `targets`."""
    screen_stage = plan.screen_stage(config, run)
    screen = counted(grids, screen_stage)
    if screen is None:
        return screen_stage
    if targets is None:
        return WAIT
    final_stage_ = final_stage(config, run, screen, targets)
    final = counted(grids, final_stage_)
    if final is None:
        return final_stage_
    rates, flags = flagged_rates(final)
    below_rates = rate_rules.round_below(rates, flags, rate_rules.grid_step(screen.raw.learning_rates))
    if below_rates is None:
        return screen, final, None
    below_stage = plan.make_stage(config, run, "below", below_rates, final_stage_.seeds)
    below = counted(grids, below_stage)
    return below_stage if below is None else (screen, final, below)


def ranking_targets(config, baseline, grids):
    """The targets of `baseline`'s group (TARGET_FACTORS x its lowest median final loss among
    its usable final and below rates with no seed diverged), [] if it has none, None while its
    final (and below) stage is not finished."""
    done = settled(config, baseline, grids, [])
    if not isinstance(done, tuple):
        return None
    medians = []
    for part in done[1:]:
        if part is None:
            continue
        for rate in np.unique(part.grid.learning_rates):
            points = np.flatnonzero(part.grid.learning_rates == rate)
            diverged = [curves.diverged_at(part.grid.iterations, part.grid.losses[:, g]) for g in points]
            if float(rate) not in part.unusable and all(d is None for d in diverged):
                medians.append(float(np.median(part.grid.losses[-1, points])))
    return [factor * min(medians) for factor in TARGET_FACTORS] if medians else []


def verdict(part, rate, late_seeds):
    """The `stability.Verdict` of `rate` in the `Counted` stage `part`."""
    estimate = part.estimates[float(rate)]
    seeds, diverged = (), ()
    if float(rate) not in part.unusable:
        points = np.flatnonzero(part.grid.learning_rates == rate)[:late_seeds]
        seeds = tuple(int(part.grid.seeds[g]) for g in points)
        diverged = tuple(
            int(part.grid.seeds[g])
            for g in points
            if curves.diverged_at(part.grid.iterations, part.grid.losses[:, g]) is not None
        )
    return stability.Verdict(estimate, seeds, diverged)


@dataclasses.dataclass
class EdgeSearch:
    """The edge's bisection replayed from the grids: the `next` edge stage (None when done),
    the rounds' `Counted` stages, and the `record` for results.json."""

    next: object
    rounds: list
    record: dict


def edge_search(config, run, grids, screen, full):
    """The stability edge of `run` from its `Counted` `screen` and full-horizon stages `full`
    (final, below): the bracket [largest stable rate, smallest rate above it seen unstable, or
    one coarse step above, to verify], narrowed by rounds of 3 rates (`rates.stability_edge`)."""
    step = rate_rules.grid_step(screen.raw.learning_rates)
    seeds = plan.seeds_for(config, run.name)[: config.late_seeds]
    screened = [(verdict(screen, r, config.late_seeds), screen.stage.name) for r in screen.estimates]
    verdicts = [(verdict(p, r, config.late_seeds), p.stage.name) for p in full for r in p.estimates]
    stable = [v.rate for v, _ in verdicts if v.stable]
    record = {"stable": None, "unstable": None, "verdicts": [], "rounds": 0, "reason": None}
    record["verdicts"] = [{**v.as_dict(), "stage": name} for v, name in screened + verdicts]
    if not stable:
        record["reason"] = "no final or below rate is stable"
        return EdgeSearch(None, [], record)
    low = max(stable)
    above = [v.rate for v, _ in screened + verdicts if not v.stable and v.rate > low]
    high, verified = (min(above), True) if above else (low * step, False)
    rounds = []
    while not (verified and high / low <= 1 + stability.EDGE_REL_TOL):
        if len(rounds) == EDGE_MAX_ROUNDS:
            record["reason"] = f"the bracket did not close to {stability.EDGE_REL_TOL:g} in {EDGE_MAX_ROUNDS} rounds"
            break
        if verified:
            candidates = np.geomspace(low, high, config.edge_points + 2)[1:-1]
        else:  # the bracket's top is a guess: the round's last rate checks it
            candidates = np.geomspace(low, high, config.edge_points + 1)[1:]
        stage = plan.make_stage(config, run, "edge", candidates, seeds, round=len(rounds) + 1)
        part = counted(grids, stage)
        if part is None:
            record.update(stable=low, unstable=high if verified else None, rounds=len(rounds))
            return EdgeSearch(stage, rounds, record)
        rounds.append(part)
        round_verdicts = [verdict(part, r, config.late_seeds) for r in stage.learning_rates]
        record["verdicts"] += [{**v.as_dict(), "stage": stage.name} for v in round_verdicts]
        flags = [v.stable for v in round_verdicts]
        first_unstable = flags.index(False) if False in flags else len(flags)
        if first_unstable > 0:
            low = stage.learning_rates[first_unstable - 1]
        if first_unstable < len(flags):
            high, verified = stage.learning_rates[first_unstable], True
        elif not verified:
            high = low * step
    record.update(stable=low, unstable=high if verified else None, rounds=len(rounds))
    return EdgeSearch(None, rounds, record)


def sensitivity_stage(config, run, edge):
    """`l4/gd-d1.sensitivity`: `sensitivity_points` rates log-even from SENSITIVITY_LOW (moved
    like the grid) to the edge's stable rate, every headline seed; None below SENSITIVITY_LOW."""
    low = plan.SENSITIVITY_LOW * 10**run.rate_shift
    if edge.record["stable"] is None or edge.record["stable"] <= low:
        return None
    rates = np.geomspace(low, edge.record["stable"], config.sensitivity_points)
    return plan.make_stage(config, run, "sensitivity", rates, plan.seeds_for(config, run.name))


@dataclasses.dataclass
class Machine:
    """Where a configuration stands: its `next` stage (a `Stage`, WAIT, or None when done),
    its finished `Counted` stages and, for a headline one, its `edge` search."""

    next: object
    parts: list
    edge: EdgeSearch = None
    sensitivity: object = None
    before: list = dataclasses.field(default_factory=list)  # stages finished before `parts` exist

    @property
    def finished(self):
        """Every finished `Stage` of the configuration."""
        done = [p.stage for p in self.parts] + ([self.sensitivity.stage] if self.sensitivity else [])
        return self.before + done


def machine(config, run, grids, targets):
    """Replays `run`'s stages from `grids` (`get(name)` and `early(name)`: finished grids or
    None); `targets`: its group's ranking targets, [] for none, None while unknown."""
    done = settled(config, run, grids, targets)
    if not isinstance(done, tuple):
        before = []
        if done is WAIT or done.kind != "screen":
            before.append(plan.screen_stage(config, run))
        if done is not WAIT and done.kind == "below":
            screen = counted(grids, before[0])
            before.append(final_stage(config, run, screen, targets))
        return Machine(done, [], before=before)
    screen, final, below = done
    full = [final] if below is None else [final, below]
    if run.name not in config.edge_configurations:
        return Machine(None, [screen, *full])
    edge = edge_search(config, run, grids, screen, full)
    parts = [screen, *full, *edge.rounds]
    if edge.next is not None:
        return Machine(edge.next, parts, edge)
    stage = sensitivity_stage(config, run, edge) if run.name == plan.HEADLINE[0] else None
    sensitivity = None if stage is None else counted(grids, stage)
    return Machine(stage if stage is not None and sensitivity is None else None, parts, edge, sensitivity)


def next_stage(config, run, grids, targets):
    """The next `Stage` of `run` to train, WAIT (its final stage needs the group's targets), or
    None when it is done (see `machine`)."""
    return machine(config, run, grids, targets).next
