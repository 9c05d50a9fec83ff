"""The sweep: a local Ray of 2 CPUs gives the same results and TensorBoard as in-process."""

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorflow import make_ndarray

from experiments.common import sweep
from experiments.engine.fullbatch import ChainSpec, log_schedule


def _tasks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ np.array([[1.0], [-0.5], [0.25]]) + 0.1 * rng.normal(size=(40, 1))
    schedule = log_schedule(300, 20)
    specs = {"d1": ChainSpec(depth=1, p=4.0), "d2": ChainSpec(depth=2, p=4.0), "e2e": ChainSpec(2, update="end_to_end")}
    return [
        sweep.GridTask(name, x, y, spec, (1e-2, 1e-1), (0, 1), schedule, diagnostics_every=3)
        for name, spec in specs.items()
    ]


def _events(root):
    """(run, tag, step) -> value for every scalar and histogram in the TensorBoard files."""
    values = {}
    for run in sorted(p for p in root.glob("*/*") if p.is_dir()):
        accumulator = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            for event in accumulator.Tensors(tag):
                values[(run.relative_to(root).as_posix(), tag, event.step)] = make_ndarray(event.tensor_proto).tolist()
    return values


def _run(executor, root):
    outcomes = {o.name: o for o in executor.map(_tasks())}
    for outcome in outcomes.values():
        sweep.write_tensorboard(root, outcome)
    return outcomes


def test_in_process_results_and_tensorboard(tmp_path):
    outcomes = _run(sweep.Executor(), tmp_path)
    assert set(outcomes) == {"d1", "d2", "e2e"}
    events = _events(tmp_path)
    # 3 configurations x 2 rates x 2 seeds runs; every finite logged loss is a scalar event.
    runs = {key[0] for key in events}
    assert len(runs) == 12
    for name, outcome in outcomes.items():
        result = outcome.result
        for g, (rate, seed) in enumerate(zip(result.learning_rates, result.seeds)):
            run = f"{name}/lr_{rate:.3g}_seed_{seed}"
            logged = {s: v for (r, tag, s), v in events.items() if r == run and tag == "loss"}
            expected = {
                int(i): result.losses[t, g] for t, i in enumerate(result.iterations) if np.isfinite(result.losses[t, g])
            }
            assert logged.keys() == expected.keys()
            np.testing.assert_allclose(
                [logged[s] for s in sorted(logged)], [expected[s] for s in sorted(expected)], rtol=1e-6
            )  # TensorBoard stores float32


def test_bad_workers_value():
    with pytest.raises(ValueError, match="`workers`"):
        sweep.Executor(workers=0)


def test_ray_run_equals_in_process_run(tmp_path):
    pytest.importorskip("ray")
    local = _run(sweep.Executor(), tmp_path / "local")
    executor = sweep.Executor(workers=2)
    try:
        assert executor.description == "ray (2 CPUs)"
        remote = _run(executor, tmp_path / "ray")
    finally:
        executor.shutdown()
    assert set(remote) == set(local)
    for name in local:
        a, b = local[name].result, remote[name].result
        for field in ("learning_rates", "seeds", "iterations", "losses", "diverged_at", "kernels"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{name}.{field}")
        assert local[name].diagnostics.keys() == remote[name].diagnostics.keys()
        for step in local[name].diagnostics:
            for u, v in zip(local[name].diagnostics[step], remote[name].diagnostics[step]):
                np.testing.assert_array_equal(u, v)
    assert _events(tmp_path / "local") == _events(tmp_path / "ray")


def test_gas_sensor_in_process_stage_writes_what_a_ray_task_driver_writes(tmp_path):
    # The in-process path (train_stage: checkpoints, TensorBoard while training) and the
    # Ray path (a task, then the driver's write_tensorboard) give the same grid and events.
    from experiments import gas_sensor
    from experiments.gas_sensor import plan, runner, training

    task = _tasks()[1]
    config = gas_sensor.Config.quick(log_points=20)
    run = gas_sensor.RunConfig("l4/gd-d2-w1", "GD depth 2", task.spec)
    stage = plan.make_stage(config, run, "final", task.learning_rates, task.seeds, 300)
    data = type("Data", (), {"x": task.x, "y": task.y})
    (tmp_path / "local").mkdir()
    local = runner.train_stage(stage, data, config, tmp_path / "local")
    task = training.stage_task(stage, data, config)
    assert task.early_seeds == tuple(range(config.screen_seeds)) and task.early_iterations == config.early_iterations
    outcome = sweep.train_grid(task)
    sweep.write_tensorboard(tmp_path / "task" / "tensorboard", outcome, folder=run.name)
    early = sweep.early_screen(task.x, task.y, task.spec, task.learning_rates, task.early_seeds, task.early_iterations)
    np.testing.assert_array_equal(early.diverged_at, outcome.early.diverged_at)
    np.testing.assert_array_equal(local.losses, outcome.result.losses)
    np.testing.assert_array_equal(local.iterations, outcome.result.iterations)
    local_events = _events(tmp_path / "local" / "tensorboard" / "l4")
    assert local_events and local_events == _events(tmp_path / "task" / "tensorboard" / "l4")


def test_gas_sensor_on_ray_gives_the_in_process_results(tmp_path):
    # The Ray path schedules stages itself (a configuration's final stage as soon as its screen
    # returns); its results.json must hold the in-process numbers.
    import json

    from _synthetic_data import write_batch_files

    from experiments import gas_sensor

    pytest.importorskip("ray")
    data = write_batch_files(tmp_path / "data")
    argv = ["--quick", "--figure", "init", "--iterations", "200", "--data-dir", str(data)]
    local = gas_sensor.main([*argv, "--out", str(tmp_path / "local")])
    remote = gas_sensor.main([*argv, "--out", str(tmp_path / "ray"), "--workers", "2"])

    def numbers(path):
        results = json.loads((path / "results.json").read_text())
        for summary in results["configurations"].values():
            summary.pop("seconds")
        return {k: v for k, v in results.items() if k not in ("seconds", "sessions")}

    assert numbers(remote) == numbers(local)
    assert sorted(p.name for p in remote.glob("*.png")) == ["init.png", "sensitivity.png", "sharpness.png"]


def test_a_driver_waiting_for_ray_tasks_answers_ctrl_c_between_polls():
    # Ray's own wait is replaced by one that never finishes a task: the driver must still return
    # to check for Ctrl-C (the CLI's handler only sets the request) instead of blocking until a
    # task ends.
    from experiments.common import cli as common_cli

    calls = []

    class NothingFinishes:
        def wait(self, handles, num_returns, timeout):
            calls.append(timeout)
            if len(calls) == 3:
                common_cli._Interrupt.requested = True  # as the SIGINT handler does
            return [], handles

    executor = sweep.Executor()
    executor.ray = NothingFinishes()
    with pytest.raises(KeyboardInterrupt):
        executor.next_finished(["a task"], poll_seconds=0.01)
    assert calls == [0.01, 0.01, 0.01] and not common_cli._Interrupt.requested
