"""experiments.stability on synthetic problems whose answer is known by construction.

- Least squares, L(w) = (1/n) ||A w - b||^2: gradient descent's error along the Hessian's top
  eigenvector is multiplied by |1 - rate L_max| per step, so the stability edge is exactly
  2 / L_max, L_max the largest eigenvalue of (2/n) A^T A (NumPy).
- Gradient descent on w^4 / 4 from w0 ~ N(0, 1): w <- w (1 - rate w^2). With u = rate w^2,
  u <- u (1 - u)^2, which falls to 0 from any u0 < 2 and grows without bound from any u0 > 2
  (u0 = 2 + e gives 2 + 5e + O(e^2)). So a seed blows up exactly when rate w0^2 > 2, and the
  blow-up probability is P(|w0| > sqrt(2 / rate)) = erfc(sqrt(1 / rate)): an early blow-up
  decided by the initial draw alone, as at depth 1 on the l4 loss.
"""

import json
import math
import statistics

import numpy as np
import pytest

from experiments import stability

ITERATIONS = 300


def draw(seed):
    return np.random.default_rng(seed).standard_normal()


def quartic_diverges(rate, seed):
    w = draw(seed)
    for _ in range(ITERATIONS):
        w = w - rate * w**3
        if abs(w) > 1e6:
            return True
    return False


def quartic_diverges_batched(rate, seeds):
    w = np.array([draw(s) for s in seeds])
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(ITERATIONS):
            w = np.where(np.abs(w) > 1e6, np.inf, w - rate * w**3)
    return ~(np.abs(w) <= 1e6)


def quartic_blowup_probability(rate):
    return math.erfc(math.sqrt(1.0 / rate))


def test_least_squares_edge_is_two_over_the_largest_eigenvalue():
    rng = np.random.default_rng(0)
    n, d = 40, 6
    a = rng.normal(size=(n, d)) * np.linspace(0.5, 3.0, d)
    b = rng.normal(size=n)
    edge = 2.0 / np.linalg.eigvalsh(2.0 / n * a.T @ a)[-1]
    optimum = np.linalg.lstsq(a, b, rcond=None)[0]

    def is_stable(rate):
        # Stable if the error shrank over 1000 steps. Just above the edge the top mode grows
        # by 1 + 2 delta per step at rate = edge (1 + delta), so only rates within about
        # 0.1% above the edge can still look stable: far inside the 2% asked for.
        w = np.zeros(d)
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(1000):
                w = w - rate * (2.0 / n) * a.T @ (a @ w - b)
            return bool(np.linalg.norm(w - optimum) <= np.linalg.norm(optimum))

    found = stability.stability_edge(is_stable, edge / 30, edge * 7)
    assert found.unstable / found.stable <= 1.02
    assert abs(found.stable / edge - 1) <= 0.02 and abs(found.unstable / edge - 1) <= 0.02


def test_blowup_probability_known_by_construction():
    # Three rates, the truth inside each 99% interval: a 1% chance per rate at these seeds.
    for rate in (0.8, 1.2, 2.0):
        estimate = stability.blowup_probability(quartic_diverges, rate, seeds=400, confidence=0.99)
        low, high = estimate.interval
        assert low <= quartic_blowup_probability(rate) <= high
        # The seeds reported are exactly the draws above the critical value.
        assert list(estimate.blown_up) == [s for s in range(400) if rate * draw(s) ** 2 > 2]


def test_wilson_interval_endpoints_solve_the_score_equation():
    # The interval is the set of p with (k/n - p)^2 <= z^2 p (1 - p) / n: its endpoints are the
    # roots of that quadratic (an endpoint 0 where k = 0).
    z = statistics.NormalDist().inv_cdf(0.975)
    for count, trials in ((0, 200), (3, 200), (10, 200), (100, 200), (200, 200)):
        fraction = count / trials
        for p in stability.wilson_interval(count, trials, 0.95):
            if p in (0.0, 1.0) and fraction == p:
                continue
            np.testing.assert_allclose((fraction - p) ** 2, z * z * p * (1 - p) / trials, rtol=1e-9, atol=1e-15)
    low, high = stability.wilson_interval(100, 200)
    np.testing.assert_allclose(low + high, 1.0)  # symmetric about 1/2


def test_the_edge_of_the_screen_is_the_order_statistic_of_the_draws():
    # With the same 200 seeds at every rate, the estimate is below 0.05 exactly while fewer than
    # 10 draws have rate w0^2 > 2, i.e. up to 2 / w_(10)^2, w_(10) the 10th largest |w0|.
    seeds = 200
    allowed = math.ceil(stability.BLOWUP_THRESHOLD * seeds)  # blow-ups that make it unstable
    magnitudes = np.sort(np.abs([draw(s) for s in range(seeds)]))[::-1]
    expected = 2.0 / magnitudes[allowed - 1] ** 2
    criterion = stability.StabilityCriterion(quartic_diverges_batched, seeds=seeds, batched=True)
    found = stability.stability_edge(criterion, 0.05, 20.0)
    assert found.stable <= expected <= found.unstable
    assert found.unstable / found.stable <= 1.02
    assert all(v.early.seeds == tuple(range(seeds)) for v in criterion.verdicts)  # common seeds
    json.dumps([v.as_dict() for v in criterion.verdicts])


def test_late_divergence_makes_a_rate_unstable_and_runs_only_on_survivors():
    late_edge, calls = 0.3, []

    def diverges_late(rate, seed):
        calls.append((rate, seed))
        return rate > late_edge

    criterion = stability.StabilityCriterion(quartic_diverges, diverges_late, seeds=200, late_seeds=5)
    verdict = criterion.verdict(0.35)  # below the early edge (about 0.52), above the late one
    assert verdict.early.probability < stability.BLOWUP_THRESHOLD
    assert not verdict.stable and verdict.late_diverged == verdict.late_seeds
    survivors = [s for s in range(200) if s not in verdict.early.blown_up][:5]
    assert list(verdict.late_seeds) == survivors == [seed for _, seed in calls]
    # Early blow-ups above the threshold: unstable without any full run.
    calls.clear()
    assert not criterion(1.5) and calls == []
    assert criterion(0.25)
    found = stability.stability_edge(criterion, 0.1, 1.0)
    assert found.stable <= late_edge <= found.unstable <= 1.02 * found.stable


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"low": 0.0}, "low"),
        ({"low": 2.0, "high": 1.0}, "low"),
        ({"rel_tol": 0}, "rel_tol"),
        ({"low": 3.0, "high": 5.0}, "low"),  # not stable
        ({"low": 0.1, "high": 0.5}, "high"),  # stable
    ],
)
def test_stability_edge_bad_arguments(arguments, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        stability.stability_edge(**{"is_stable": lambda rate: rate < 1.0, "low": 0.1, "high": 10.0, **arguments})


def test_screen_bad_arguments():
    with pytest.raises(ValueError, match="`rate`"):
        stability.blowup_probability(quartic_diverges, -1.0)
    with pytest.raises(ValueError, match="`seeds`"):
        stability.blowup_screen(quartic_diverges, [0.5], seeds=[1, 1])
    with pytest.raises(ValueError, match="`threshold`"):
        stability.StabilityCriterion(quartic_diverges, threshold=0.0)
    with pytest.raises(ValueError, match="`late_seeds`"):
        stability.StabilityCriterion(quartic_diverges, late_seeds=0)
