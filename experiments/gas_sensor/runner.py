"""Run state and resume: trains the stages the machine of `experiments.gas_sensor.stages` asks
for, in run order (in this process one at a time, on Ray one per CPU), keeps every finished grid
and the checkpoint of the stage in progress in the run folder, and after a configuration's final
stage and once it is done rewrites results.json and the figures that hold it. A resumed run
replays the machine from the saved grids.

A run folder holds config.json, sessions.json (the wall time and provenance of every session), results.json,
one PNG per figure, TensorBoard logs (`tensorboard/`), the finished grids (`grids/*.npz`), the
early screens (`early/*.npz`) and the engine checkpoint of the stage in progress
(`checkpoint.npz`, `experiments.common.runstate`).
"""

import datetime
import json
import time

from experiments.common import runstate, sweep
from experiments.common.cli import check_interrupt, lazy_import
from experiments.common.run_folder import provenance, write_json_atomic
from experiments.gas_sensor import plan, plots, records, report, stages, training
from experiments.gas_sensor.progress import Progress
from experiments.gas_sensor.training import diagnostics_every, train_stage  # noqa: F401 (the runner's names)

fullbatch = lazy_import("experiments.engine.fullbatch")

SESSIONS = "sessions.json"


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
        self.grids, self.earlies = {}, {}  # stage name -> GridResult, finished (full run, early screen)
        self.results, self.summaries, self.targets, self.views = {}, {}, {}, {}
        self.groups = report.target_groups(runs)
        names = {run.name: run for run in runs}
        self.groups_by_run = {
            run.name: names.get(baseline) for baseline, members in self.groups.values() for run in members
        }
        self.planned = {run.name: plan.planned_work(config, run) for run in runs}
        self.spent, self.accounted, self.closed, self.finished, self.stage_seconds = {}, set(), set(), set(), {}
        self.checkpoint = runstate.load_checkpoint(run_dir)
        self.saved_seconds = self._load_saved_seconds()
        self.sessions = self._load_sessions()
        self.session_started = time.monotonic()
        # Each session's own provenance: a resumed run may continue on another commit than config.json's.
        started = datetime.datetime.now(datetime.timezone.utc).isoformat()
        self.sessions.append({"started": started, "seconds": 0.0, "provenance": provenance()})
        self.progress = Progress(sum(self.planned.values()), parallel=self.executor.capacity)
        self._count_finished_work()

    # ------------------------------------------------------------------ the stage machine

    def get(self, name):
        """A finished stage's `GridResult` (loaded from the run folder once), or None."""
        if name not in self.grids:
            grid = runstate.load_grid(self.run_dir, name, fullbatch.GridResult)
            if grid is None:
                return None
            self.grids[name] = grid
        return self.grids[name]

    def early(self, name):
        """A stage's early-screen `GridResult`, or None."""
        if name not in self.earlies:
            grid = training.load_early(self.run_dir, name)
            if grid is None:
                return None
            self.earlies[name] = grid
        return self.earlies[name]

    def targets_for(self, run):
        """The ranking targets of `run`'s group: [] for its baseline or a group without one in
        this run (the final-loss rule), None while the baseline's final stage is not done."""
        baseline = self.groups_by_run[run.name]
        if baseline is None or baseline.name == run.name:
            return []
        return stages.ranking_targets(self.config, baseline, self)

    def machine(self, run):
        return stages.machine(self.config, run, self, self.targets_for(run))

    def _load_saved_seconds(self):
        path = self.run_dir / "results.json"
        saved = json.loads(path.read_text())["configurations"] if path.exists() else {}
        return {name: summary.get("seconds") for name, summary in saved.items()}

    def _load_sessions(self):
        path = self.run_dir / SESSIONS
        return json.loads(path.read_text())["sessions"] if path.exists() else []

    def _count_finished_work(self):
        """Puts the work of earlier sessions on the bar: the finished stages (replayed by the
        machine), and the finished part of the checkpointed one."""
        for run in self.runs:
            state = self.machine(run)
            for stage in state.finished:
                self._account(stage)
                self.progress.done += stage.work
            if isinstance(state.next, plan.Stage):
                self._account(state.next)
                if self.early(state.next.name) is not None:
                    self.progress.done += state.next.early_work
                self.progress.done += self._checkpointed_work(state.next)
            elif state.next is None:
                self._close_account(run)

    def _checkpointed_work(self, stage):
        if self.checkpoint is None or self.checkpoint.name != stage.name:
            return 0.0
        return (stage.work - stage.early_work) * float(self.checkpoint.iterations[-1]) / stage.iterations

    def _account(self, stage):
        """Counts `stage`'s work against its configuration's plan; replans once a configuration
        costs more than planned (a round below, a rate beyond the grid, more edge rounds)."""
        name = stage.run.name
        if stage.name in self.accounted:
            return
        self.accounted.add(stage.name)
        self.spent[name] = self.spent.get(name, 0.0) + stage.work
        if self.spent[name] > self.planned[name]:
            self.progress.replan(self.planned[name], self.spent[name])
            self.planned[name] = self.spent[name]

    def _close_account(self, run):
        """A finished configuration: its plan becomes what it cost."""
        if run.name in self.closed:
            return
        self.closed.add(run.name)
        self.progress.replan(self.planned[run.name], self.spent.get(run.name, 0.0))
        self.planned[run.name] = self.spent.get(run.name, 0.0)

    def estimate_seconds(self):
        """The time left, as the bar shows it."""
        return self.progress.estimate_seconds()

    # ------------------------------------------------------------------ training

    def train(self):
        """Trains every stage not yet finished; returns the run folder."""
        self.progress.start()
        try:
            self._train()
        finally:
            self.progress.close()
            self._save_sessions()
        report.print_summary(self.summaries, self.targets, self.total_seconds())
        return self.run_dir

    def _ready(self, busy):
        """The next stage to start: the first configuration in run order, not in `busy`, with a
        stage ready (not waiting for its group's targets); None if there is none. Configurations
        found done are finished on the way."""
        for run in self.runs:
            if run.name in busy or run.name in self.finished:
                continue
            stage = self.machine(run).next
            if stage is None:
                seconds = self.stage_seconds.get(run.name, self.saved_seconds.get(run.name))
                self.finish_configuration(run, seconds, done=True)
            elif stage is not stages.WAIT:
                return stage
        return None

    def _train(self):
        """Stages in run order, a configuration's next one as soon as its previous one is done:
        in this process one at a time, on Ray up to one per CPU (other configurations' stages
        fill a CPU while one waits for its group's targets)."""
        self._finish_kept()
        if self.executor.ray is None:
            while (stage := self._ready(())) is not None:
                self._account(stage)
                self._train_here(stage)
            return
        pending = {}
        while True:
            while len(pending) < self.executor.capacity:
                stage = self._ready({s.run.name for s in pending.values()})
                if stage is None:
                    break
                self._account(stage)
                task = training.stage_task(stage, self.datas[stage.run.data_key], self.config)
                pending[self.executor.submit(task)] = stage
            if not pending:
                break
            outcome, handle = self.executor.next_finished(list(pending))
            stage = pending.pop(handle)
            self.progress.advance(stage.work)
            self._record(stage, outcome.result, outcome.early)
            if stage.kind != "screen":
                sweep.write_tensorboard(self.run_dir / "tensorboard", outcome, folder=stage.run.name)
            self._after(stage, outcome.seconds)

    def _finish_kept(self):
        """Adds the configurations finished or past their final stage in earlier sessions to the
        results (and writes them once)."""
        for run in self.runs:
            state = self.machine(run)
            if state.parts:
                self.finish_configuration(run, self.saved_seconds.get(run.name), write=False, done=state.next is None)
        if self.results:
            self.write()

    def _train_here(self, stage):
        self.progress.describe(stage.name)
        data = self.datas[stage.run.data_key]
        start = time.monotonic()
        early = self.early(stage.name)
        if early is None:
            early = training.train_early(stage, data)
            training.save_early(self.run_dir, stage.name, early)
            self.earlies[stage.name] = early
            self.progress.advance(stage.early_work)
            check_interrupt()
        checkpoint = self.checkpoint if self.checkpoint is not None and self.checkpoint.name == stage.name else None
        work = stage.work - stage.early_work

        def advance(fraction):
            self.progress.advance(work * fraction)

        grid = train_stage(stage, data, self.config, self.run_dir, checkpoint, advance)
        self._record(stage, grid, early)
        self._after(stage, time.monotonic() - start)

    def _record(self, stage, grid, early):
        training.save_early(self.run_dir, stage.name, early)
        self.earlies[stage.name] = early
        runstate.save_grid(self.run_dir, stage.name, grid)
        self.grids[stage.name] = grid
        if self.checkpoint is None or self.checkpoint.name == stage.name:  # the half-done one is finished
            runstate.clear_checkpoint(self.run_dir)
            self.checkpoint = None
        self.progress.stage_finished()

    def _after(self, stage, seconds):
        """After a stage: its configuration's results are written once its final (and below)
        stage is done, and again when it is done."""
        name = stage.run.name
        self.stage_seconds[name] = (self.stage_seconds.get(name, self.saved_seconds.get(name)) or 0.0) + seconds
        if stage.kind == "screen":
            return
        state = self.machine(stage.run)
        if state.parts and (stage.kind in ("final", "below") or state.next is None):
            self.finish_configuration(stage.run, self.stage_seconds[name], done=state.next is None)

    # ------------------------------------------------------------------ results as they come

    def finish_configuration(self, run, seconds, write=True, done=False):
        """Adds a configuration past its final stage to the results (`done`: all its stages);
        with `write`, rewrites results.json and the figures that hold it."""
        state = self.machine(run)
        view = records.configuration_view(self.config, run, state)
        self.views[run.name] = view
        self.results[run.name] = view["grid"]
        self.summaries[run.name] = report.configuration_record(run, view, seconds)
        if done:
            self.finished.add(run.name)
            self._close_account(run)
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
        ranking = {}
        for group, (baseline, _) in self.groups.items():
            run = self.groups_by_run.get(baseline)
            if run is not None and baseline in self.results:
                ranking[group] = stages.ranking_targets(self.config, run, self)
        excluded = {name: view["excluded"] for name, view in self.views.items()}
        self.targets = report.add_targets_and_ratios(self.summaries, self.results, self.groups, ranking, excluded)
        self._save_sessions()
        sensitivity = records.sensitivity_section(self.run_dir, self.config, self.views, self.results, self.summaries)
        records.sharpness_section(self.run_dir, self.config, self.summaries)
        rerun = records.rerun_info(self.config, self.datas, self.views, report.counting_rules())
        report.write_results(
            self.run_dir / "results.json",
            self.datas["default"],
            self.config,
            self.summaries,
            self.targets,
            self.results,
            self.sessions,
            extra={"sensitivity": sensitivity, "rerun": rerun},
        )
        plots.plot_figures(self.run_dir, self.config, self.figures, self.results, self.summaries, only=only)

    def interrupted_message(self):
        """What was kept, for the Ctrl-C line."""
        screens = sum(f"{run.name}.screen" in self.grids for run in self.runs)
        finals = sum(run.name in self.grids for run in self.runs)
        checkpoint = runstate.load_checkpoint(self.run_dir)
        half = f" and {checkpoint.name} at iteration {int(checkpoint.iterations[-1]):,}" if checkpoint else ""
        return f"kept {finals} of {len(self.runs)} configurations (rate screens: {screens} of {len(self.runs)}){half}"
