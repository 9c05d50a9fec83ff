"""Issue 13: no run overwrites another, resumable runs, Ctrl-C, one-line errors, no silent
substitution of data, a quiet and fast CLI. Every test builds its own data (synthetic batch
files in the UCI format), so all of them run without the shared data."""

import gc
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from _isolation import isolated_env
from _synthetic_data import batch_line, write_batch_files

from experiments import gas_sensor
from experiments.common import cli as common_cli
from experiments.common import runstate
from experiments.engine.fullbatch import log_schedule

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV_VAR = "TF_OVERPARAM_GAS_SENSOR_DIR"
# A short run: 3 configurations (figure "init": GD depth 1, depth 2 near-zero and identity),
# 4 rates, 40 log points.
SHORT = ["--quick", "--figure", "init", "--iterations", "300"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_batch_files(tmp_path_factory.mktemp("gas") / "data")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(capsys, main, argv):
    """Runs `main(argv)`, which must exit; returns (exit status, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def run_module(module, *args, env=None, **kwargs):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=environment,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def numbers(results):
    """results.json without wall times (the only part allowed to differ between runs)."""
    if isinstance(results, dict):
        return {k: numbers(v) for k, v in results.items() if k not in ("seconds", "sessions")}
    if isinstance(results, list):
        return [numbers(v) for v in results]
    return results


# ------------------------------------------------------------------ --out and --resume


def test_out_at_a_run_folder_refuses_and_leaves_it_untouched(capsys, data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"kept": true}\n')
    (run / "depth.png").write_bytes(b"old figure")
    before = snapshot(run)
    status, lines = cli_error(capsys, gas_sensor.main, [*SHORT, "--data-dir", str(data_dir), "--out", str(run)])
    assert status == 2 and len(lines) == 1
    assert f"--out {run} already holds a run" in lines[0] and f"--resume {run}" in lines[0]
    assert "Traceback" not in lines[0]
    assert snapshot(run) == before


def test_interrupted_run_resumes_to_the_uninterrupted_results(data_dir, tmp_path):
    # Ctrl-C once the first checkpoint exists (polled), then --resume: results.json must hold
    # the numbers of a run that was never interrupted.
    interrupted = tmp_path / "interrupted"
    argv = ["--quick", "--figure", "init", "--iterations", "3000", "--data-dir", str(data_dir)]
    # SIGINT restored to its default in the child: a shell's background job (`cmd &`) ignores
    # it, children inherit that, and Python then installs no KeyboardInterrupt handler (so a
    # CI check launched in the background saw exit 0 here instead of 130).
    process = run_module(
        "experiments.gas_sensor",
        *argv,
        "--out",
        str(interrupted),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not half_done(interrupted):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (stdout[-2000:], stderr)
    # One line on stderr (TensorFlow's C++ noise is off: TF_CPP_MIN_LOG_LEVEL was cleared).
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("interrupted: kept ") and f"in {interrupted}" in stderr
    resume = f"continue with: python -m experiments.gas_sensor --resume {interrupted} {' '.join(argv)}"
    assert resume in stderr
    name, _, iterations, _ = runstate.load_checkpoint(interrupted)
    assert 0 < iterations[-1] < 3000  # a half-done configuration was kept
    assert "kept 1 of 3 configurations" in stderr or "kept 2 of 3 configurations" in stderr

    resumed = gas_sensor.main(["--resume", str(interrupted), *argv])
    reference = gas_sensor.main([*argv, "--out", str(tmp_path / "reference")])
    got = json.loads((resumed / "results.json").read_text())
    want = json.loads((reference / "results.json").read_text())
    assert numbers(got) == numbers(want)
    assert not (resumed / "checkpoint.npz").exists()
    # Both sessions' wall times, and their sum.
    assert len(got["sessions"]) == 2 and all(session["seconds"] > 0 for session in got["sessions"])
    assert got["seconds"] == pytest.approx(sum(session["seconds"] for session in got["sessions"]))
    assert len(want["sessions"]) == 1 and want["seconds"] == want["sessions"][0]["seconds"]
    # Each session records what ran it, as config.json records what started the run.
    config = json.loads((resumed / "config.json").read_text())
    assert [session["provenance"] for session in got["sessions"]] == [config["provenance"]] * 2
    # The bar was closed before the interruption's line: its last line ends.
    assert stdout.endswith("\n")

    # TensorBoard: every logged step of the interrupted configuration once, none twice.
    schedule = log_schedule(3000, gas_sensor.Config.quick().log_points)
    configuration = name.split(".")[0]  # the checkpointed stage may be an edge round, "<name>.edge1"
    losses = np.asarray(got["configurations"][configuration]["grid"]["final_losses"], dtype=float)
    point = int(np.flatnonzero(np.isfinite(losses))[0])
    rate = got["configurations"][configuration]["grid"]["learning_rates"][point]
    steps = tensorboard_steps(interrupted / "tensorboard" / configuration / f"lr_{rate:.3g}_seed_0", "loss")
    assert len(steps) == len(set(steps)), "a step was written twice"
    assert set(steps) <= set(schedule.tolist()) and len(steps) >= len(schedule) - 1


def half_done(run, horizon=3000):
    """Whether `run` has a finished configuration and a checkpoint of a final stage past
    iteration 0 and before half its `horizon` (each configuration runs its screen, `<name>.screen`,
    then its final stage). Early in a stage, so that the run still has work left when the signal
    lands."""
    if not any(not p.name.endswith(".screen.npz") for p in (run / "grids").glob("*.npz")):
        return False
    try:
        checkpoint = runstate.load_checkpoint(run)
    except (OSError, ValueError):  # replaced while read
        return False
    return (
        checkpoint is not None
        and 0 < checkpoint.iterations[-1] < horizon / 2
        and not str(checkpoint.name).endswith(".screen")
    )


def tensorboard_steps(folder, tag):
    import tensorflow as tf

    return [
        event.step
        for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*"))
        for event in tf.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
        if value.tag == tag
    ]


def test_resume_refuses_other_options_and_shows_the_difference(capsys, data_dir, tmp_path):
    run = gas_sensor.main([*SHORT, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])
    capsys.readouterr()
    before = snapshot(run)
    argv = ["--quick", "--figure", "init", "--iterations", "500", "--data-dir", str(data_dir)]
    status, lines = cli_error(capsys, gas_sensor.main, ["--resume", str(run), *argv])
    assert status == 2 and len(lines) == 1
    assert "options differ" in lines[0] and "iterations: 300 -> 500" in lines[0]
    assert snapshot(run) == before


def test_resume_matches_data_by_sha256_not_by_folder(capsys, data_dir, tmp_path):
    run = gas_sensor.main([*SHORT, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    assert gas_sensor.main(["--resume", str(run), *SHORT, "--data-dir", str(moved)]) == run
    config = json.loads((run / "config.json").read_text())
    assert config["data_source"] == str(moved)  # the folder actually read now
    with open(moved / "batch2.dat", "a") as file:
        file.write(batch_line(1, "10.0", ["0.5"] * 128))
    capsys.readouterr()
    status, lines = cli_error(capsys, gas_sensor.main, ["--resume", str(run), *SHORT, "--data-dir", str(moved)])
    assert status == 2 and len(lines) == 1 and "data differ" in lines[0] and "batch2" in lines[0]


def test_config_records_folder_sha256_and_rows(data_dir, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    run = gas_sensor.main([*SHORT, "--iterations", "20", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")])
    config = json.loads((run / "config.json").read_text())
    assert config["data_source"] == str(data_dir)
    for name in ("batch1", "batch2"):
        recorded = config["data_files"][name]
        content = (data_dir / f"{name}.dat").read_bytes()
        assert recorded["sha256"] == hashlib.sha256(content).hexdigest()
        assert recorded["rows"] == content.count(b"\n") == 26 and recorded["rows_used"] == 24
    # One permission mode for every output file (results.json was owner-only).
    modes = {stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    assert modes == {0o666 & ~current_umask()}


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_empty_folder_is_fine_as_out(data_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert gas_sensor.main([*SHORT, "--iterations", "20", "--data-dir", str(data_dir), "--out", str(out)]) == out
    assert (out / "results.json").is_file()


# ------------------------------------------------------------------ one-line errors


def test_data_dir_typo_is_an_error_not_the_env_var(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(data_dir))  # valid data the typo must not fall back to
    typo = tmp_path / "gas_snesor"
    out = tmp_path / "out"
    status, lines = cli_error(capsys, gas_sensor.main, [*SHORT, "--data-dir", str(typo), "--out", str(out)])
    assert status == 2 and len(lines) == 1
    assert str(typo) in lines[0] and "does not exist" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "batch1.dat holds no rows"),
        ("\n\n", "batch1.dat holds no rows"),
        ("1;10.0 1:0.5\n", "batch1.dat, line 1: feature index"),
        (batch_line(1, "10.0", ["0.5"] * 127 + ["nan"]), "batch1.dat, line 1: value 'nan' of feature 128"),
        (batch_line(1, "inf", ["0.5"] * 128), "batch1.dat, line 1: concentration 'inf'"),
    ],
    ids=["empty", "blank-lines", "corrupt-line", "nan-feature", "inf-target"],
)
def test_bad_batch_file_is_one_line_naming_it(capsys, tmp_path, no_env, content, expected):
    folder = write_batch_files(tmp_path / "data", batches=(2, 3))
    (folder / "batch1.dat").write_text(content)
    out = tmp_path / "out"
    status, lines = cli_error(capsys, gas_sensor.main, [*SHORT, "--data-dir", str(folder), "--out", str(out)])
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not out.exists()


def test_missing_data_is_one_line_and_debug_shows_the_traceback(capsys, tmp_path, no_env):
    argv = [*SHORT, "--out", str(tmp_path / "out")]
    status, lines = cli_error(capsys, gas_sensor.main, argv)
    assert status == 2 and len(lines) == 1 and "gas sensor data not found" in lines[0]
    assert "--data-dir" in lines[0] and "--download" in lines[0]  # the flags, not only the arguments
    status, lines = cli_error(capsys, gas_sensor.main, [*argv, "--debug"])
    assert status == 2 and lines[0].startswith("Traceback") and "data not found" in lines[-1]


def test_unwritable_output_is_one_line(capsys, data_dir):
    status, lines = cli_error(capsys, gas_sensor.main, [*SHORT, "--data-dir", str(data_dir), "--out", "/proc/x"])
    assert status == 2 and len(lines) == 1
    assert "cannot write the output folder /proc/x" in lines[0]


def test_download_without_network_is_one_line(capsys, tmp_path, no_env, monkeypatch):
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    from experiments.data import gas_sensor as gas_data

    monkeypatch.setattr(gas_data, "UCI_URL", "http://127.0.0.1:9/gas.zip")
    argv = [*SHORT, "--download", "--out", str(tmp_path / "out")]
    status, lines = cli_error(capsys, gas_sensor.main, argv)
    assert status == 2 and len(lines) == 1
    assert "could not download http://127.0.0.1:9/gas.zip" in lines[0] and "check the network" in lines[0]


def test_ctrl_c_before_any_checkpoint_says_nothing_was_lost(capsys):
    @common_cli.cli
    def main(argv):
        raise KeyboardInterrupt

    status, lines = cli_error(capsys, main, [])
    assert status == 130 and lines == ["interrupted: interrupted; nothing was written"]


def test_a_bug_is_not_dressed_as_a_user_error():
    @common_cli.cli
    def main(argv):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        main([])


# ------------------------------------------------------------------ quiet, fast CLI


@pytest.mark.parametrize("module", ["experiments.gas_sensor", "experiments.mnist_cnn"])
def test_help_imports_neither_tensorflow_nor_keras(module):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', '--help']\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'matplotlib.pyplot') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "HEAVY []" in completed.stdout
    help_text = completed.stdout
    assert "--resume" in help_text and "--debug" in help_text and "hour" in help_text
    assert "--window" not in help_text  # mnist_cnn once mentioned an option it does not have


def test_help_names_the_data_set_variables():
    from experiments import mnist_cnn
    from experiments.data import mnist

    assert mnist_cnn.MNIST_ENV_VAR == mnist.ENV_VAR and mnist_cnn.NUM_TRAIN == mnist.NUM_TRAIN


def test_run_start_prints_configurations_and_an_estimate(capsys, data_dir, tmp_path):
    gas_sensor.main([*SHORT, "--iterations", "20", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")])
    printed = capsys.readouterr().out
    # --quick --figure init: depth 1, and depth 2 from near-zero and from identity = 3.
    assert "3 configurations x 20 iterations: screen 4 rates x 1 seed" in printed
    # One estimate: the header's is the one the bar starts with.
    estimate = printed.split("estimated time ")[1].splitlines()[0]
    assert "0%|" in printed and f"about {estimate} left" in printed


def test_progress_counts_work_done_and_this_sessions_rate(monkeypatch):
    from experiments.gas_sensor import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Progress(total=1000.0, done=400.0, parallel=2)  # a resumed run: 400 done before
    assert bar.estimate_seconds() == 600.0 / 2  # the cost model, two tasks at a time
    bar.start()
    clock[0] += 30.0
    bar.advance(100.0)
    bar.stage_finished()  # this session: 100 units in 30 s; the earlier 400 do not enter the rate
    assert bar.bar.n == 500.0 and bar.estimate_seconds() == pytest.approx(500.0 * 30.0 / 100.0)
    bar.replan(planned=100.0, actual=150.0)  # a final stage with one rate more than planned
    assert bar.estimate_seconds() == pytest.approx(550.0 * 0.3)
    bar.close()


def test_help_answers_with_tensorflow_and_keras_unimportable(tmp_path):
    # A meta-path finder refuses tensorflow, keras and jax: --help must not need them.
    env = isolated_env(tmp_path / "site", blocked=("tensorflow", "keras", "jax"))
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.gas_sensor", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    for option in ("--download", "--debug", "--connect-timeout", "--resume", "--address"):
        assert option in completed.stdout
    assert "Keras cache" in completed.stdout  # where --download puts the archive


def test_unreachable_address_is_one_line(data_dir, tmp_path):
    pytest.importorskip("ray")
    # Port 1 on the loopback: nothing listens. Ray alone would retry for minutes; the timeout
    # guards the test against that hang, it measures nothing.
    process = run_module(
        "experiments.gas_sensor",
        *SHORT,
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "out"),
        "--address",
        "127.0.0.1:1",
        "--connect-timeout",
        "5",
    )
    _, stderr = process.communicate(timeout=60)
    lines = stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, stderr
    assert "no Ray cluster at --address 127.0.0.1:1" in lines[0] and "within 5 s" in lines[0]
    assert not (tmp_path / "out").exists()


def test_results_and_first_figure_exist_before_the_second_configuration(data_dir, tmp_path, monkeypatch):
    from experiments.gas_sensor import runner

    seen = []
    train_stage = runner.train_stage

    def recording(stage, *args, **kwargs):
        run_dir = args[2]
        results = run_dir / "results.json"
        names = list(json.loads(results.read_text())["configurations"]) if results.exists() else []
        seen.append((stage.name, names, sorted(p.name for p in run_dir.glob("*.png"))))
        return train_stage(stage, *args, **kwargs)

    monkeypatch.setattr(runner, "train_stage", recording)
    gas_sensor.main([*SHORT, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])
    # l4/gd-d1 first, its screen, its final stage and its first stability-edge round, before
    # anything else; results.json and the figure that holds it are written after the final stage.
    assert [name for name, _, _ in seen[:3]] == ["l4/gd-d1.screen", "l4/gd-d1", "l4/gd-d1.edge1"]
    assert seen[1][1:] == ([], [])
    assert seen[2][1:] == (["l4/gd-d1"], ["init.png", "sharpness.png"])


def test_ctrl_c_inside_a_garbage_collector_callback_is_raised_at_the_next_check():
    # Python prints and drops an exception raised in a gc callback (TensorFlow imports JAX,
    # which registers one); the handler defers it to check_interrupt instead.
    def callback(phase, info):
        common_cli._on_interrupt(signal.SIGINT, sys._getframe())

    gc.callbacks.append(callback)
    try:
        callback("start", {})  # as if the signal landed while the callback ran: no raise here
    finally:
        gc.callbacks.remove(callback)
    with pytest.raises(KeyboardInterrupt):
        common_cli.check_interrupt()
    common_cli.check_interrupt()  # raised once
    with pytest.raises(KeyboardInterrupt):
        common_cli._on_interrupt(signal.SIGINT, sys._getframe())  # anywhere else: at once
    common_cli._Interrupt.requested = False
