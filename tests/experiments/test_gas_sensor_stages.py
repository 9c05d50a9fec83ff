"""The gas sensor's stage machine on hand-made grids (no training): the round below a flagged
final stage, the blow-up rule, the ranking by time to target, the stability edge's bisection."""

import numpy as np
import pytest

from experiments import stability
from experiments.engine.fullbatch import ChainSpec, GridResult, log_schedule
from experiments.gas_sensor import plan, records, report, stages

CONFIG = plan.Config.quick()


def _run(name, depth=1):
    return plan.RunConfig(name, name, ChainSpec(depth=depth, p=4.0))


def _curves(rates, seeds, iterations):
    """Losses falling as 1 / (1 + 100 rate t), a little higher for each seed."""
    return 1.0 / (1.0 + 100 * rates[None, :] * iterations[:, None]) * (1 + 0.001 * seeds[None, :])


class FakeGrids:
    """`get`/`early` for the machine, filled by `train` from rules of who diverges when:
    `late(rate, seed, kind)` -> the iteration a full run of a stage of `kind` diverges at (or -1),
    `early(rate, seed)` -> whether a draw blows up within the early screen (at iteration 3)."""

    def __init__(self, late=lambda rate, seed, kind: -1, early=lambda rate, seed: False):
        self.late, self.blows_up = late, early
        self.full, self.screens = {}, {}

    def get(self, name):
        return self.full.get(name)

    def early(self, name):
        return self.screens.get(name)

    def train(self, stage):
        rates = np.tile(np.asarray(stage.learning_rates), len(stage.seeds))
        seeds = np.repeat(np.asarray(stage.seeds), len(stage.learning_rates))
        iterations = log_schedule(stage.iterations, CONFIG.log_points)
        losses = _curves(rates, seeds, iterations)
        diverged = np.array([3 if self.blows_up(r, s) else self.late(r, s, stage.kind) for r, s in zip(rates, seeds)])
        for g, at in enumerate(diverged):
            if at >= 0:
                losses[iterations >= at, g] = np.nan
        self.full[stage.name] = GridResult(rates, seeds, iterations, losses, diverged, kernels=np.zeros(0))
        early_rates = np.tile(np.asarray(stage.learning_rates), len(stage.early_seeds))
        early_seeds = np.repeat(np.asarray(stage.early_seeds), len(stage.learning_rates))
        blown = np.array([3 if self.blows_up(r, s) else -1 for r, s in zip(early_rates, early_seeds)])
        early_losses = np.ones((2, early_rates.size))
        self.screens[stage.name] = GridResult(
            early_rates, early_seeds, np.array([0, stage.early_iterations]), early_losses, blown, np.zeros(0)
        )

    def run_all(self, run, targets=(), limit=40):
        """Trains every stage the machine asks for; returns their names in order."""
        names = []
        while (stage := stages.next_stage(CONFIG, run, self, list(targets))) is not None:
            assert stage.name not in names and len(names) < limit, names
            names.append(stage.name)
            self.train(stage)
        return names


def test_the_round_below_comes_exactly_when_every_final_rate_is_flagged():
    run = _run("l4/gd-d2-w4", depth=2)
    grids = FakeGrids()
    grids.train(stages.next_stage(CONFIG, run, grids, []))
    final = stages.next_stage(CONFIG, run, grids, [])
    assert final.name == run.name and final.kind == "final"
    # Every final rate diverges late: a round below the smallest of them.
    everything = FakeGrids(late=lambda rate, seed, kind: 1000 if kind == "final" else -1)
    assert everything.run_all(run) == [f"{run.name}.screen", run.name, f"{run.name}.below"]
    below = stages.settled(CONFIG, run, everything, [])[2]
    assert max(below.stage.learning_rates) < min(final.learning_rates)
    assert below.stage.seeds == final.seeds
    # The largest final rate alone diverges: no round below.
    one = FakeGrids(late=lambda rate, seed, kind: 1000 if kind == "final" and rate == max(final.learning_rates) else -1)
    assert one.run_all(run) == [f"{run.name}.screen", run.name]


def test_an_early_failed_seed_is_left_out_and_a_rate_that_blows_up_often_is_flagged():
    run = _run("l4/gd-d2-w4", depth=2)
    config = plan.Config.quick(screen_seeds=40)
    stage = plan.make_stage(config, run, "final", [1e-3, 2e-3], (0, 1, 2))
    # Rate 1e-3: seed 1 blows up (1 of 40 draws: 2.5%, below the 5% threshold); rate 2e-3: seeds
    # 0, 1, 5 and 7 of 40 (10%).
    blown = {1e-3: {1}, 2e-3: {0, 1, 5, 7}}
    grids = FakeGrids(early=lambda rate, seed: seed in blown[rate])
    grids.train(stage)
    part = stages.counted(grids, stage)
    assert part.failures == {1e-3: [1]}
    assert part.unusable == {2e-3}
    assert part.estimates[2e-3].probability == 4 / 40 and part.estimates[1e-3].probability == 1 / 40
    # The kept rate's medians are over seeds 0 and 2; the flagged rate keeps its points.
    kept = part.grid.seeds[part.grid.learning_rates == 1e-3]
    assert sorted(kept) == [0, 2] and np.sum(part.grid.learning_rates == 2e-3) == 3
    summary = report.summarize(part.grid, [], excluded=part.unusable)
    assert summary["best_learning_rate"] == 1e-3
    finals = grids.full[stage.name].losses[-1, [0, 4]]  # rate 1e-3, seeds 0 and 2
    assert summary["final_loss"] == pytest.approx(np.median(finals))
    record = records.stage_record(part)
    assert record["early_failures"] == {"0.001": [1]} and record["unusable_rates"] == [2e-3]
    assert [e["probability"] for e in record["early"]["estimates"]] == [1 / 40, 4 / 40]


def _two_rate_grid(final_ratio):
    """Rate 0.1 reaches 1.0 at iteration 20, rate 0.2 at 10; rate 0.1 ends lower by `final_ratio`."""
    iterations = np.array([0, 10, 20, 30, 40])
    fast = [4.0, 0.9, 0.8, 0.7, 0.6]
    slow = [4.0, 2.0, 0.9, 0.7, 0.6 / final_ratio]
    losses = np.array([slow, fast]).T
    return GridResult(np.array([0.1, 0.2]), np.zeros(2, int), iterations, losses, -np.ones(2, int), np.zeros(0))


def test_equal_final_losses_are_ranked_by_time_to_target():
    equal = _two_rate_grid(1.005)  # finals within FINAL_LOSS_TOLERANCE (1%)
    assert stages.best_rate(equal, [1.0]) == 0.2  # the faster to the target
    assert stages.best_rate(equal, []) == 0.1  # no targets: the lowest final loss
    apart = _two_rate_grid(1.05)  # 5% apart: only the lower counts
    assert stages.best_rate(apart, [1.0]) == 0.1


EDGE = 3.7e-3


@pytest.mark.parametrize("mode", ["late", "early"])
def test_the_edge_bisection_closes_to_two_percent_around_a_known_edge(mode):
    # Above EDGE every seed diverges late, or half the draws blow up early (unusable rates).
    if mode == "late":
        grids = FakeGrids(late=lambda rate, seed, kind: 1000 if rate > EDGE else -1)
    else:
        grids = FakeGrids(early=lambda rate, seed: rate > EDGE and seed % 2 == 0)
    run = _run("l4/gd-d1")
    names = grids.run_all(run)
    state = stages.machine(CONFIG, run, grids, [])
    edge = state.edge.record
    assert edge["reason"] is None and edge["stable"] <= EDGE < edge["unstable"]
    assert edge["unstable"] / edge["stable"] <= 1 + stability.EDGE_REL_TOL
    rounds = [n for n in names if ".edge" in n]
    assert rounds == [f"l4/gd-d1.edge{k}" for k in range(1, len(rounds) + 1)] and 1 <= len(rounds) <= 4
    assert all(v["stable"] == (v["rate"] <= EDGE) for v in edge["verdicts"])
    # Depth 1's sensitivity stage: log-even rates from SENSITIVITY_LOW to the edge, headline seeds.
    assert names[-1] == "l4/gd-d1.sensitivity"
    rates = grids.full[names[-1]].learning_rates[: CONFIG.sensitivity_points]
    np.testing.assert_allclose(rates, np.geomspace(plan.SENSITIVITY_LOW, edge["stable"], CONFIG.sensitivity_points))
    # The best rate lies at or below the edge's stable rate.
    view = records.configuration_view(CONFIG, run, state)
    summary = report.summarize(view["grid"], [], view["excluded"])
    assert summary["best_learning_rate"] <= edge["stable"]
    # Replaying the same grids gives the same machine: nothing left to train.
    assert stages.next_stage(CONFIG, run, grids, []) is None


def test_a_configuration_waits_for_its_groups_targets():
    run = _run("l4/gd-d2-w1", depth=2)
    grids = FakeGrids()
    grids.train(stages.next_stage(CONFIG, run, grids, None))
    assert stages.next_stage(CONFIG, run, grids, None) is stages.WAIT
    baseline = _run("l4/gd-d1")
    assert stages.ranking_targets(CONFIG, baseline, grids) is None
    grids.train(stages.next_stage(CONFIG, baseline, grids, []))  # its screen
    grids.train(stages.next_stage(CONFIG, baseline, grids, []))  # its final stage
    targets = stages.ranking_targets(CONFIG, baseline, grids)
    finals = grids.full["l4/gd-d1"]
    medians = [np.median(finals.losses[-1, finals.learning_rates == r]) for r in np.unique(finals.learning_rates)]
    assert targets == pytest.approx([f * min(medians) for f in plan.TARGET_FACTORS])
    assert stages.next_stage(CONFIG, run, grids, targets).kind == "final"
