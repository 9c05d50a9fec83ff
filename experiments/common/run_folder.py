"""Run folders: a new folder per run (never one that holds a run), files written atomically, and
what produced a run (its provenance)."""

import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import tempfile
import time

from experiments.common.cli import UserError

RUN_FILES = ("config.json", "results.json")  # a folder holding either holds a run


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

    root = pathlib.Path(__file__).resolve().parents[2]

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
