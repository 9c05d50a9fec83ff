"""Run state and resume: trains the plan configuration by configuration (its screen, then its
final stage), keeps every finished grid and the checkpoint of the stage in progress in the run
folder, and after every configuration rewrites results.json and the figures that hold it.

A run folder holds config.json, sessions.json (the wall time of every session), results.json,
one PNG per figure, TensorBoard logs (`tensorboard/`), the finished grids (`grids/*.npz`) and
the engine checkpoint of the stage in progress (`checkpoint.npz`, `experiments.common.runstate`).
"""

import dataclasses
import datetime
import json
import time

import numpy as np

from experiments.common import runstate, sweep
from experiments.common.cli import check_interrupt, lazy_import
from experiments.common.run_folder import write_json_atomic
from experiments.gas_sensor import plan, plots, report
from experiments.gas_sensor.progress import Progress

fullbatch = lazy_import("experiments.engine.fullbatch")

SESSIONS = "sessions.json"


class TensorBoardLogger:
    """Writes one TensorBoard run per grid point as training goes (`sweep.write_log_point`:
    the loss and, every `diagnostics_every` logs, the chain's state through
    `tf_overparam.callbacks.write_chain_summaries`), the events a Ray task's driver writes."""

    def __init__(self, root, name, learning_rates, seeds, diagnostics_every):
        self.writers = sweep.tensorboard_writers(root, name, learning_rates, seeds)
        self.learning_rates = learning_rates
        self.diagnostics_every = diagnostics_every
        self.calls = 0

    def __call__(self, trainer, iteration, losses):
        with_diagnostics = self.calls % self.diagnostics_every == 0
        self.calls += 1
        factors = sweep.chain_state(trainer) if with_diagnostics else None
        sweep.write_log_point(self.writers, self.learning_rates, iteration, losses, factors, trainer.spec.depth)

    def close(self):
        for writer in self.writers:
            writer.close()


def diagnostics_every(schedule):
    """Diagnostics (SVD, balancedness) at every n-th log point: about 50 per run."""
    return max(1, len(schedule) // 50)


class StageTrainer:
    """Trains one `Stage` in this process, checkpointing the engine state (atomically) at every
    log point; only final stages log to TensorBoard. `checkpoint` (a `runstate.Checkpoint` of
    this stage) continues a half-done one; `on_progress(fraction)` hears each log point."""

    def __init__(self, stage, data, config, run_dir, checkpoint=None, on_progress=None):
        self.stage, self.run_dir = stage, run_dir
        self.on_progress = on_progress
        self.trainer = fullbatch.FullBatchTrainer(data.x, data.y, stage.run.spec, stage.learning_rates, stage.seeds)
        self.schedule = fullbatch.log_schedule(stage.iterations, config.log_points)
        self.logger = None
        if stage.kind == "final":
            self.logger = TensorBoardLogger(
                run_dir / "tensorboard",
                stage.run.name,
                self.trainer.learning_rates,
                self.trainer.seeds,
                diagnostics_every(self.schedule),
            )
        self.logged = []
        if checkpoint is not None:
            self.trainer.set_state(checkpoint.state)
            self.logged = list(checkpoint.losses)
            if self.logger is not None:
                self.logger.calls = len(self.logged)  # diagnostics where an uninterrupted run has them
        self.last = self.trainer.iteration

    def _on_log(self, trainer, iteration, losses):
        self.logged.append(losses)
        # Checkpoint first: an interruption before TensorBoard's write loses that step rather
        # than writing it twice on resume.
        schedule = self.schedule[: len(self.logged)]
        runstate.save_checkpoint(self.run_dir, self.stage.name, trainer.get_state(), schedule, self.logged)
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
                self.stage.iterations, schedule=self.schedule[len(self.logged) :], on_log=self._on_log
            )
        finally:
            if self.logger is not None:
                self.logger.close()
        return dataclasses.replace(result, iterations=self.schedule, losses=np.asarray(self.logged, np.float64))


def train_stage(stage, data, config, run_dir, checkpoint=None, on_progress=None):
    """`StageTrainer(...).run()`: one stage in this process; returns its `GridResult`."""
    return StageTrainer(stage, data, config, run_dir, checkpoint, on_progress).run()


class GasSensorRun:
    """One run folder while it trains.

    Args:
        run_dir: the run folder (new, or one being resumed).
        config: the `plan.Config`.
        datas: {data key: data}, "default" the loaded data set (`plan.load_variants`).
        figures: {figure: [RunConfig]}; `runs`: the configurations in run order (`plan.run_order`).
        executor: a `sweep.Executor` (in-process or Ray).
    """

    def __init__(self, run_dir, config, datas, figures, runs, executor=None):
        self.run_dir, self.config, self.datas = run_dir, config, datas
        self.figures, self.runs = figures, runs
        self.executor = executor or sweep.Executor()
        self.grids = {}  # stage name -> GridResult, finished
        self.results, self.summaries, self.targets = {}, {}, {}
        self.groups = report.target_groups(runs)
        self.replanned = set()
        self.checkpoint = runstate.load_checkpoint(run_dir)
        self.saved_seconds = self._load_saved_seconds()
        self.sessions = self._load_sessions()
        self.session_started = time.monotonic()
        self.sessions.append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(), "seconds": 0.0})
        self.progress = Progress(
            sum(plan.planned_work(config, run) for run in runs),
            parallel=self.executor.capacity,
        )
        self._count_finished_work()

    # ------------------------------------------------------------------ what is already done

    def _load_saved_seconds(self):
        path = self.run_dir / "results.json"
        saved = json.loads(path.read_text())["configurations"] if path.exists() else {}
        return {name: summary.get("seconds") for name, summary in saved.items()}

    def _load_sessions(self):
        path = self.run_dir / SESSIONS
        return json.loads(path.read_text())["sessions"] if path.exists() else []

    def _grid(self, stage):
        if stage.name not in self.grids:
            grid = runstate.load_grid(self.run_dir, stage.name, fullbatch.GridResult)
            if grid is not None:
                self.grids[stage.name] = grid
        return self.grids.get(stage.name)

    def _count_finished_work(self):
        """Puts the work of earlier sessions on the bar: finished stages, and the finished part
        of the checkpointed one."""
        done = 0.0
        for run in self.runs:
            screen = plan.screen_stage(self.config, run)
            screen_grid = self._grid(screen)
            if screen_grid is None:
                done += self._checkpointed_work(screen)
                continue
            done += screen.work
            final = plan.final_stage(self.config, run, screen_grid)
            self._replan(run, final)
            done += final.work if self._grid(final) is not None else self._checkpointed_work(final)
        self.progress.done = done

    def _checkpointed_work(self, stage):
        if self.checkpoint is None or self.checkpoint.name != stage.name:
            return 0.0
        return stage.work * float(self.checkpoint.iterations[-1]) / stage.iterations

    def _replan(self, run, final):
        """Counts `final`'s actual work in place of the planned one (once per configuration)."""
        if run.name in self.replanned:
            return
        self.replanned.add(run.name)
        planned = plan.planned_work(self.config, run) - plan.screen_stage(self.config, run).work
        self.progress.replan(planned, final.work)

    def estimate_seconds(self):
        """The time left, as the bar shows it."""
        return self.progress.estimate_seconds()

    # ------------------------------------------------------------------ training

    def train(self):
        """Trains every stage not yet finished; returns the run folder."""
        self.progress.start()
        try:
            if self.executor.ray is None:
                self._train_in_process()
            else:
                self._train_on_ray()
        finally:
            self.progress.close()
            self._save_sessions()
        report.print_summary(self.summaries, self.targets, self.total_seconds())
        return self.run_dir

    def _kept_configurations(self):
        """Adds the configurations finished in earlier sessions to the results (and writes them
        once); returns the configurations left."""
        left = []
        for run in self.runs:
            screen = self._grid(plan.screen_stage(self.config, run))
            if screen is not None and self._grid(plan.final_stage(self.config, run, screen)) is not None:
                self.finish_configuration(run, self.saved_seconds.get(run.name), write=False)
            else:
                left.append(run)
        if self.results:
            self.write()
        return left

    def _train_in_process(self):
        for run in self._kept_configurations():
            screen = plan.screen_stage(self.config, run)
            screen_grid = self._grid(screen)
            if screen_grid is None:
                screen_grid = self._train(screen)
            final = plan.final_stage(self.config, run, screen_grid)
            self._replan(run, final)
            start = time.monotonic()
            self._train(final)
            self.finish_configuration(run, time.monotonic() - start)

    def _train(self, stage):
        self.progress.describe(stage.name)
        checkpoint = self.checkpoint if self.checkpoint is not None and self.checkpoint.name == stage.name else None
        work = stage.work

        def advance(fraction):
            self.progress.advance(work * fraction)

        grid = train_stage(stage, self.datas[stage.run.data_key], self.config, self.run_dir, checkpoint, advance)
        self._record(stage, grid)
        return grid

    def _record(self, stage, grid):
        runstate.save_grid(self.run_dir, stage.name, grid)
        self.grids[stage.name] = grid
        if self.checkpoint is None or self.checkpoint.name == stage.name:  # the half-done one is finished
            runstate.clear_checkpoint(self.run_dir)
            self.checkpoint = None
        self.progress.stage_finished()

    def _task(self, stage):
        data = self.datas[stage.run.data_key]
        schedule = fullbatch.log_schedule(stage.iterations, self.config.log_points)
        return sweep.GridTask(
            stage.name,
            data.x,
            data.y,
            stage.run.spec,
            stage.learning_rates,
            stage.seeds,
            schedule,
            diagnostics_every(schedule),
        )

    def _train_on_ray(self):
        """Stages as Ray tasks, at most one per CPU at a time; a configuration's final stage
        is submitted as soon as its screen returns, before any later configuration's screen."""
        order = {run.name: i for i, run in enumerate(self.runs)}
        queue = []
        for run in self._kept_configurations():
            screen = plan.screen_stage(self.config, run)
            if self._grid(screen) is None:
                queue.append(screen)
            else:
                final = plan.final_stage(self.config, run, self._grid(screen))
                self._replan(run, final)
                queue.append(final)
        pending = {}
        while queue or pending:
            queue.sort(key=lambda s: (s.kind != "final", order[s.run.name]))
            while queue and len(pending) < self.executor.capacity:
                stage = queue.pop(0)
                pending[self.executor.submit(self._task(stage))] = stage
            outcome, handle = self.executor.next_finished(list(pending))
            stage = pending.pop(handle)
            self.progress.advance(stage.work)
            self._record(stage, outcome.result)
            if stage.kind == "screen":
                final = plan.final_stage(self.config, stage.run, outcome.result)
                self._replan(stage.run, final)
                queue.append(final)
            else:
                sweep.write_tensorboard(self.run_dir / "tensorboard", outcome)
                self.finish_configuration(stage.run, outcome.seconds)

    # ------------------------------------------------------------------ results as they come

    def finish_configuration(self, run, seconds, write=True):
        """Adds a configuration whose final stage is done to the results; with `write`,
        rewrites results.json and the figures that hold it."""
        screen = self.grids[plan.screen_stage(self.config, run).name]
        final = self.grids[run.name]
        self.results[run.name] = final
        self.summaries[run.name] = report.configuration_record(run, final, screen, seconds)
        if write:
            self.write(only=run.name)
        check_interrupt()

    def total_seconds(self):
        self.sessions[-1]["seconds"] = time.monotonic() - self.session_started
        return sum(session["seconds"] for session in self.sessions)

    def _save_sessions(self):
        self.total_seconds()
        write_json_atomic(self.run_dir / SESSIONS, {"sessions": self.sessions})

    def write(self, only=None):
        """results.json (atomically) and the figures (those holding `only`, else all)."""
        self.targets = report.add_targets_and_ratios(self.summaries, self.results, self.groups)
        self._save_sessions()
        report.write_results(
            self.run_dir / "results.json",
            self.datas["default"],
            self.config,
            self.summaries,
            self.targets,
            self.results,
            self.sessions,
        )
        plots.plot_figures(self.run_dir, self.config, self.figures, self.results, self.summaries, only=only)

    def interrupted_message(self):
        """What was kept, for the Ctrl-C line."""
        screens = sum(f"{run.name}.screen" in self.grids for run in self.runs)
        finals = sum(run.name in self.grids for run in self.runs)
        checkpoint = runstate.load_checkpoint(self.run_dir)
        half = f" and {checkpoint.name} at iteration {int(checkpoint.iterations[-1]):,}" if checkpoint else ""
        return f"kept {finals} of {len(self.runs)} configurations (rate screens: {screens} of {len(self.runs)}){half}"
