"""Resumable runs: engine checkpoints, finished grids and the checks that a resumed run is the
same run (config and data) as the one it continues.

A gas sensor run folder holds, next to config.json and results.json:
- `checkpoint.npz`: the configuration being trained, written atomically at every log point:
  the engine state (`FullBatchTrainer.get_state`) and the losses logged so far;
- `grids/<configuration>.npz`: every finished configuration's whole grid (`GridResult`).
"""

import io
import json
import pathlib
import typing

import numpy as np

from experiments.common.cli import UserError
from experiments.common.run_folder import replace_atomic

CHECKPOINT = "checkpoint.npz"
GRIDS = "grids"
# The sharpness trace is optional: a grid file without its two fields loads with `GridResult` defaults.
_GRID_FIELDS = (
    "learning_rates",
    "seeds",
    "iterations",
    "losses",
    "diverged_at",
    "kernels",
    "sharpness_iterations",
    "sharpness",
)


class Checkpoint(typing.NamedTuple):
    """The stage in progress: its `name`, the engine `state` (`FullBatchTrainer.get_state`), the
    `iterations` logged so far and the `losses` logged at them."""

    name: str
    state: dict
    iterations: np.ndarray
    losses: np.ndarray


def save_npz(path, arrays):
    """Atomically writes the NumPy `arrays` ({name: array}) to the .npz file `path`."""

    def write(file):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        file.write(buffer.getvalue())

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomic(path, write, binary=True)


def load_npz(path):
    """The arrays of the .npz file `path`, {name: array}."""
    with np.load(path, allow_pickle=False) as loaded:
        return {key: loaded[key] for key in loaded.files}


def save_checkpoint(run_dir, name, state, iterations, losses):
    """Atomically writes the half-done configuration `name`: the engine `state` and the losses
    logged at `iterations` so far."""
    arrays = {f"state/{k}": v for k, v in state.items()}
    arrays.update(name=np.asarray(name), iterations=np.asarray(iterations, np.int64), losses=np.asarray(losses))
    save_npz(pathlib.Path(run_dir) / CHECKPOINT, arrays)


def load_checkpoint(run_dir):
    """The `Checkpoint` of `run_dir`, or None."""
    path = pathlib.Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    arrays = load_npz(path)
    state = {k.removeprefix("state/"): v for k, v in arrays.items() if k.startswith("state/")}
    return Checkpoint(str(arrays["name"]), state, arrays["iterations"], arrays["losses"])


def clear_checkpoint(run_dir):
    (pathlib.Path(run_dir) / CHECKPOINT).unlink(missing_ok=True)


def _grid_path(run_dir, name):
    return pathlib.Path(run_dir) / GRIDS / (name.replace("/", "__") + ".npz")


def save_grid(run_dir, name, result):
    """Atomically writes a finished configuration's `GridResult`."""
    save_npz(_grid_path(run_dir, name), {f: np.asarray(getattr(result, f)) for f in _GRID_FIELDS})


def load_grid(run_dir, name, grid_class):
    """A finished configuration's `GridResult` (as `grid_class`), or None if not finished; the
    fields a file written by an older version lacks take `grid_class`'s defaults."""
    path = _grid_path(run_dir, name)
    if not path.exists():
        return None
    return grid_class(**{k: v for k, v in load_npz(path).items() if k in _GRID_FIELDS})


def config_difference(saved, current, ignore=()):
    """'key: saved -> current' for every top-level key whose values differ."""
    keys = [k for k in dict.fromkeys([*saved, *current]) if k not in ignore]
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def check_same_config(run_dir, config, ignore=()):
    """The saved config.json of `run_dir`; raises `UserError` unless it holds a run whose config
    equals `config` (a JSON-able dict) but for the keys in `ignore`."""
    run_dir = pathlib.Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no run there (no config.json); start one with --out {run_dir}")
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(config))  # tuples -> lists, as config.json holds them
    difference = config_difference({k: saved.get(k) for k in current}, current, ignore)
    if difference:
        raise UserError(
            f"--resume {run_dir}: the options differ from the run's ({'; '.join(difference)}); "
            "give the same options as the run you resume"
        )
    return saved


def check_resumable(run_dir, config, files, ignore=()):
    """`check_same_config`, and the run's data files must have the same sha256 as `files`
    ({name: {"sha256": ...}}), wherever they are now."""
    saved = check_same_config(run_dir, config, ignore)
    saved_files = {k: v["sha256"] for k, v in saved.get("data_files", {}).items()}
    current_files = {k: v["sha256"] for k, v in files.items()}
    if saved_files != current_files:
        changed = config_difference(saved_files, current_files)
        raise UserError(f"--resume {run_dir}: the data differ from the run's (sha256 of {'; '.join(changed)})")
    return saved
