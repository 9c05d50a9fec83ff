"""Helpers shared by the experiment scripts: run folders and atomic result files."""

import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import tempfile
import time


def make_run_dir(out, name):
    """The output folder of one run: `out` if given, else runs/<name>/<UTC timestamp>/."""
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("runs") / name / stamp
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path, obj):
    """Writes `obj` (dataclasses allowed) as JSON to `path` through a temp file and os.replace,
    so a reader never sees a half-written file."""
    path = pathlib.Path(path)

    def default(value):
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        if hasattr(value, "tolist"):
            return value.tolist()
        if isinstance(value, pathlib.Path):
            return str(value)
        raise TypeError(f"cannot write {type(value).__name__} as JSON")

    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(obj, file, indent=2, default=default, allow_nan=True)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


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
    return {"package_version": tf_overparam.__version__, "git_commit": commit,
            "git_dirty": None if status is None else bool(status)}


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
