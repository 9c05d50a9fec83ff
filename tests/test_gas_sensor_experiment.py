"""`python -m experiments.gas_sensor`: the summary arithmetic and a --quick run on real data."""

import json

import numpy as np
import pytest

from experiments import gas_sensor
from tf_overparam.fullbatch import GridResult


def _grid(losses, rates):
    losses = np.asarray(losses, dtype=float)
    return GridResult(
        learning_rates=np.asarray(rates, dtype=float), seeds=np.zeros(len(rates), dtype=int),
        iterations=np.arange(len(losses)) * 10, losses=losses, diverged_at=-np.ones(len(rates), dtype=int),
        kernels=None,
    )


def test_iterations_to_reach_is_the_first_logged_crossing():
    iterations = np.array([0, 10, 20, 30])
    assert gas_sensor.iterations_to_reach(iterations, np.array([5.0, 3.0, 1.0, 0.5]), 1.0) == 20
    assert gas_sensor.iterations_to_reach(iterations, np.array([5.0, np.nan, np.nan, np.nan]), 1.0) is None


def test_best_rate_is_fastest_to_the_hardest_reached_target_and_skips_diverged():
    # Three rates; the last diverges. Rate 0.1 reaches 1.0 first (iteration 20), rate 0.01
    # ends lower but only reaches 1.0 at 30: the fastest to the hardest reachable target wins.
    losses = [[4.0, 4.0, 4.0], [3.0, 2.0, np.nan], [2.0, 0.9, np.nan], [0.8, 0.85, np.nan]]
    summary = gas_sensor.summarize(_grid(losses, [0.01, 0.1, 1.0]), targets=[2.0, 1.0])
    assert summary["best_learning_rate"] == 0.1
    assert summary["final_loss"] == 0.85
    assert summary["iterations_to_target"] == {"2": 10, "1": 20}


def test_all_diverged_is_recorded_not_raised():
    summary = gas_sensor.summarize(_grid([[1.0, 1.0], [np.nan, np.nan]], [0.1, 1.0]), targets=[0.5])
    assert summary["diverged"] and summary["best_learning_rate"] is None


def test_quick_run_writes_consistent_results(gas_sensor_dir, tmp_path):
    run_dir = gas_sensor.main(["--quick", "--data-dir", str(gas_sensor_dir), "--out", str(tmp_path)])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rows"] == 1316 and "missing batch7, batch10" in results["data"]
    configurations = results["configurations"]
    assert {"l4/gd-d1", "l4/gd-d2-w1", "l4/e2e-d2", "l4/adam-d2-w1", "l4/gd-d2-w1-identity", "l2/gd-d1"} <= set(
        configurations
    )
    for name, summary in configurations.items():
        finals = summary["grid"]["final_losses"]
        if summary["best_learning_rate"] is None:
            assert all(v is None for v in finals)
            continue
        assert summary["best_learning_rate"] in summary["grid"]["learning_rates"]
        assert summary["final_loss"] in finals  # the best rate's final loss is one of the grid's
        curve = results["best_curves"][name]
        assert curve["loss"][-1] == pytest.approx(summary["final_loss"])
        assert curve["iterations"][-1] == results["iterations"] == 2000
    # Depth 1 against itself: ratio 1 wherever it reaches a target; the hardest target is its own best.
    baseline = configurations["l4/gd-d1"]
    assert all(r == 1.0 for r in baseline["acceleration_vs_depth1"].values() if r is not None)
    assert results["targets"]["l4"][-1] == pytest.approx(min(v for v in baseline["grid"]["final_losses"] if v))
    for figure in ("depth", "lr_grid", "optimizers", "init"):
        assert (run_dir / f"{figure}.png").stat().st_size > 10_000
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) >= len(configurations)


def test_bad_cli_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        gas_sensor.main(["--iterations", "0"])
    assert "--iterations must be a positive int" in capsys.readouterr().err
