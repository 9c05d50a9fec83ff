"""The l_p toy of Section 7 on the shared engine: GD's stability bound, its slow second
coordinate, the largest stable rates, and the CLI."""

import configparser
import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _figures import check_figure, check_png
from _isolation import isolated_env

from experiments import lp_toy
from experiments.engine.fullbatch import log_schedule


def scalar_gd(p, eta, y, iterations):
    """Delta <- Delta - (eta/2) Delta^{p-1} from Delta = -y, by hand (the averaged loss's GD)."""
    deltas, delta = [], -y
    for _ in range(iterations):
        delta = delta - (eta / 2) * delta ** (p - 1)
        deltas.append(delta)
        if abs(delta) > 1e30:  # diverged; stop before overflowing
            break
    return np.array(deltas)


def run_gd(config, rates, schedule=None):
    schedule = log_schedule(config.iterations, 40) if schedule is None else schedule
    return lp_toy.run_method("gd", config, np.array(rates), schedule)


@pytest.mark.parametrize("p, y1", [(2, 10.0), (4, 10.0), (6, 10.0), (4, 30.0)])
def test_gd_converges_just_below_the_bound_and_diverges_just_above(p, y1):
    bound = 4.0 / y1 ** (p - 2)  # (eta/2) y1^{p-2} < 2, derived in the module docstring
    assert lp_toy.stability_bound(p, y1) == pytest.approx(bound, rel=1e-15)
    config = lp_toy.Config(p=p, y1=y1, y2=1.0, target=0.1, iterations=2000)
    below, above = (1 - 1e-2) * bound, (1 + 1e-2) * bound
    outcome = run_gd(config, [below, above])

    assert outcome["diverged_at"][0] == -1
    assert 0 < outcome["iterations_to_target"][0, 0] < config.iterations  # w1 gets and stays within 10%
    expected = abs(scalar_gd(p, below, y1, config.iterations)[-1]) / y1
    np.testing.assert_allclose(outcome["final_error"][0, 0], expected, rtol=1e-9, atol=1e-12)

    assert outcome["diverged_at"][1] > 0
    # By hand: |Delta_1| grows at every step above the bound (by 1.02 per step for p = 2).
    assert np.all(np.diff(np.abs(scalar_gd(p, above, y1, 50))) > 0)
    assert outcome["diverged_at"][1] < (400 if p == 2 else 10)
    assert np.isnan(outcome["final_error"][1]).all()


def test_second_coordinate_is_slow_at_the_largest_stable_rate():
    config = lp_toy.Config(p=4, y1=10.0, y2=1.0, target=0.1, iterations=4000)
    eta = 0.99 * lp_toy.stability_bound(4, 10.0)
    outcome = run_gd(config, [eta], schedule=np.arange(config.iterations + 1))  # every iteration logged
    first, second = outcome["iterations_to_target"][0]
    by_hand = int(np.argmax(np.abs(scalar_gd(4, eta, 1.0, 10_000)) <= 0.1)) + 1
    assert second == by_hand
    assert second == pytest.approx(lp_toy.predicted_slow_iterations(4, eta, 1.0, 0.1), rel=0.01)
    assert second > 50 * first  # w1 settles in a few dozen steps, w2 needs ~2500


def test_end_to_end_rule_tracks_balanced_depth2_gd_at_a_small_rate():
    config = lp_toy.Config(p=4, y1=10.0, y2=1.0, target=0.1, iterations=5000)
    rates = np.array([3e-4])
    schedule = log_schedule(config.iterations, 40)
    depth2 = lp_toy.run_method("depth2", config, rates, schedule)
    end_to_end = lp_toy.run_method("end_to_end", config, rates, schedule)
    # The O(eta^2) per-step gap shifts the fast transient by a few steps; afterwards they agree.
    np.testing.assert_allclose(end_to_end["history"][-4:], depth2["history"][-4:], rtol=0.01)
    assert end_to_end["iterations_to_target"][0, 0] == pytest.approx(depth2["iterations_to_target"][0, 0], rel=0.02)


def test_diverging_rates_are_recorded_not_raised():
    config = lp_toy.Config(p=4, y1=10.0, y2=1.0, target=0.1, iterations=200)
    outcome = lp_toy.run_method("end_to_end", config, np.array([10.0, 1e3]), log_schedule(200, 20))
    assert (outcome["diverged_at"] > 0).all()
    assert (outcome["iterations_to_target"] == -1).all()
    assert np.isnan(outcome["history"][-1]).all()


def test_the_largest_stable_gd_rate_brackets_the_bound():
    # A grid whose rates straddle 4 / y1^2 = 0.04: the bisection must close in on the bound.
    config = lp_toy.Config(p=4, y1=10.0, y2=1.0, target=0.1, iterations=1000, edge_rounds=3)
    rates = np.array([0.01, 0.02, 0.03, 0.05, 0.07])
    schedule = log_schedule(config.iterations, 40)
    outcome = lp_toy.run_method("gd", config, rates, schedule)
    summary = lp_toy.summarize(rates, outcome)
    assert summary["largest_rate_below_first_divergence"] == 0.03 and summary["first_divergent_rate"] == 0.05
    edge = lp_toy.largest_stable("gd", config, rates, outcome, summary, schedule)
    low, high = edge["bracket"]
    assert low < 0.04 < high and high / low < (0.05 / 0.03) ** (1 / 4**3) * (1 + 1e-9)
    assert edge["at_edge"]["eta"] == low and edge["at_edge"]["diverged_at"] is None


REPO = pathlib.Path(__file__).resolve().parents[2]


def test_cli_quick_writes_consistent_results_quietly(tmp_path):
    """A user's run: a subprocess without TF_CPP_MIN_LOG_LEVEL, whose standard error stays empty."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.lp_toy", "--quick", "--out", str(out)]
    env = isolated_env(tmp_path / "site")
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr[-3000:]
    assert "Headline" in completed.stdout
    check_png(out / "lp_toy.png")
    config = json.loads((out / "config.json").read_text())
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert config["provenance"]["package_version"] == setup["metadata"]["version"]
    assert len(config["provenance"]["git_commit"]) == 40
    saved = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert saved["bound"] == pytest.approx(4.0 / config["y1"] ** (config["p"] - 2))
    assert saved["stability"]["below"]["diverged_at"] is None
    assert saved["stability"]["above"]["diverged_at"] is not None
    low, high = saved["methods"]["gd"]["stability_edge"]
    assert low < saved["bound"] < high
    for method in lp_toy.METHODS:
        summary = saved["methods"][method]
        best = summary["best"]
        assert best["iterations"] == max(best["iterations_per_coordinate"])
        assert summary["iterations_to_target"][best["index"]] == best["iterations"]
        assert best["iterations"] == min(n for n in summary["iterations_to_target"] if n is not None)
        assert summary["diverged_at"][best["index"]] is None
        curve = np.array(saved["curves"][method])
        assert curve.shape == (2, len(saved["curves"]["iterations"]))
        assert curve[:, -1].max() <= config["target"]
        # The headline rate is stable, at least the grid's largest rate below the first divergence.
        row = saved["headline"][method]
        assert summary["largest_rate_below_first_divergence"] <= row["eta"] < summary["first_divergent_rate"]
        assert row["eta"] == summary["stability_edge"][0]
        edge_curve = np.array(saved["curves"][f"{method}_largest_stable"])
        assert np.isfinite(edge_curve).all()  # stable: never NaN-ed by a divergence
        gd = saved["headline"]["gd"]["iterations"]
        assert row["speedup_vs_gd"] == pytest.approx(gd / row["iterations"])
    fields = {field.name for field in dataclasses.fields(lp_toy.Config)}
    figure = lp_toy.figure_of(saved, lp_toy.Config(**{k: v for k, v in config.items() if k in fields}), quick=True)
    left, right = check_figure(figure, title_contains=("quick run", r"$\ell_{4}$"))
    assert "diverged" in [text.get_text() for text in right.texts]
    # Every diverged rate of the grid is drawn, in the band above the longest run.
    diverged = sum(n is not None for m in lp_toy.METHODS for n in saved["methods"][m]["diverged_at"])
    in_band = [line for line in right.lines if line.get_marker() == "x" and len(line.get_xdata())]
    assert sum(len(line.get_xdata()) for line in in_band) == diverged > 0
    assert all(y > config["iterations"] for line in in_band for y in line.get_ydata())


def test_help_answers_without_tensorflow_keras_or_matplotlib(tmp_path):
    env = isolated_env(tmp_path, blocked=("tensorflow", "keras", "matplotlib"))
    command = [sys.executable, "-m", "experiments.lp_toy", "--help"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    assert "--debug" in completed.stdout and "--quick" in completed.stdout


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"p": 3}, "p"),
        ({"p": 0}, "p"),
        ({"p": 4.0}, "p"),
        ({"y1": 1.0, "y2": 2.0}, "y1"),
        ({"y1": 1.0, "y2": 1.0}, "y1"),
        ({"y2": 0.0}, "y2"),
        ({"rates": (0.01, 0.0)}, "rates"),
        ({"rates": (-1e-3,)}, "rates"),
        ({"target": 0.0}, "target"),
        ({"iterations": 0}, "iterations"),
    ],
)
def test_bad_config_raises_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        lp_toy.Config(**kwargs)


@pytest.mark.parametrize(
    "argv, name",
    [(["--p", "5"], "p"), (["--y1", "1", "--y2", "3"], "y1"), (["--rates", "0.01", "-0.1"], "rates")],
)
def test_bad_cli_arguments_exit_through_the_parser(argv, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lp_toy.main([*argv, "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert f"`{name}`" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
