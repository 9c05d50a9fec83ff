"""Counting rules on hand-made curves, rate refinement, and the stability edge 2/L found
through the real full-batch engine."""

import numpy as np
import pytest

from experiments.common import curves
from experiments.common import rates as rate_rules
from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer, log_schedule

ITERATIONS = np.arange(0, 110, 10)  # 0, 10, ..., 100


def test_sustained_crossing_waits_for_the_last_excursion_above_the_target():
    #        0    10   20   30   40   50   60   70   80   90   100
    spiky = [8.0, 4.0, 0.9, 3.0, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5]
    assert curves.first_crossing(ITERATIONS, spiky, 1.0) == 20
    assert curves.sustained_crossing(ITERATIONS, spiky, 1.0) == 40  # the spike at 30 moves it
    assert curves.sustained_crossing(ITERATIONS, spiky, 0.5) == 70
    assert curves.sustained_crossing(ITERATIONS, spiky, 0.1) is None
    ends_up = [8.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0]  # above at the last log
    assert curves.sustained_crossing(ITERATIONS, ends_up, 1.0) is None
    nan_tail = [8.0, 0.5, 0.5, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan]
    assert curves.sustained_crossing(ITERATIONS, nan_tail, 1.0) is None
    assert curves.sustained_crossing(ITERATIONS, [0.5] * 11, 1.0) == 0


def test_bounded_blow_up_is_divergence_a_recovered_one_is_a_spike():
    # Falls to 0.5 (1/20 of the initial 10), climbs to 12 (> 10) at 50 and stays: diverged at 50.
    blow_up = [10.0, 2.0, 0.5, 0.5, 3.0, 12.0, 15.0, 14.0, 13.0, 12.0, 11.0]
    assert curves.diverged_at(ITERATIONS, blow_up) == 50
    # The same climb that comes back down below the initial loss: not diverged, one spike
    # (0.5 -> peak 15 -> back under 2 x 0.5), of height 15 / 0.5 = 30.
    recovers = [10.0, 2.0, 0.5, 0.5, 3.0, 12.0, 15.0, 0.9, 0.4, 0.4, 0.4]
    assert curves.diverged_at(ITERATIONS, recovers) is None
    assert curves.spikes(recovers) == (1, 30.0)
    # Never fell to 1/10 of the initial loss: a slow rise is not a bounded blow-up.
    never_fell = [10.0, 9.0, 8.0, 9.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    assert curves.diverged_at(ITERATIONS, never_fell) is None
    # The engine's NaN: diverged at the first NaN.
    assert curves.diverged_at(ITERATIONS, [10.0, 1.0, np.nan] + [np.nan] * 8) == 20
    # A spike still up at the end is not a recovered spike.
    assert curves.spikes([10.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]) == (0, 1.0)
    # Two spikes: 1 -> 3 -> 1 (height 3) and 0.5 -> 4 -> 0.6 (height 8).
    assert curves.spikes([10.0, 1.0, 3.0, 1.0, 0.5, 4.0, 0.6, 0.5, 0.5, 0.5, 0.5]) == (2, 8.0)


def test_stall_and_oscillation_flags():
    converging = [10.0, 5.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.11, 0.105]
    assert not curves.stalled(converging) and not curves.oscillating(ITERATIONS, converging)
    # Best 0.2 at 30, ends at 0.5 > 1.5 x 0.2: stalled above its best.
    stall = [10.0, 1.0, 0.4, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert curves.stalled(stall) and not curves.oscillating(ITERATIONS, stall)
    # Logs every 10 up to 1000; the last 10% (11 logs) alternate 1.0, 1.1: 5 rises of 10% > 1%.
    iterations = np.arange(0, 1010, 10)
    wobble = np.concatenate([np.geomspace(10.0, 1.0, 90), [1.0, 1.1] * 5, [1.0]])
    assert curves.oscillating(iterations, wobble) and not curves.stalled(wobble)
    # Two rises in the tail are below OSCILLATION_MIN_RISES = 3.
    two = np.concatenate([np.geomspace(10.0, 1.0, 90), [1.0, 1.1, 1.0, 1.1, 1.0], [0.9] * 6])
    assert not curves.oscillating(iterations, two)
    report = curves.curve_report(ITERATIONS, stall, [1.0, 0.3])
    assert report["flagged"] and report["stalled"] and report["diverged_at"] is None
    assert report["iterations_to_target"] == [10, None]  # 0.2 at 30, then 0.4: 0.3 not sustained
    assert report["first_crossing"] == [10, 30]


def test_log_schedule_check_and_the_engine_schedule_meets_it():
    curves.check_log_schedule(log_schedule(1_000_000, 400), 1_000_000)  # 200 linear gaps of 0.5%
    with pytest.raises(ValueError, match="`schedule`"):
        curves.check_log_schedule(log_schedule(1_000_000, 100), 1_000_000)


def test_medians_and_speedups_over_seeds():
    assert curves.median_and_range([30, 10, 20]) == (20.0, (10.0, 30.0))
    assert curves.median_and_range([30, None, 20]) == (30.0, (20.0, None))  # None = infinite
    assert curves.median_and_range([None, None, 20]) == (None, (20.0, None))
    ratio, span = curves.speedup({0: 100, 1: 200, 2: 300}, {0: 50, 1: 40, 2: 150})  # per seed: 2, 5, 2
    assert ratio == pytest.approx(200 / 50) and span == (2.0, 5.0)
    # Five baseline seeds against three: medians over each one's own seeds, ratios on the common ones.
    ratio, span = curves.speedup({0: 100, 1: 200, 2: 300, 3: 400, 4: None}, {0: 10, 1: None, 2: 30})
    assert ratio == pytest.approx(300 / 30) and span == (10.0, 10.0)


def test_refine_around_fills_the_neighbour_intervals_and_extends_an_edge():
    rates = [1e-3, 1e-2, 1e-1, 1.0]
    np.testing.assert_allclose(
        rate_rules.refine_around(rates, 1e-2, 2), [10**-2.667, 10**-2.333, 10**-1.667, 10**-1.333], rtol=2e-3
    )
    # Best on the top edge: the interval below, plus one grid step (10x) beyond, and one inside it.
    np.testing.assert_allclose(rate_rules.refine_around(rates, 1.0, 1), [10**-0.5, 10**0.5, 10.0], rtol=1e-12)
    assert rate_rules.on_edge(rates, 1.0) and rate_rules.on_edge(rates, 1e-3) and not rate_rules.on_edge(rates, 0.1)
    with pytest.raises(ValueError, match="`best`"):
        rate_rules.refine_around(rates, 0.5)


def test_choose_rates_takes_the_median_over_seeds_and_skips_flagged_rates():
    def report(iterations, flagged=False):
        return {"iterations_to_target": [iterations], "flagged": flagged}

    rates = [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4]
    seeds = [0, 1, 2] * 3
    # 0.1: medians 50; 0.2: one lucky seed (10) but median 60; 0.4: fastest, but a seed is flagged.
    reports = [
        report(40),
        report(50),
        report(70),
        report(10),
        report(60),
        report(90),
        report(5),
        report(5),
        report(5, flagged=True),
    ]
    (choice,) = rate_rules.choose_rates(rates, seeds, reports, 1, finals=np.ones(9))
    assert choice["rate"] == 0.1 and choice["median"] == 50 and choice["range"] == (40, 70)
    assert choice["per_seed"] == {0: 40, 1: 50, 2: 70} and choice["flagged_rates"] == [0.4]


def test_refinement_finds_the_stability_edge_two_over_l_on_the_real_engine():
    # One-feature least squares with p = 2: L(w) = (1/2) mean (x w - y)^2, curvature
    # L = mean(x^2) = (1 + 4 + 9) / 3 = 14/3; GD diverges iff eta > 2 / L = 3/7.
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[1.0], [-1.0], [2.0]])
    edge = 2 / (14 / 3)
    spec = ChainSpec(depth=1, p=2.0)

    def is_stable(rates):
        trainer = FullBatchTrainer(x, y, spec, rates, dtype="float64")
        result = trainer.run(3000, schedule=[0, 3000])
        return np.isfinite(result.losses[-1]) & (result.losses[-1] < result.losses[0])

    coarse = np.logspace(-2, 1, 7)  # step 10^0.5: the edge lies between 0.316 and 1
    stable = is_stable(coarse)
    first_unstable = int(np.argmin(stable))
    low, high = rate_rules.stability_edge(is_stable, coarse[first_unstable - 1], coarse[first_unstable])
    assert low < edge < high
    assert high / low < 1 + 1e-3  # log width 0.5 / 4^6 decades


def test_rates_equal_in_final_loss_are_ranked_by_how_soon_they_reach_the_target():
    def report(iterations, flagged=False):
        return {"iterations_to_target": [iterations], "flagged": flagged}

    # An adaptive optimizer's picture: final losses 1.000, 1.005, 1.009 over two decades (within
    # 1%), reached at 900, 300 and 100 iterations; 0.1 ends far lower but a seed is flagged; 1.0
    # is fastest but ends 50% higher, outside the band.
    rates = np.repeat([1e-4, 1e-3, 1e-2, 1e-1, 1.0], 2)
    seeds = np.tile([0, 1], 5)
    finals = np.repeat([1.000, 1.005, 1.009, 0.5, 1.5], 2)
    reports = [report(900), report(900), report(300), report(300), report(100), report(100)]
    reports += [report(50), report(50, flagged=True), report(20), report(20)]
    best, equals = rate_rules.fastest_among_equals(rates, seeds, reports, finals)
    assert best == 1e-2 and equals == [1e-4, 1e-3, 1e-2]
    # A band of 0.1% holds the lowest final loss alone: it wins, as ranking by final loss would.
    best, equals = rate_rules.fastest_among_equals(rates, seeds, reports, finals, tolerance=1e-3)
    assert best == 1e-4 and equals == [1e-4]
    # No equal rate reaches a target: the lowest median final loss.
    unreached = [{**r, "iterations_to_target": [None]} for r in reports]
    assert rate_rules.fastest_among_equals(rates, seeds, unreached, finals)[0] == 1e-4
    with pytest.raises(ValueError, match="`tolerance`"):
        rate_rules.fastest_among_equals(rates, seeds, reports, finals, tolerance=-0.1)


def test_a_fully_flagged_set_gets_a_second_round_one_grid_step_below():
    step = 10**0.25
    rates = 10.0 ** np.array([-3.0, -2.75, -2.5])
    # One rate unflagged: no second round.
    assert rate_rules.round_below(rates, [True, False, True], step) is None
    # All flagged: centred at 10^-3.25, one rate inside each interval to 10^-3.5 and 10^-3.
    np.testing.assert_allclose(
        rate_rules.round_below(rates, [True, True, True], step, points_per_side=1),
        10.0 ** np.array([-3.375, -3.25, -3.125]),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="`step`"):
        rate_rules.round_below(rates, [True] * 3, 1.0)
    with pytest.raises(ValueError, match="`flagged`"):
        rate_rules.round_below(rates, [True] * 2, step)
