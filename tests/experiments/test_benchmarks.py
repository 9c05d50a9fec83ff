"""The benchmarks: a quick run writes every section with sane numbers whose ratios are the
quotients of the raw timings; the FLOP counts, the floor's products and the timing helper's
bookkeeping by hand or against NumPy; the command line's start (help without TensorFlow, a
skipped data section, no TensorFlow log lines). No assertion depends on how fast the machine is."""

import gc
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from _isolation import isolated_env
from _reference import reference_direction  # tests/ is on sys.path (rootdir-relative import)

from benchmarks import floor, run
from benchmarks.fullbatch import step_flops
from benchmarks.models import benchmark_kernel
from benchmarks.timing import Case, StepClock, clock, measure
from benchmarks.update_rule import takes_newton_schulz
from tf_overparam.preconditioning import newton_schulz_square_roots

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = {"keras_fit", "keras_fit_spe", "engine", "engine_depth2", "engine_end_to_end", "data_matmuls"}


# A difference of two timings (the Gram + eigh step minus the SGD step): of a 1 x 1 eigh it is
# within the timing noise, so its sign is not the code's to keep; `_check_update_rule` checks it.
DIFFERENCES = ("gram_eigh_in_matmuls",)


def _numbers(tree):
    """Every int/float leaf of a JSON tree (booleans are not numbers here), but `DIFFERENCES`."""
    if isinstance(tree, dict):
        return [n for key, value in tree.items() if key not in DIFFERENCES for n in _numbers(value)]
    if isinstance(tree, list):
        return [n for value in tree for n in _numbers(value)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _check_timing(timing):
    assert len(timing["seconds"]) == run.Config.quick().repeats
    assert timing["seconds_per_step"] == pytest.approx(statistics.median(timing["seconds"]) / timing["steps"])


def _check_fullbatch(fullbatch):
    peak = fullbatch["peak_matmul"]
    _check_timing(peak)
    assert peak["flops_per_s"] == pytest.approx(2 * peak["size"] ** 3 / peak["seconds_per_step"])
    for name, points in (("single", 1), ("grid", run.Config.quick().grid_points)):
        grid = fullbatch[name]
        methods = grid["methods"]
        assert set(methods) == METHODS and grid["grid"] == len(grid["learning_rates"]) == points
        seconds = {method: timing["seconds_per_step"] for method, timing in methods.items()}
        for timing in methods.values():
            _check_timing(timing)
        matmul_flops = 4 * 1316 * 128 * points  # X K and R^T X
        total_flops = matmul_flops + 6 * 1316 * points + 2 * 128 * points
        rate = matmul_flops / seconds["data_matmuls"]
        assert grid["matmul_flops_per_s"] == pytest.approx(rate)
        assert grid["bound_seconds_per_step"] == pytest.approx(total_flops / rate)
        assert grid["peak_bound_seconds_per_step"] == pytest.approx(total_flops / peak["flops_per_s"])
        assert set(grid["ratios"]) == METHODS - {"data_matmuls"}
        for method, ratios in grid["ratios"].items():
            assert ratios["vs_keras_fit"] == pytest.approx(seconds["keras_fit"] / seconds[method])
            assert ratios["vs_keras_fit_spe"] == pytest.approx(seconds["keras_fit_spe"] / seconds[method])
            assert ratios["of_bound"] == pytest.approx(grid["bound_seconds_per_step"] / seconds[method])
            assert ratios["of_peak_bound"] == pytest.approx(grid["peak_bound_seconds_per_step"] / seconds[method])


def _check_layer(layer):
    models = layer["models"]
    assert set(models) == {
        "plain",
        "overparameterized",
        "collapsed",
        "plain, EndToEnd optimizer",
        "plain, no L2",
        "overparameterized, no L2",
    }
    parameters = {name: model["parameters"] for name, model in models.items()}
    assert parameters["collapsed"] == parameters["plain"] < parameters["overparameterized"]
    assert parameters["plain, EndToEnd optimizer"] == parameters["plain, no L2"] == parameters["plain"]
    assert parameters["overparameterized, no L2"] == parameters["overparameterized"]
    baselines = {"plain, no L2": "plain, no L2", "overparameterized, no L2": "plain, no L2"}
    for name, model in models.items():
        baseline = models[baselines.get(name, "plain")]
        for kind in ("train", "predict"):
            _check_timing(model[kind])
            expected = model[kind]["seconds_per_step"] / baseline[kind]["seconds_per_step"]
            assert layer["ratios"][name][f"{kind}_time_vs_plain"] == pytest.approx(expected)
    end_to_end = models["plain, EndToEnd optimizer"]["train"]["seconds_per_step"]
    assert layer["ratios"]["plain, EndToEnd optimizer"]["train_time_vs_overparameterized"] == pytest.approx(
        end_to_end / models["overparameterized"]["train"]["seconds_per_step"]
    )


def _check_update_rule(update_rule):
    kernels = update_rule["kernels"]
    quick = run.Config.quick()
    assert set(kernels) == (
        {f"{a}x{b}" for a, b in quick.kernels} | {f"{a}x{b}, cond(W) {c:g}" for a, b, c in quick.conditioned_kernels}
    )
    k = update_rule["refresh_every"]
    for rules in kernels.values():
        for rule in ("sgd", "matmuls", "exact", "between_refreshes", "refresh", "gram_eigh"):
            _check_timing(rules[rule])
        seconds = {
            rule: rules[rule]["seconds_per_step"]
            for rule in ("sgd", "matmuls", "exact", "between_refreshes", "refresh", "gram_eigh")
        }
        matmul = seconds["matmuls"] / 2  # the matmuls step is W (W^T G): two matmuls
        assert rules["exact_vs_sgd"] == pytest.approx(seconds["exact"] / seconds["sgd"])
        assert rules["exact_in_matmuls"] == pytest.approx(seconds["exact"] / matmul)
        assert rules["between_refreshes_in_matmuls"] == pytest.approx(seconds["between_refreshes"] / matmul)
        assert rules["refresh_in_matmuls"] == pytest.approx(seconds["refresh"] / matmul)
        # The Gram + eigh part: its step minus the plain step, in matmuls.
        assert rules["gram_eigh_in_matmuls"] == pytest.approx((seconds["gram_eigh"] - seconds["sgd"]) / matmul)
        # k - 1 steps between refreshes and one refresh step, per k steps.
        assert rules["amortised_in_matmuls"] == pytest.approx(
            ((k - 1) * seconds["between_refreshes"] + seconds["refresh"]) / k / matmul
        )
        # The floor case, for kernels with both sides above 1 only (a single output takes eq. 27).
        assert ("floor" in rules) == (min(rules["shape"]) > 1)
        if "floor" in rules:
            _check_timing(rules["floor"])
            assert rules["floor_in_matmuls"] == pytest.approx(rules["floor"]["seconds_per_step"] / matmul)


def test_quick_run_writes_every_section(gas_sensor_dir, tmp_path, capsys):
    sections = ["fullbatch", "layer", "update_rule"]  # side_by_side: its own test below
    path = run.main(["--quick", "--out", str(tmp_path), "--data-dir", str(gas_sensor_dir), "--sections", *sections])
    assert path == tmp_path / "results.json"
    results = json.loads(path.read_text())
    for section in ("fullbatch", "layer", "update_rule"):
        numbers = _numbers(results[section])
        assert numbers and all(math.isfinite(n) and n > 0 for n in numbers), section
    assert len(results["loadavg_start"]) == len(results["loadavg_end"]) == 3
    _check_fullbatch(results["fullbatch"])
    _check_layer(results["layer"])
    _check_update_rule(results["update_rule"])
    assert "| engine, GD depth 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (9, 9)])
def test_floor_direction_is_eq24_at_depth_2(shape):
    # The floor case must time the real direction: against the NumPy reference (eq. 24 from
    # matrix powers of W W^T and W^T W), on a full-rank float64 kernel, tall, wide and square.
    rng = np.random.default_rng(sum(shape))
    w, g = rng.normal(size=shape), rng.normal(size=shape)
    direction = floor.floor_direction(tf.constant(w), tf.constant(g)).numpy()
    np.testing.assert_allclose(direction, reference_direction(w, g, 2), rtol=1e-9, atol=1e-10)


def test_kernels_of_the_update_rule_section_take_the_paths_they_are_named_for(monkeypatch):
    # The Gaussian 3136 x 512 kernel (cond(W) about 2.4) takes Newton-Schulz where "auto" tries
    # it (on an accelerator: the device answer patched) and the eigh on a CPU; the conditioned
    # one (cond(W) 1e3, singular values 1e3 apart) is built as named and declines it.
    from tf_overparam import preconditioning

    rng = np.random.default_rng(0)
    kernel = benchmark_kernel(rng, (3136, 512), None)
    monkeypatch.setattr(preconditioning, "_on_accelerator", lambda: False)
    assert not takes_newton_schulz(tf.constant(kernel))
    monkeypatch.setattr(preconditioning, "_on_accelerator", lambda: True)
    assert takes_newton_schulz(tf.constant(kernel))
    conditioned = benchmark_kernel(rng, (300, 128), 1e3)
    s = np.linalg.svd(conditioned, compute_uv=False)
    assert s.max() / s.min() == pytest.approx(1e3, rel=1e-9)
    assert s.max() == pytest.approx(0.1 * (np.sqrt(300) + np.sqrt(128)), rel=1e-9)
    # (300 x 128 is below the Newton-Schulz column threshold: ask the iteration itself.)
    assert not bool(newton_schulz_square_roots(tf.constant(conditioned.T @ conditioned)).converged)


def test_step_flops_by_hand():
    # The gas sensor grid of 9: X K and R^T X, 2 * 1316 * 128 * 9 each; 6 element-wise FLOPs per
    # residual entry (1316 * 9) and 2 per kernel entry (128 * 9).
    assert step_flops(1316, 128, 9) == {"matmul": 6_064_128, "elementwise": 73_368, "total": 6_137_496}


def test_measure_warms_up_on_one_unit_then_times_equal_calls_in_rotating_rounds():
    calls = []

    def case(name):
        return Case(lambda units: calls.append((name, units)), steps_per_unit=3)

    timings = measure({"a": case("a"), "b": case("b")}, target_s=1e-9, repeats=2)
    assert calls[:2] == [("a", 1), ("b", 1)]  # the first calls, one unit each
    assert calls[-4:] == [("a", 1), ("b", 1), ("b", 1), ("a", 1)]  # round 2 starts with b
    for timing in timings.values():
        assert timing["steps"] == 3 and len(timing["seconds"]) == 2
        assert timing["seconds_per_step"] == pytest.approx(statistics.median(timing["seconds"]) / 3)


def test_a_timed_call_runs_with_the_collector_off_and_restores_it():
    seen = []
    assert gc.isenabled()
    clock(lambda: seen.append(gc.isenabled()))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a collector the caller turned off stays off
        clock(lambda: seen.append(gc.isenabled()))
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- the floor


def test_floor_amortised_apply_of_a_kept_preconditioner_is_eq24_at_the_kept_kernel():
    # Between refreshes the step applies P(W_0) to a new gradient: eq. 24 of W_0 and that gradient.
    rng = np.random.default_rng(3)
    w, g = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    kept = floor.refresh_products(tf.constant(w))
    np.testing.assert_allclose(
        floor.apply_products(kept, tf.constant(g)).numpy(), reference_direction(w, g, 2), rtol=1e-9, atol=1e-10
    )


def test_floor_stacks_kernels_by_tall_shape_and_computes_each_group_in_one_batch():
    rng = np.random.default_rng(4)
    kernels = [rng.normal(size=shape) for shape in [(20, 5), (5, 20), (20, 5), (9, 9)]]
    stacks = floor.stacked_by_shape(kernels)
    assert [s.shape for s in stacks] == [(3, 20, 5), (1, 9, 9)]  # the wide one transposed, largest group first
    np.testing.assert_array_equal(stacks[0][1], kernels[1].T)
    grads = rng.normal(size=stacks[0].shape)
    batched = floor.apply_products(floor.refresh_products(tf.constant(stacks[0])), tf.constant(grads)).numpy()
    for i in range(3):
        np.testing.assert_allclose(batched[i], reference_direction(stacks[0][i], grads[i], 2), rtol=1e-9, atol=1e-10)
    # Multiply-adds by hand: an apply is 3 a b^2 per kernel; a refresh 2 a b^2 (Gram, W V) + b^3 (R).
    assert floor.floor_products(stacks) == {
        "apply_multiply_adds": 3 * 3 * 20 * 25 + 3 * 9 * 81,
        "refresh_multiply_adds_without_eigh": 3 * (2 * 20 * 25 + 125) + (2 * 9 * 81 + 729),
    }


def test_step_clock_keeps_the_steps_after_the_first_call_and_takes_percentiles():
    steps = []
    clock = StepClock(lambda: steps.append(1), steps_per_unit=2)
    clock.case.run(1)  # the first call (tracing): not kept
    clock.case.run(3)
    assert len(steps) == 8 and len(clock.seconds) == 6
    clock.seconds[:] = [5.0, 1.0, 3.0, 2.0, 4.0]
    for q in (0, 50, 95, 100):
        assert clock.percentile(q) == pytest.approx(np.percentile([1, 2, 3, 4, 5], q))


# ----------------------------------------------------------------------------- side by side


def test_quick_side_by_side_gives_every_ratio_next_to_its_floor(tmp_path, capsys):
    path = run.main(["--quick", "--out", str(tmp_path), "--sections", "side_by_side"])
    section = json.loads(path.read_text())["side_by_side"]
    quick = run.SideBySide.quick()
    assert list(section["models"]) == [name for name, _ in quick.models]
    amortised = [f"EndToEnd(SGD, refresh_every={k})" for k in quick.refresh_every]
    for model in section["models"].values():
        rows = model["optimizers"]
        assert list(rows) == ["SGD", "Adam", "Muon", "EndToEnd(SGD)", *amortised]
        # The tiny CNN's kernels: conv 3x3x1x8 (9 x 8), fc1 200 x 16, fc2 16 x 10.
        assert model["selected_kernels"] == 3
        assert sorted(map(tuple, model["kernel_groups"])) == [(1, 9, 8), (1, 16, 10), (1, 200, 16)]
        sgd = rows["SGD"]["seconds_per_step"]
        floors = {kind: model["floor"][kind]["seconds_per_step"] for kind in ("exact", "apply", "refresh")}
        for optimizer, row in rows.items():
            assert row["finite"], optimizer
            assert row["vs_sgd"] == pytest.approx(row["seconds_per_step"] / sgd)
            assert row["p95_over_median"] == pytest.approx(row["p95_step_s"] / row["median_step_s"])
            for key in ("vs_sgd", "p95_over_median", "max_over_median", "median_step_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (optimizer, key)
            assert row["max_over_median"] >= row["p95_over_median"] >= 0
            assert ("floor_s" in row) == optimizer.startswith("EndToEnd")
        assert rows["EndToEnd(SGD)"]["floor_s"] == floors["exact"]
        for optimizer, k in zip(amortised, quick.refresh_every):
            row = rows[optimizer]
            assert row["refresh_every"] == k and row["steps"] % k == 0  # whole k-step windows per call
            assert row["floor_s"] == pytest.approx(floors["apply"] + floors["refresh"] / k)
            assert row["floor_vs_sgd"] == pytest.approx((sgd + row["floor_s"]) / sgd) and row["floor_vs_sgd"] > 1
            assert row["extra_over_floor"] == pytest.approx((row["seconds_per_step"] - sgd) / row["floor_s"])
        search = model["crossover"]  # the quick target (0x) is never met: the search runs to the end
        assert [t["batch"] for t in search["tried"]] == [4, 8] and search["batch"] is None
        assert all(math.isfinite(t["vs_sgd"]) and t["vs_sgd"] > 0 for t in search["tried"])
    conversion = section["conversion"]
    assert conversion["overparameterize_vs_clone_model"] == pytest.approx(
        conversion["overparameterize"]["median_s"] / conversion["clone_model"]["median_s"]
    )
    out = capsys.readouterr().out
    assert "| tiny CNN, 12x12, 4 | EndToEnd(SGD, refresh_every=2) |" in out and "Conversion of tiny CNN" in out
    assert (tmp_path / "tables.md").read_text() in out  # the printed tables, also on disk


# ----------------------------------------------------------------------------- the command line


def _command(args, tmp_path, env=None, timeout=120, module="benchmarks.run"):
    """`python -m MODULE ARGS` with no gas sensor data and no TF_CPP_MIN_LOG_LEVEL given."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    for name in ("TF_OVERPARAM_GAS_SENSOR_DIR", "TF_CPP_MIN_LOG_LEVEL"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "module, args",
    [
        ("benchmarks.run", ["--help"]),
        ("benchmarks.run", ["--backend", "jax", "--help"]),
        ("benchmarks.amortised_drift", ["--help"]),
    ],
)
def test_help_answers_without_tensorflow_or_keras(tmp_path, module, args):
    blocked = isolated_env(tmp_path / "site", blocked=("tensorflow", "keras", "jax"))
    done = _command(args, tmp_path, env={"PYTHONPATH": blocked["PYTHONPATH"]}, module=module)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module}") and done.stderr == ""


def test_without_data_the_data_section_is_skipped_in_one_line_and_nothing_is_logged(tmp_path):
    # TensorFlow is imported (the run records its machine), yet no log line of it reaches the
    # terminal when the user did not set TF_CPP_MIN_LOG_LEVEL.
    done = _command(["--quick", "--sections", "fullbatch", "--out", "out"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    skips = [line for line in done.stdout.splitlines() if line.startswith("skipped:")]
    assert len(skips) == 1 and "--data-dir" in skips[0] and "TF_OVERPARAM_GAS_SENSOR_DIR" in skips[0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["skipped"]) == {"fullbatch"} and "fullbatch" not in results


def test_a_data_dir_without_data_is_a_one_line_error(tmp_path):
    done = _command(["--quick", "--data-dir", str(tmp_path), "--out", "out"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "holds no gas sensor" in done.stderr


# ----------------------------------------------------------------------------- Newton-Schulz threshold, distributed


def _tall_kernel_shapes(model):
    """The matrix shapes (rows >= cols) of the kernels the default rule selects, counted from the
    model's layers: Conv and Dense kernels as (prod(shape[:-1]), shape[-1]), depthwise left out."""
    import collections

    import keras

    shapes = collections.Counter()
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and not isinstance(
            layer, keras.layers.DepthwiseConv2D
        ):
            shape = tuple(layer.kernel.shape)
            rows, cols = int(np.prod(shape[:-1])), shape[-1]
            shapes[max(rows, cols), min(rows, cols)] += 1
    return shapes


def test_ns_threshold_groups_are_the_selected_kernels_oriented_tall_without_depthwise():
    import keras

    from benchmarks.ns_threshold import shape_groups

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.Conv2D(4, 3),  # 27 x 4
            keras.layers.DepthwiseConv2D(3),  # one 9 x 1 map per channel: not selected
            keras.layers.Flatten(),  # 2 x 2 x 4 = 16
            keras.layers.Dense(40),  # 16 x 40, wide: read as 40 x 16
            keras.layers.Dense(16),  # 40 x 16
        ]
    )
    groups = shape_groups(model)
    assert {s.shape[1:]: s.shape[0] for s in groups} == dict(_tall_kernel_shapes(model)) == {(27, 4): 1, (40, 16): 2}
    stack = next(s for s in groups if s.shape[1:] == (40, 16))
    kernels = [layer.kernel.numpy() for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    np.testing.assert_array_equal(stack[0], kernels[0].T)  # the wide kernel transposed
    np.testing.assert_array_equal(stack[1], kernels[1])


def test_ns_threshold_is_the_smallest_width_from_which_newton_schulz_always_won():
    from benchmarks.ns_threshold import thresholds

    def groups(*faster_by_cols):
        return [{"cols": c, "newton_schulz_faster": f} for c, f in faster_by_cols]

    assert thresholds(groups((8, False), (16, True), (64, False), (128, True), (512, True))) == (16, 128)
    assert thresholds(groups((8, True), (300, False))) == (8, None)
    assert thresholds(groups((8, False), (300, False))) == (None, None)
    assert thresholds(groups((300, True), (8, True))) == (8, 8)


def test_quick_ns_threshold_and_distributed_sections(tmp_path, capsys):
    import keras

    from benchmarks.distributed import optimizer_names
    from benchmarks.models import tiny_cnn
    from tf_overparam.preconditioning import NEWTON_SCHULZ_MIN_COLUMNS

    path = run.main(["--quick", "--out", str(tmp_path), "--sections", "ns_threshold", "distributed"])
    results = json.loads(path.read_text())
    out = capsys.readouterr().out

    section = results["ns_threshold"]
    quick = run.NsThreshold.quick()
    # "auto" tries Newton-Schulz only where Keras computes on an accelerator (the documented rule).
    on_accelerator = any(not d.startswith("cpu") for d in keras.distribution.list_devices())
    assert section["auto_tries_newton_schulz_here"] is on_accelerator
    assert list(section["models"]) == list(quick.models) == ["tiny CNN"]
    model = section["models"]["tiny CNN"]
    keras.utils.set_random_seed(0)
    counted = _tall_kernel_shapes(tiny_cnn())  # conv 9 x 8, fc1 200 x 16, fc2 16 x 10
    assert {(g["rows"], g["cols"]): g["group_size"] for g in model["groups"]} == dict(counted)
    assert model["selected_kernels"] == sum(counted.values()) == 3 and model["closed_form_kernels"] == 0
    for g in model["groups"]:
        seconds = {}
        for method in ("eigh", "newton_schulz"):
            timing = g["timings"][method]
            assert len(timing["seconds"]) == quick.repeats
            assert timing["seconds_per_step"] == pytest.approx(statistics.median(timing["seconds"]) / timing["steps"])
            seconds[method] = timing["seconds_per_step"]
            assert g[f"{method}_s"] == seconds[method]
        assert g["newton_schulz_over_eigh"] == pytest.approx(seconds["newton_schulz"] / seconds["eigh"])
        assert g["newton_schulz_faster"] == (seconds["newton_schulz"] < seconds["eigh"])
        # Below the threshold "auto" takes the eigh without trying Newton-Schulz.
        assert g["cols"] < NEWTON_SCHULZ_MIN_COLUMNS and not g["auto_tries_newton_schulz"]
        assert g["auto_method"] == "eigh"
        assert f"| tiny CNN | {g['rows']} x {g['cols']} | 1 |" in out
    # Convergence as the iteration itself reports it on the Gram matrix of the model's kernel.
    keras.utils.set_random_seed(0)
    kernels = {}
    for layer in tiny_cnn().layers:
        if hasattr(layer, "kernel"):
            matrix = layer.kernel.numpy().reshape(-1, layer.kernel.shape[-1])
            kernels[max(matrix.shape), min(matrix.shape)] = matrix
    for g in model["groups"]:
        w = kernels[g["rows"], g["cols"]]
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        assert g["converged"] == bool(newton_schulz_square_roots(tf.constant(gram)).converged)
    faster = [g["cols"] for g in model["groups"] if g["newton_schulz_faster"]]
    assert section["smallest_faster_columns"] == min(faster, default=None)

    section = results["distributed"]
    quick = run.Distributed.quick()
    names = optimizer_names(quick)
    assert section["replicas"] == [1, 2] and section["num_replicas_in_sync"] == {"1": 1, "2": 2}
    assert len(section["devices"]) == 2 and section["batch"] == quick.batch
    assert list(section["steps"]) == list(names) and list(section["optimizers"]) == list(names[1:])
    for name in names:
        for replicas in ("1", "2"):
            timing = section["timings"][f"{name} / {replicas}"]
            assert len(timing["seconds"]) == quick.repeats
            assert section["steps"][name][replicas] == timing["seconds_per_step"]
            assert section["finite"][name][replicas]
            if "refresh_every" in name:
                assert timing["steps"] % quick.refresh_every == 0  # whole k-step windows per call
    steps = section["steps"]
    for name, row in section["optimizers"].items():
        for replicas in ("1", "2"):
            assert row["vs_sgd"][replicas] == pytest.approx(steps[name][replicas] / steps["SGD"][replicas])
            assert row["extra_s"][replicas] == pytest.approx(steps[name][replicas] - steps["SGD"][replicas])
        assert row["extra_ratio"] == pytest.approx(row["extra_s"]["2"] / row["extra_s"]["1"])
        assert f"| {name} | {1e3 * steps[name]['1']:.2f} |" in out
