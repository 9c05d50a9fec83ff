"""The headline's sensitivity to depth 1's rate (`experiments.gas_sensor.sensitivity`), on
hand-made grids whose crossings are worked out by hand in the comments."""

import math

import numpy as np
import pytest
from _figures import check_figure, check_png

from experiments.common.cli import lazy_pyplot
from experiments.engine.fullbatch import GridResult
from experiments.gas_sensor import sensitivity

plt = lazy_pyplot()
nan = math.nan
ITERATIONS = np.array([0, 10, 20, 30, 40, 50])


def _grid(columns):
    """A GridResult from {(rate, seed): curve logged at ITERATIONS}."""
    keys = list(columns)
    return GridResult(
        learning_rates=np.array([r for r, _ in keys]),
        seeds=np.array([s for _, s in keys]),
        iterations=ITERATIONS,
        losses=np.array([columns[k] for k in keys], dtype=float).T,
        diverged_at=-np.ones(len(keys), dtype=int),
        kernels=None,
    )


# Depth 1. At 0.001 the final losses are 2, 1.5, 3: median 2 (seed 0). Sustained crossings of
# 2: seed 0 at 50, seed 1 at 30, seed 2 never: median 50. Median curve: 10, 8, 6, 4, 3, 2.
# At 0.002 seed 3 blew up at once and is excluded; the used seeds end at 1.0, 0.8, 1.2: median
# 1.0 (with seed 3 in as infinite it would be 1.1). Crossings of 1.0: 50, 30, never: median 50.
# Median curve: 10, 5, 3, 2, 1.5, 1.0. At 0.004 every seed diverges.
DEPTH1 = {
    (0.001, 0): [10, 8, 6, 4, 3, 2],
    (0.001, 1): [10, 6, 4, 2, 1.8, 1.5],
    (0.001, 2): [10, 9, 7, 5, 4, 3],
    (0.002, 0): [10, 5, 3, 2, 1.5, 1.0],
    (0.002, 1): [10, 4, 2, 1, 0.9, 0.8],
    (0.002, 2): [10, 6, 4, 3, 2, 1.2],
    (0.002, 3): [10, nan, nan, nan, nan, nan],
    (0.004, 0): [10, 20, nan, nan, nan, nan],
    (0.004, 1): [10, 30, nan, nan, nan, nan],
    (0.004, 2): [10, nan, nan, nan, nan, nan],
}
# Depth 2 at its best rate 0.01: finals 0.5, 0.4, 0.6 (median 0.5); median curve 10, 7, 6.5,
# 1.9, 1.0, 0.5. Seed 1 dips to 1.5 at 20 and rises to 2.5 at 30: it reaches 2 only from 40.
# Crossings of 2: 30, 40, 30 (median 30); of 1.0: 40, 40, 30 (median 40). Rate 0.02 (not its
# best) would reach everything at 10; it must not be used.
DEPTH2 = {
    (0.01, 0): [10, 7, 6.5, 1.9, 1.0, 0.5],
    (0.01, 1): [10, 7, 1.5, 2.5, 1.0, 0.4],
    (0.01, 2): [10, 7, 8, 1.0, 0.8, 0.6],
    (0.02, 0): [10, 0.1, 0.1, 0.1, 0.1, 0.1],
    (0.02, 1): [10, 0.1, 0.1, 0.1, 0.1, 0.1],
    (0.02, 2): [10, 0.1, 0.1, 0.1, 0.1, 0.1],
}


def _table(excluded=((0.002, [3]),)):
    others = {
        "l4/gd-d2-w1": (_grid(DEPTH2), {"best_learning_rate": 0.01, "label": "GD depth 2, width 1"}),
        "l4/e2e-d2": (_grid(DEPTH2), {"best_learning_rate": None, "label": "eq. 24 depth 2"}),
    }
    return sensitivity.sensitivity_table(_grid(DEPTH1), others, excluded=dict(excluded))


def test_speedup_final_ratio_and_below_from_equal_the_hand_values():
    rows = {row["learning_rate"]: row for row in _table()["rows"]}
    assert list(rows) == [0.001, 0.002, 0.004]
    at_low = rows[0.001]
    assert at_low["final_loss"] == 2.0 and at_low["final_loss_range"] == [1.5, 3.0]
    deep = at_low["against"]["l4/gd-d2-w1"]
    assert deep["speedup"] == pytest.approx(50 / 30)
    # Per-seed ratios over the seeds both reach with: seed 0 50/30, seed 1 30/40 (seed 2 of
    # depth 1 never reaches).
    assert deep["speedup_range"] == pytest.approx([30 / 40, 50 / 30])
    assert deep["final_ratio"] == pytest.approx(2.0 / 0.5)
    # Depth 2's median is below depth 1's at 10 (7 < 8), above at 20 (6.5 > 6), below from 30.
    assert deep["below_from"] == 30
    at_mid = rows[0.002]["against"]["l4/gd-d2-w1"]
    assert at_mid["speedup"] == pytest.approx(50 / 40)
    assert at_mid["final_ratio"] == pytest.approx(1.0 / 0.5)
    assert at_mid["below_from"] == 30  # 7 > 5, 6.5 > 3, then 1.9 < 2


def test_an_excluded_seed_is_left_out_of_the_median():
    row = _table()["rows"][1]
    assert row["seeds_used"] == [0, 1, 2] and row["seeds_excluded"] == [3] and row["seeds_diverged"] == []
    assert row["final_loss"] == 1.0
    kept = _table(excluded=())["rows"][1]  # seed 3 in, infinite: median of 0.8, 1.0, 1.2, inf
    assert kept["seeds_diverged"] == [3] and kept["final_loss"] == pytest.approx(1.1)


def test_a_rate_where_depth1_diverged_and_an_uncompared_configuration_give_none():
    table = _table()
    diverged = table["rows"][2]
    assert diverged["seeds_diverged"] == [0, 1, 2] and diverged["final_loss"] is None
    assert all(v is None for entry in diverged["against"].values() for v in entry.values())
    assert all(v is None for row in table["rows"] for v in row["against"]["l4/e2e-d2"].values())
    assert table["configurations"]["l4/gd-d2-w1"] == {
        "label": "GD depth 2, width 1",
        "learning_rate": 0.01,
        "final_loss": 0.5,
    }


def test_stays_below_from_counts_nan_as_infinitely_high():
    iterations = np.array([0, 1, 2, 3])
    assert sensitivity.stays_below_from(iterations, [1, 1, 1, 1], [2, nan, 2, 2]) == 0
    assert sensitivity.stays_below_from(iterations, [1, nan, 1, 1], [2, 2, 2, 2]) == 2
    assert sensitivity.stays_below_from(iterations, [1, 1, 1, 2], [2, 2, 2, 2]) is None  # equal is not below


def test_bad_excluded_names_the_argument():
    with pytest.raises(ValueError, match="`excluded`"):
        _table(excluded=((0.003, [0]),))
    with pytest.raises(ValueError, match="`excluded`"):
        _table(excluded=((0.001, [7]),))


def test_the_figure_is_readable(tmp_path):
    table = _table()
    figure = sensitivity.sensitivity_figure(table, quick=True)
    try:
        panels = check_figure(figure, title_contains=("quick run (short horizon)",))
        assert len(panels) == 2 and all(ax.get_xscale() == "log" for ax in panels)
    finally:
        plt.close(figure)
    path = sensitivity.plot_sensitivity(tmp_path / "sensitivity.png", table)
    check_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sensitivity.png"]  # no temporary file left


def test_format_table_has_one_row_per_rate():
    table = _table()
    lines = sensitivity.format_table(table).splitlines()
    assert len(lines) == 2 + len(table["rows"])
    columns = {line.count("|") for line in lines}
    assert columns == {3 + 3 * 2 + 1}  # rate, final loss, seeds, then 3 per configuration
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["0.001", "0.002", "0.004"]
    assert "1.67x [0.75-1.67]" in lines[2] and "4.00x" in lines[2] and "3 (1 excluded)" in lines[3]


def test_sharpness_figure_marks_each_diverged_rate_once_at_its_first_divergence():
    from experiments.gas_sensor import sharpness_plots

    def summary(depth, traces, rates, diverged_at):
        return {
            "label": f"GD depth {depth}",
            "spec": {"depth": depth},
            "grid": {"learning_rates": rates, "diverged_at": diverged_at},
            "lr_x_sharpness": traces,
        }

    shallow = summary(
        1, {"0.001": {"iterations": [0, 10, 100], "median": [1.5, 0.8, 0.3], "max": [1.6, 0.9, 0.3]}}, [0.001], [None]
    )
    deep_traces = {
        "0.001": {"iterations": [0, 50, 100], "median": [0.1, 1.2, 1.6], "max": [0.1, 1.3, 1.7]},
        "0.002": {"iterations": [0, 50, 100], "median": [0.2, 1.9, None], "max": [0.2, 2.0, None]},
    }
    # Two seeds at 0.002 diverged, at 80 and 70: the mark goes at 70, at the last finite median.
    deep = summary(2, deep_traces, [0.001, 0.002, 0.001, 0.002], [None, 80, None, 70])
    assert sharpness_plots.first_divergences(deep["grid"]) == {0.002: 70}
    fig = sharpness_plots.sharpness_figure({"l4/gd-d1": shallow, "l4/gd-d2-w1": deep})
    left, right = check_figure(fig, title_contains=("Rate x sharpness",))
    marks = [line for line in right.lines if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [70] and list(marks[0].get_ydata()) == [1.9]
    assert not [line for line in left.lines if line.get_marker() == "x"]
    assert any(list(line.get_ydata()) == [2.0, 2.0] for line in right.lines)  # the bound
    assert left.get_xscale() == "symlog" and right.get_xscale() == "linear"
