"""One stage trained: in this process (`train_stage`, checkpointed at every log point, TensorBoard
as it goes) or as a Ray task (`stage_task`); each stage's early screen (`train_early`), saved
beside the finished grids as `early/<stage>.npz` (no kernels)."""

import dataclasses
import pathlib

import numpy as np

from experiments.common import runstate, sweep
from experiments.common.cli import check_interrupt, lazy_import

fullbatch = lazy_import("experiments.engine.fullbatch")

EARLY = "early"
_EARLY_FIELDS = ("learning_rates", "seeds", "iterations", "losses", "diverged_at")
SHARPNESS_KINDS = ("final", "below", "edge", "sensitivity")  # full-horizon stages of a configuration


def diagnostics_every(schedule):
    """Diagnostics (SVD, balancedness, sharpness) at every n-th log point: about 50 per run."""
    return max(1, len(schedule) // 50)


def sharpness_every(stage, schedule):
    """Every how many logs a stage computes the rate x sharpness: the full-horizon stages of GD
    on a chain (the edge-of-stability reading holds for plain GD), else None."""
    spec = stage.run.spec
    if stage.kind in SHARPNESS_KINDS and spec.update == "chain" and spec.optimizer == "gd":
        return diagnostics_every(schedule)
    return None


def _early_path(run_dir, name):
    return pathlib.Path(run_dir) / EARLY / (name.replace("/", "__") + ".npz")


def save_early(run_dir, name, grid):
    """Atomically writes a stage's early-screen grid."""
    runstate.save_npz(_early_path(run_dir, name), {f: np.asarray(getattr(grid, f)) for f in _EARLY_FIELDS})


def load_early(run_dir, name):
    """A stage's early-screen `GridResult`, or None if it has not run."""
    path = _early_path(run_dir, name)
    if not path.exists():
        return None
    loaded = runstate.load_npz(path)
    return fullbatch.GridResult(**{f: loaded[f] for f in _EARLY_FIELDS}, kernels=np.zeros(0))


def train_early(stage, data):
    """The early screen of `stage`: its rates x `early_seeds` for `early_iterations`."""
    return sweep.early_screen(
        data.x, data.y, stage.run.spec, stage.learning_rates, stage.early_seeds, stage.early_iterations
    )


class TensorBoardLogger:
    """Writes one TensorBoard run per grid point as training goes (`sweep.write_log_point`:
    the loss, the rate x sharpness where computed and, every `diagnostics_every` logs, the
    chain's state), the events a Ray task's driver writes."""

    def __init__(self, root, name, learning_rates, seeds, diagnostics_every):
        self.writers = sweep.tensorboard_writers(root, name, learning_rates, seeds)
        self.learning_rates = learning_rates
        self.diagnostics_every = diagnostics_every
        self.calls = 0

    def __call__(self, trainer, iteration, losses):
        with_diagnostics = self.calls % self.diagnostics_every == 0
        self.calls += 1
        factors = sweep.chain_state(trainer) if with_diagnostics else None
        sharpness = getattr(trainer, "last_sharpness", None)
        sweep.write_log_point(
            self.writers, self.learning_rates, iteration, losses, factors, trainer.spec.depth, sharpness
        )

    def close(self):
        for writer in self.writers:
            writer.close()


class StageTrainer:
    """Trains one `Stage` in this process, checkpointing the engine state (atomically) at every
    log point; all stages but screens log to TensorBoard (under the configuration's name).
    `checkpoint` (a `runstate.Checkpoint` of this stage) continues a half-done one;
    `on_progress(fraction)` hears each log point."""

    def __init__(self, stage, data, config, run_dir, checkpoint=None, on_progress=None):
        self.stage, self.run_dir = stage, run_dir
        self.on_progress = on_progress
        self.trainer = fullbatch.FullBatchTrainer(data.x, data.y, stage.run.spec, stage.learning_rates, stage.seeds)
        self.schedule = fullbatch.log_schedule(stage.iterations, config.log_points)
        self.sharpness = sweep.sharpness_arguments(
            fullbatch.FullBatchTrainer, self.schedule, sharpness_every(stage, self.schedule)
        )
        self.logger = None
        if stage.kind != "screen":
            self.logger = TensorBoardLogger(
                run_dir / "tensorboard",
                stage.run.name,
                self.trainer.learning_rates,
                self.trainer.seeds,
                diagnostics_every(self.schedule),
            )
        self.logged, self.sharp_iterations, self.sharp_values = [], [], []
        if checkpoint is not None:
            state = dict(checkpoint.state)
            self.sharp_iterations = list(state.pop("sharpness_log_iterations", np.zeros(0, np.int64)))
            self.sharp_values = list(state.pop("sharpness_log", np.zeros((0, self.trainer.grid))))
            self.trainer.set_state(state)
            self.logged = list(checkpoint.losses)
            if self.logger is not None:
                self.logger.calls = len(self.logged)  # diagnostics where an uninterrupted run has them
        self.last = self.trainer.iteration

    def _on_log(self, trainer, iteration, losses):
        self.logged.append(losses)
        sharpness = getattr(trainer, "last_sharpness", None)
        if sharpness is not None:
            self.sharp_iterations.append(iteration)
            self.sharp_values.append(np.asarray(sharpness, np.float64))
        # Checkpoint first: an interruption before TensorBoard's write loses that step rather
        # than writing it twice on resume.
        schedule = self.schedule[: len(self.logged)]
        state = trainer.get_state()
        if self.sharpness:
            state["sharpness_log_iterations"] = np.asarray(self.sharp_iterations, np.int64)
            state["sharpness_log"] = np.asarray(self.sharp_values, np.float64).reshape(-1, trainer.grid)
        runstate.save_checkpoint(self.run_dir, self.stage.name, state, schedule, self.logged)
        if self.logger is not None:
            self.logger(trainer, iteration, losses)
        if self.on_progress is not None:
            self.on_progress((iteration - self.last) / self.stage.iterations)
        self.last = iteration
        check_interrupt()

    def run(self):
        """Trains to the end; returns the `GridResult` of the whole stage."""
        try:
            result = self.trainer.run(
                self.stage.iterations,
                schedule=self.schedule[len(self.logged) :],
                on_log=self._on_log,
                **self.sharpness,
            )
        finally:
            if self.logger is not None:
                self.logger.close()
        changes = dict(iterations=self.schedule, losses=np.asarray(self.logged, np.float64))
        if self.sharpness:
            changes["sharpness_iterations"] = np.asarray(self.sharp_iterations, np.int64)
            changes["sharpness"] = np.asarray(self.sharp_values, np.float64).reshape(-1, self.trainer.grid)
        return dataclasses.replace(result, **changes)


def train_stage(stage, data, config, run_dir, checkpoint=None, on_progress=None):
    """`StageTrainer(...).run()`: one stage's full run in this process; returns its `GridResult`."""
    return StageTrainer(stage, data, config, run_dir, checkpoint, on_progress).run()


def stage_task(stage, data, config):
    """The `sweep.GridTask` of `stage` (its early screen, then its full run) for a Ray worker."""
    schedule = fullbatch.log_schedule(stage.iterations, config.log_points)
    return sweep.GridTask(
        stage.name,
        data.x,
        data.y,
        stage.run.spec,
        stage.learning_rates,
        stage.seeds,
        schedule,
        diagnostics_every(schedule),
        early_seeds=stage.early_seeds,
        early_iterations=stage.early_iterations,
        sharpness_every=sharpness_every(stage, schedule),
    )
