"""Helpers shared by the experiment scripts: run folders, atomic result files, lazy imports and
the command-line wrapper (one-line errors, Ctrl-C, quiet TensorFlow)."""

import contextlib
import dataclasses
import datetime
import functools
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import types

RUN_FILES = ("config.json", "results.json")  # a folder holding either holds a run
EXIT_USAGE = 2  # a user-caused error: one line, no traceback
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, unwritable output): the command line
    prints its message as one line and exits with status 2."""


class RunInterrupted(Exception):
    """Ctrl-C during a run; the message says what was kept and how to resume."""


def lazy_import(name, setup=None):
    """A stand-in for module `name` that imports it at the first attribute access, so that
    `--help` and argument errors return without loading TensorFlow. `setup()` runs first (e.g.
    `matplotlib.use("Agg")` before pyplot). Nothing is put in `sys.modules` until then."""

    class LazyModule(types.ModuleType):
        def __getattr__(self, attribute):
            if setup is not None:
                setup()
            return getattr(importlib.import_module(name), attribute)

    return LazyModule(name)


def _use_agg():
    import matplotlib

    matplotlib.use("Agg")


def lazy_pyplot():
    """`matplotlib.pyplot` on the Agg backend, imported at first use."""
    return lazy_import("matplotlib.pyplot", setup=_use_agg)


def lazy_keras_tensorflow_pyplot():
    """(keras, tensorflow, matplotlib.pyplot) as `lazy_import` stand-ins, for the scripts."""
    return lazy_import("keras"), lazy_import("tensorflow"), lazy_pyplot()


def quiet_tensorflow():
    """Imports TensorFlow without its C++ log noise (CUDA, oneDNN, CPU features), unless the
    user set TF_CPP_MIN_LOG_LEVEL. TensorFlow 2.21 writes some of it before its log level is
    read, so standard error is pointed at /dev/null during the import itself."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def format_seconds(seconds):
    """'45 s', '12 min' or '2.1 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def one_line(error):
    """An exception's message on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def cli(main):
    """Wraps an experiment script's `main(argv)`: `--debug` (shows tracebacks) is taken out of
    argv; a `UserError` or `OSError` prints one line and exits 2; Ctrl-C prints one line and
    exits 130. The returned function is still callable with an argv list (tests)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        argv = [a for a in argv if a != "--debug"]
        try:
            return main(argv)
        except (KeyboardInterrupt, RunInterrupted) as error:
            if debug:
                traceback.print_exc()
            message = str(error) if isinstance(error, RunInterrupted) else "interrupted; nothing was written"
            print(f"interrupted: {message}", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except (UserError, OSError) as error:
            if debug:
                traceback.print_exc()
            print(f"error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None

    return wrapper


@contextlib.contextmanager
def user_errors(*kinds):
    """Turns the given exception kinds (default ValueError and OSError), raised by user input
    such as a data file, into a `UserError` with the same message."""
    try:
        yield
    except UserError:
        raise
    except kinds or (ValueError, OSError) as error:  # noqa: B030 - a tuple either way
        raise UserError(one_line(error)) from error


def resume_command(module, run_dir, argv):
    """The command line that continues the run in `run_dir`: argv with --out replaced by
    --resume."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--resume"):
            skip = True
        elif not arg.startswith(("--out=", "--resume=")):
            kept.append(arg)
    return " ".join(["python -m", module, "--resume", str(run_dir), *kept])


def holds_run(path):
    """Whether folder `path` holds a run (a config.json or results.json)."""
    return any((pathlib.Path(path) / name).exists() for name in RUN_FILES)


def make_run_dir(out, name):
    """The output folder of a new run: `out` if given, else runs/<name>/<UTC timestamp>/.

    Raises:
        UserError: `out` already holds a run (no run overwrites another; use --resume), or the
            folder cannot be created or written.
    """
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("runs") / name / stamp
    path = pathlib.Path(out)
    if holds_run(path):
        raise UserError(
            f"--out {path} already holds a run ({', '.join(n for n in RUN_FILES if (path / n).exists())}); "
            f"choose another folder, or continue it with --resume {path}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=path)
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write the output folder {path}: {error.strerror or error}") from error
    return path


def file_mode():
    """The permission mode of a new file under the current umask (what open() would give), so
    that results written through a temporary file read like the figures beside them."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomic(path, write, binary=False):
    """Writes `path` through a temporary file in its folder and os.replace: a reader never sees
    a half-written file. `write(file)` writes the content."""
    path = pathlib.Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp, file_mode())
        with os.fdopen(handle, "wb" if binary else "w") as file:
            write(file)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def write_json_atomic(path, obj):
    """Writes `obj` (dataclasses allowed) as JSON to `path` atomically (`replace_atomic`)."""

    def default(value):
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, pathlib.Path):
            return str(value)
        raise TypeError(f"cannot write {type(value).__name__} as JSON")

    def write(file):
        json.dump(obj, file, indent=2, default=default, allow_nan=True)
        file.write("\n")

    replace_atomic(path, write)


def provenance():
    """What produced a run, for its config.json: the package version and the git commit of the
    checkout (`git_dirty`: uncommitted changes; None outside a git checkout)."""
    import tf_overparam

    root = pathlib.Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package_version": tf_overparam.__version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def record_run(out, name, config, run, plot, summarize):
    """Runs `run(config)` and records it in a run folder: config.json, results.json (with the
    run's wall time as `total_seconds`) and `<name>.png` from `plot(results, config, path)`;
    `summarize(results, config)` prints the summary. Returns the results."""
    directory = make_run_dir(out, name)
    write_json_atomic(directory / "config.json", {**dataclasses.asdict(config), "provenance": provenance()})
    start = time.perf_counter()
    results = run(config)
    results["total_seconds"] = time.perf_counter() - start
    write_json_atomic(directory / "results.json", results)
    plot(results, config, directory / f"{name}.png")
    summarize(results, config)
    print(f"wrote {directory} ({results['total_seconds']:.1f} s)")
    return results
