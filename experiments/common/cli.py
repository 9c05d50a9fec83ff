"""The experiment scripts' command line: the wrapper of `main` (one-line errors, Ctrl-C, `--debug`),
lazy imports that keep `--help` free of TensorFlow, and a quiet TensorFlow start."""

import contextlib
import functools
import gc
import importlib
import os
import signal
import sys
import traceback
import types

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
    """(keras, tensorflow, matplotlib.pyplot) as `lazy_import` stand-ins, for the scripts; the
    first use of Keras or TensorFlow imports TensorFlow quietly (`quiet_tensorflow`)."""
    return (
        lazy_import("keras", setup=quiet_tensorflow),
        lazy_import("tensorflow", setup=quiet_tensorflow),
        lazy_pyplot(),
    )


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


def add_common_arguments(parser):
    """The options every script has: `--debug` (the `cli` wrapper reads it)."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


class _Interrupt:
    """Ctrl-C, as the `cli` wrapper's handler saw it."""

    requested = False


def _on_interrupt(signum, frame):
    """SIGINT: raises KeyboardInterrupt, except inside a garbage-collector callback or a
    `__del__` (TensorFlow imports JAX, which registers one), where Python would print the
    exception and drop it; there `check_interrupt()` raises it at the next check."""
    _Interrupt.requested = True
    if frame is not None and (
        frame.f_code.co_name == "__del__" or any(frame.f_code is getattr(c, "__code__", None) for c in gc.callbacks)
    ):
        return
    raise KeyboardInterrupt


def check_interrupt():
    """Raises KeyboardInterrupt if Ctrl-C was pressed under the `cli` wrapper and its exception
    has not been raised yet (long loops call it at each step they log)."""
    if _Interrupt.requested:
        _Interrupt.requested = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_handler():
    """`_on_interrupt` as the SIGINT handler while a script runs, where Python's own is set
    (not where SIGINT is ignored, as for a shell's background job, or off the main thread)."""
    installed = False
    try:
        installed = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if installed:
            signal.signal(signal.SIGINT, _on_interrupt)
    except ValueError:  # not the main thread
        installed = False
    _Interrupt.requested = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


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
            with _interrupt_handler():
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
