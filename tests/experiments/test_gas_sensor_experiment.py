"""`python -m experiments.gas_sensor`: the summary arithmetic and a --quick run on real data."""

import json

import numpy as np
import pytest
from _figures import check_png

from experiments import gas_sensor
from experiments.common.cli import lazy_pyplot
from experiments.engine.fullbatch import GridResult, log_schedule
from experiments.gas_sensor import plan, plots, report

plt = lazy_pyplot()


def _grid(losses, rates):
    losses = np.asarray(losses, dtype=float)
    return GridResult(
        learning_rates=np.asarray(rates, dtype=float),
        seeds=np.zeros(len(rates), dtype=int),
        iterations=np.arange(len(losses)) * 10,
        losses=losses,
        diverged_at=-np.ones(len(rates), dtype=int),
        kernels=None,
    )


def test_a_target_counts_only_when_the_loss_stays_below_it():
    # Rate 0.1 crosses 1.0 at 10 but spikes back above at 20: it reaches 1.0 only at 30,
    # after rate 0.01 (20), which therefore is the best for that target.
    losses = [[4.0, 4.0], [2.0, 0.9], [0.95, 1.5], [0.9, 0.8]]
    summary = gas_sensor.summarize(_grid(losses, [0.01, 0.1]), targets=[1.0])
    assert summary["per_target"]["1"]["rate"] == 0.01 and summary["iterations_to_target"] == {"1": 20}


def test_best_rate_among_equal_finals_is_fastest_to_the_hardest_reached_target_and_skips_diverged():
    # Three rates; the last diverges. Rate 0.1 reaches 1.0 first (iteration 20), rate 0.01
    # ends lower by less than FINAL_LOSS_TOLERANCE but only reaches 1.0 at 30: the fastest to
    # the hardest reachable target wins.
    losses = [[4.0, 4.0, 4.0], [3.0, 2.0, np.nan], [2.0, 0.9, np.nan], [0.845, 0.85, np.nan]]
    summary = gas_sensor.summarize(_grid(losses, [0.01, 0.1, 1.0]), targets=[2.0, 1.0])
    assert summary["best_learning_rate"] == 0.1
    assert summary["final_loss"] == 0.85
    assert summary["iterations_to_target"] == {"2": 10, "1": 20}


def test_all_diverged_is_recorded_not_raised():
    summary = gas_sensor.summarize(_grid([[1.0, 1.0], [np.nan, np.nan]], [0.1, 1.0]), targets=[0.5])
    assert summary["diverged"] and summary["best_learning_rate"] is None


def test_quick_run_writes_consistent_results(quick_gas_sensor_run):
    run_dir = quick_gas_sensor_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rows"] == 1316 and "missing batch7, batch10" in results["data"]
    configurations = results["configurations"]
    assert {"l4/gd-d1", "l4/gd-d2-w1", "l4/e2e-d2", "l4/adam-d2-w1", "l4/gd-d2-w1-identity", "l2/gd-d1"} <= set(
        configurations
    )
    for name, summary in configurations.items():
        grid, screen = summary["grid"], summary["screen"]
        rates, seeds, finals = (np.array(grid[k], dtype=float) for k in ("learning_rates", "seeds", "final_losses"))
        assert set(seeds) == set(range(3 if name in gas_sensor.HEADLINE else 1))
        assert screen["iterations"] == round(2000 * gas_sensor.Config.quick().screen_fraction) and set(
            screen["seeds"]
        ) == {0}
        final_rates = summary["stages"][name]["learning_rates"]
        assert len(final_rates) in (3, 4)  # the screen's best and one rate on each side (+1 beyond an edge)
        assert set(final_rates) <= set(rates)
        for rate, failed in summary["early_failures"].items():  # left out of the grid summarised
            assert not set(failed) & set(seeds[np.isclose(rates, float(rate), rtol=1e-9)])
        if summary["best_learning_rate"] is None:
            continue
        at_best = finals[rates == summary["best_learning_rate"]]
        assert summary["final_loss"] == pytest.approx(np.median(at_best))  # the median over seeds
        assert summary["final_loss_range"] == pytest.approx([at_best.min(), at_best.max()])
        curve = results["best_curves"][name]
        assert curve["loss"][-1] == pytest.approx(summary["final_loss"])
        assert np.all(np.array(curve["loss_min"]) <= np.array(curve["loss"]))
        assert np.all(np.array(curve["loss"]) <= np.array(curve["loss_max"]))
        assert curve["iterations"][-1] == results["iterations"] == 2000
    # Depth 1 against itself: ratio 1 wherever it reaches a target; the hardest target is its
    # own best median final loss, which its median seed reaches (3 seeds).
    baseline = configurations["l4/gd-d1"]
    assert all(r["ratio"] == 1.0 for r in baseline["acceleration_vs_depth1"].values() if r["ratio"] is not None)
    # The targets come from its final (and below) stage, as they rank the other configurations.
    ranked = {
        r for name in ("l4/gd-d1", "l4/gd-d1.below") for r in baseline["stages"].get(name, {}).get("learning_rates", [])
    }
    ranked -= set(baseline["unusable_rates"])
    rates, finals = (np.array(baseline["grid"][k], dtype=float) for k in ("learning_rates", "final_losses"))
    medians = [
        np.median(finals[rates == r]) for r in ranked if np.isfinite(finals[rates == r]).all() and np.any(rates == r)
    ]
    assert results["targets"]["l4"][-1] == pytest.approx(min(medians))
    assert baseline["per_target"][f"{results['targets']['l4'][-1]:.6g}"]["rate"] is not None
    for figure in ("depth", "lr_grid", "optimizers", "init"):
        assert (run_dir / f"{figure}.png").stat().st_size > 10_000
        assert plt.imread(run_dir / f"{figure}.png").shape[1] <= 2000
    check_png(run_dir / "sharpness.png")  # rate x sharpness of the headline GD chains
    assert len(results["sessions"]) == 1 and results["seconds"] == results["sessions"][0]["seconds"] > 0
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) >= len(configurations)
    _check_protocol(run_dir, results, gas_sensor.Config.quick())


def _check_protocol(run_dir, results, config):
    """The blow-up estimates of every stage rate (against the saved early grids), the edges of
    the headline configurations, the sensitivity stage and the rerun information."""
    from experiments.gas_sensor import training

    configurations, rerun = results["configurations"], results["rerun"]
    constants = rerun["constants"]
    assert constants["blowup_threshold"] == 0.05 and constants["edge_rel_tol"] == 0.02
    assert (constants["screen_seeds"], constants["early_iterations"]) == (config.screen_seeds, config.early_iterations)
    assert constants["final_loss_tolerance"] == 0.01 and constants["divergence_bound_factor"] == 1e6
    for summary in configurations.values():
        for stage_name, stage in summary["stages"].items():
            assert rerun["stages"][stage_name]["learning_rates"] == stage["learning_rates"]
            early = training.load_early(run_dir, stage_name)
            estimates = stage["early"]["estimates"]
            assert [e["rate"] for e in estimates] == stage["learning_rates"]
            for estimate in estimates:
                points = early.learning_rates == estimate["rate"]
                assert estimate["seeds"] == np.sum(points) == config.screen_seeds
                blown = np.sum(early.diverged_at[points] >= 0)
                assert estimate["probability"] == blown / config.screen_seeds
                assert (estimate["rate"] in stage["unusable_rates"]) == (blown / config.screen_seeds >= 0.05)
    assert config.edge_configurations == ("l4/gd-d1",)  # CI scale: one edge, the sensitivity stage's
    for name in config.edge_configurations:
        summary = configurations[name]
        edge = summary["stability_edge"]
        assert edge["reason"] is not None or edge["unstable"] / edge["stable"] <= 1.02, (name, edge)
        if edge["stable"] is not None and summary["best_learning_rate"] is not None:
            assert summary["best_learning_rate"] <= edge["stable"]
        verdicts = {v["rate"]: v["stable"] for v in edge["verdicts"]}
        assert edge["reason"] is not None or (verdicts[edge["stable"]] and not verdicts[edge["unstable"]])
    edge = configurations["l4/gd-d1"]["stability_edge"]
    sensitivity = configurations["l4/gd-d1"]["stages"].get("l4/gd-d1.sensitivity")
    if edge["stable"] is not None and edge["stable"] > plan.SENSITIVITY_LOW:
        assert sensitivity["learning_rates"] == pytest.approx(
            np.geomspace(plan.SENSITIVITY_LOW, edge["stable"], config.sensitivity_points)
        )
        assert sensitivity["seeds"] == list(config.headline_seeds)
    assert rerun["init_stddev"] == config.init_stddev and rerun["initializer"]["config"]["stddev"] == config.init_stddev
    assert rerun["rows"] == 1316 and all(len(f["sha256"]) == 64 and f["rows"] > 0 for f in rerun["data_files"].values())


def test_bad_cli_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        gas_sensor.main(["--iterations", "0"])
    assert "--iterations must be a positive int" in capsys.readouterr().err


# ------------------------------------------------------------------ figures


def _synthetic_results(config, runs, diverged_rate=4e-3):
    """Hand-made final grids: every configuration at rates 1e-3, 2e-3 and `diverged_rate` with
    3 seeds; the loss falls as 1 / (1 + rate x iteration x 100), and every seed at
    `diverged_rate` diverges (NaN) halfway."""
    iterations = log_schedule(config.iterations, config.log_points)
    rates = np.repeat([1e-3, 2e-3, diverged_rate], 3)
    seeds = np.tile([0, 1, 2], 3)
    losses = 1.0 / (1.0 + 100 * rates[None, :] * iterations[:, None]) * (1 + 0.01 * seeds[None, :])
    losses[iterations > config.iterations // 2, 6:] = np.nan
    diverged = np.where(rates == diverged_rate, config.iterations // 2, -1)
    grid = GridResult(rates, seeds, iterations, losses, diverged, kernels=None)
    return {run.name: grid for run in runs}


def _figures(config):
    figures = plan.configurations(config)
    runs = plan.run_order(figures)
    results = _synthetic_results(config, runs)
    summaries = {name: {} for name in results}
    report.add_targets_and_ratios(summaries, results, report.target_groups(runs))
    return figures, results, summaries


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_figure_is_readable(quick, tmp_path):
    figure_names = ("depth", "lr-grid", "optimizers", "init", "preprocessing")
    config = plan.Config.quick(figures=figure_names) if quick else plan.Config(figures=figure_names, log_points=400)
    figures, results, summaries = _figures(config)
    built = plots.figure_plan(config, figures, results)
    assert [name for name, *_ in built] == [
        "depth.png",
        "lr_grid.png",
        "optimizers.png",
        "init.png",
        "preprocessing.png",
    ]
    for name, kind, title, title_runs in built:
        if kind == "curves":
            fig = plots.curves_figure(title, config, title_runs, results, summaries)
        else:
            fig = plots.lr_grid_figure(title, config, title_runs, results)
        width, height = fig.get_size_inches() * plots.DPI
        assert width <= 2000 and height <= 2000, name
        suptitle = fig._suptitle.get_text()
        assert ("quick run" in suptitle) == quick, suptitle
        assert len(fig.axes) == len(title_runs), name  # one panel each, no empty ones
        for ax, (panel_title, runs) in zip(fig.axes, title_runs):
            assert ax.has_data() and ax.get_title() == panel_title and ax.get_xlabel() and ax.get_ylabel()
            assert r"$\ell_" in panel_title and "l4" not in panel_title  # not readable as "14"
            legend = [text.get_text() for text in ax.get_legend().get_texts()]
            assert all("1 seeds" not in entry for entry in legend)
            if kind == "lr-grid":
                assert plots.DIVERGED_LABEL in legend  # the diverged rate is drawn and named
            else:
                sparse = len(results[runs[0].name].iterations) <= plots.SPARSE_POINTS
                assert all((line.get_marker() not in (None, "None", "")) == sparse for line in ax.get_lines())
        if name == "preprocessing.png":
            rows, columns = fig.axes[0].get_subplotspec().get_geometry()[:2]
            assert (rows, columns) == (2, 4)  # eight panels in a grid, not in one row
        fig.savefig(tmp_path / name, dpi=plots.DPI)
        pixels = plt.imread(tmp_path / name)
        assert pixels.shape[1] <= 2000 and pixels.shape[0] <= 2000
        plt.close(fig)


def test_a_panel_with_nothing_to_draw_is_left_out():
    config = plan.Config.quick(figures=("depth",))
    figures, results, summaries = _figures(config)
    for name in list(summaries):
        if name.startswith("l2/"):
            summaries[name] = {"best_learning_rate": None}  # every rate flagged
    (_, _, title, title_runs), *_ = plots.figure_plan(config, figures, results)
    fig = plots.curves_figure(title, config, title_runs, results, summaries)
    assert [ax.get_title() for ax in fig.axes] == [plots.loss_name(4) + ": loss at each one's best rate"]
    plt.close(fig)
