"""Reproduces the paper's regression figures on the UCI gas sensor Ethanol problem.

    python -m experiments.gas_sensor --data-dir ../shared/data/gas_sensor [--figure depth init ...]

Figures (Arora, Cohen & Hazan 2018, Section 8 and the authors' blog):
- depth:      l2 and l4 loss, depths 1-4 with hidden width 1 and a wide one, and next to
              depths 2 and 3 the end-to-end update rule (eq. 24) on a single matrix;
- lr-grid:    for every configuration, the final loss over the learning-rate grid, and the
              best rate (the fastest to the shared target loss);
- optimizers: l4: GD depth 1/2/3, AdaGrad, AdaDelta, Adam depth 1 and 2, each at its best rate;
- init:       l4: near-zero versus identity (linear residual) initialisation of deep chains.

All runs are full-batch, no bias (features and target are z-scored), and train every point
of the learning-rate grid together (`tf_overparam.fullbatch`). A run folder holds
config.json (with the data folder read and each file's sha256 and rows), results.json
(rewritten atomically after every configuration), one PNG per figure, TensorBoard logs
(`tensorboard --logdir <run folder>/tensorboard`), every finished configuration's grid
(grids/*.npz) and the engine checkpoint of the one in progress (checkpoint.npz, rewritten at
every log point). Ctrl-C keeps all of it; `--resume <run folder>` with the same options
continues where it stopped. `--out` never reuses a folder that holds a run.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

from experiments import _runstate
from experiments._common import (
    RunInterrupted,
    cli,
    format_seconds,
    lazy_import,
    lazy_keras_tensorflow_pyplot,
    make_run_dir,
    quiet_tensorflow,
    resume_command,
    user_errors,
    write_json_atomic,
)

# TensorFlow, Keras and matplotlib load at first use: --help and argument errors return at once.
keras, tf, plt = lazy_keras_tensorflow_pyplot()
initializers = lazy_import("tf_overparam.initializers")
gas_sensor = lazy_import("tf_overparam.datasets.gas_sensor")
fullbatch = lazy_import("tf_overparam.fullbatch")
callbacks = lazy_import("tf_overparam.callbacks")

DATA_ENV_VAR = "TF_OVERPARAM_GAS_SENSOR_DIR"  # tf_overparam.datasets.gas_sensor.ENV_VAR (tested)
FIGURES = ("depth", "lr-grid", "optimizers", "init")
TARGET_FACTORS = (4.0, 2.0, 1.0)  # targets: these multiples of depth-1 GD's best final loss


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run. `iterations` is the horizon of every run (the paper's l4 figure: 10^6)."""

    figures: tuple = FIGURES
    iterations: int = 1_000_000
    grid_points: int = 9
    # log10 range of the learning-rate grid per (optimizer, loss p); the stable GD rates end
    # near 2 / curvature: ~3e-2 for l2 and ~5e-3 for l4 on this data.
    grid_decades: tuple = (
        ("gd", 2, -3.0, -1.0),
        ("gd", 4, -4.0, -2.0),
        ("adagrad", 4, -4.0, 0.0),
        ("adam", 4, -4.0, 0.0),
        ("adadelta", 4, -2.0, 2.0),
    )
    seeds: tuple = (0,)
    depths: tuple = (1, 2, 3, 4)
    wide_units: int = 16
    init_stddev: float = 0.01
    log_points: int = 600
    data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: a short horizon and a coarse grid."""
        quick = dict(iterations=2000, grid_points=4, depths=(1, 2), wide_units=4, log_points=40)
        return cls(**{**quick, **overrides})

    def learning_rates(self, spec):
        """The log grid of learning rates for a configuration."""
        for optimizer, p, low, high in self.grid_decades:
            if optimizer == spec.optimizer and p == spec.p:
                return np.logspace(low, high, self.grid_points)
        raise ValueError(f"no learning-rate grid for optimizer {spec.optimizer!r} with l{spec.p:g} loss")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One configuration: a named `ChainSpec` (its loss l_p inside), a label and a line style."""

    name: str
    label: str
    spec: "fullbatch.ChainSpec"
    style: str = "-"


def configurations(config):
    """Every configuration the selected figures need, keyed by figure, in run order."""
    near_zero = initializers.NearZero(config.init_stddev)
    deep = [d for d in config.depths if d > 1]

    def gd(p, depth, width=1, update="chain", optimizer="gd", init=near_zero, tag=""):
        kind = {"chain": optimizer, "end_to_end": "e2e"}[update]
        width_tag = f"-w{width}" if depth > 1 and update == "chain" else ""
        name = f"l{p:g}/{kind}-d{depth}{width_tag}{tag}"
        label = f"{'eq. 24 ' if update == 'end_to_end' else optimizer.upper() + ' '}depth {depth}"
        label += f", width {width}" if width_tag else ""
        label += tag.replace("-", ", ")
        spec = fullbatch.ChainSpec(depth=depth, hidden_units=width, update=update, optimizer=optimizer, initializer=init, p=p)
        style = ":" if update == "end_to_end" else "--" if width_tag and width > 1 else "-"
        return RunConfig(name, label, spec, style)

    figures = {}
    if "depth" in config.figures or "lr-grid" in config.figures:
        figures["depth"] = [
            run
            for p in (4, 2)  # the headline (l4) first
            for run in [gd(p, 1)]
            + [gd(p, d, w) for w in (1, config.wide_units) for d in deep]
            + [gd(p, d, update="end_to_end") for d in deep[:2]]
        ]
    if "optimizers" in config.figures:
        figures["optimizers"] = [gd(4, 1)] + [gd(4, d) for d in deep[:2]] + [
            gd(4, 1, optimizer="adagrad"),
            gd(4, 1, optimizer="adadelta"),
            gd(4, 1, optimizer="adam"),
            gd(4, 2, optimizer="adam"),
        ]
    if "init" in config.figures:
        identity = initializers.Identity()
        figures["init"] = [gd(4, 1)] + [
            run for d in deep for run in (gd(4, d), gd(4, d, init=identity, tag="-identity"))
        ]
    return figures


def iterations_to_reach(iterations, losses, target):
    """The first logged iteration at which `losses` <= `target`, or None."""
    reached = np.flatnonzero(np.nan_to_num(losses, nan=np.inf) <= target)
    return int(iterations[reached[0]]) if reached.size else None


def summarize(result, targets):
    """Per-configuration summary of a `GridResult`: best rate (fastest to the last reachable
    target, ties and misses by final loss), final losses and iterations to each target."""
    final = result.losses[-1]
    finite = np.isfinite(final)
    if not finite.any():
        return {"diverged": True, "best_learning_rate": None, "final_loss": None, "iterations_to_target": {}}

    def rank(g):
        reached = [iterations_to_reach(result.iterations, result.losses[:, g], t) for t in targets]
        hardest = next((i for i in range(len(targets) - 1, -1, -1) if reached[i] is not None), -1)
        return (-hardest, reached[hardest] if hardest >= 0 else 0, final[g])

    best = min(np.flatnonzero(finite), key=rank)
    curve = result.losses[:, best]
    return {
        "diverged": False,
        "best_learning_rate": float(result.learning_rates[best]),
        "best_seed": int(result.seeds[best]),
        "final_loss": float(final[best]),
        "iterations_to_target": {f"{t:.6g}": iterations_to_reach(result.iterations, curve, t) for t in targets},
    }


def _grid_table(result):
    return {
        "learning_rates": result.learning_rates,
        "seeds": result.seeds,
        "final_losses": [None if not math.isfinite(v) else float(v) for v in result.losses[-1]],
        "diverged_at": [None if v < 0 else int(v) for v in result.diverged_at],
    }


class TensorBoardLogger:
    """Writes one TensorBoard run per grid point: the loss and, every `diagnostics_every`
    logs, the chain's state (`tf_overparam.callbacks.write_chain_summaries`: balancedness,
    W_e's spectrum, effective learning rate eta ||W_e||^{2-2/N} of eq. 27)."""

    def __init__(self, root, run, learning_rates, seeds, diagnostics_every):
        self.writers = [
            tf.summary.create_file_writer(str(root / run.name / f"lr_{rate:.3g}_seed_{seed}"))
            for rate, seed in zip(learning_rates, seeds)
        ]
        self.learning_rates = learning_rates
        self.diagnostics_every = diagnostics_every
        self.calls = 0

    def __call__(self, trainer, iteration, losses):
        with_diagnostics = self.calls % self.diagnostics_every == 0
        self.calls += 1
        factors = [f.numpy() for f in trainer.factors] if with_diagnostics else None
        for g, writer in enumerate(self.writers):
            if not math.isfinite(losses[g]):
                continue
            with writer.as_default(step=iteration):
                tf.summary.scalar("loss", losses[g])
                if with_diagnostics:
                    callbacks.write_chain_summaries(
                        [f[g] for f in factors], iteration, self.learning_rates[g], depth=trainer.spec.depth
                    )

    def close(self):
        for writer in self.writers:
            writer.close()


def run_configuration(run, data, config, run_dir, progress, checkpoint=None):
    """Trains one configuration over the whole grid; returns its `GridResult`. The engine
    state is checkpointed (atomically) at every log point; `checkpoint` (from
    `_runstate.load_checkpoint`) continues a half-done one."""
    trainer = fullbatch.FullBatchTrainer(
        data.x, data.y, run.spec, config.learning_rates(run.spec), seeds=config.seeds
    )
    schedule = fullbatch.log_schedule(config.iterations, config.log_points)
    logger = TensorBoardLogger(
        run_dir / "tensorboard", run, trainer.learning_rates, trainer.seeds, max(1, len(schedule) // 50)
    )
    logged = []
    if checkpoint is not None:
        _, state, iterations, losses = checkpoint
        trainer.set_state(state)
        logged = list(losses)
        logger.calls = len(logged)  # diagnostics at the same log points as an uninterrupted run
        progress.update(trainer.iteration)
    last = [trainer.iteration]

    def on_log(trainer, iteration, losses):
        logged.append(losses)
        # Checkpoint first: an interruption before TensorBoard's write loses that step rather
        # than writing it twice on resume.
        _runstate.save_checkpoint(run_dir, run.name, trainer.get_state(), schedule[: len(logged)], logged)
        logger(trainer, iteration, losses)
        progress.update(iteration - last[0])
        last[0] = iteration

    try:
        result = trainer.run(config.iterations, schedule=schedule[len(logged):], on_log=on_log)
    finally:
        logger.close()
    return dataclasses.replace(result, iterations=schedule, losses=np.asarray(logged, dtype=np.float64))


def _plot_panels(path, title_runs, draw_run, xlabel, ylabel, log_x=False):
    """One panel per (title, runs); `draw_run(ax, color, run)` draws one configuration."""
    fig, axes = plt.subplots(1, len(title_runs), figsize=(7 * len(title_runs), 5), squeeze=False)
    for ax, (title, runs) in zip(axes[0], title_runs):
        for i, run in enumerate(runs):
            draw_run(ax, f"C{i % 10}", run)
        if log_x:
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path, title_runs, results, summaries):
    """Each configuration's loss curve at its best learning rate."""

    def draw(ax, color, run):
        summary = summaries[run.name]
        if summary.get("best_learning_rate") is None:
            return
        result, g = results[run.name], _best_index(results[run.name], summary)
        label = f"{run.label} (lr {summary['best_learning_rate']:.2g})"
        ax.plot(result.iterations, result.losses[:, g], run.style, color=color, label=label)

    _plot_panels(path, title_runs, draw, "iteration", "training loss")


def plot_lr_grid(path, title_runs, results):
    """Final loss against learning rate for every configuration; diverged rates marked x."""

    def draw(ax, color, run):
        result = results[run.name]
        rates, final = result.learning_rates, result.losses[-1]
        ax.plot(rates, final, "o" + run.style, color=color, label=run.label, markersize=4)
        diverged = ~np.isfinite(final)
        if diverged.any():
            ax.plot(rates[diverged], np.full(diverged.sum(), 1.5 * np.nanmax(result.losses[0])), "x", color=color)

    _plot_panels(path, title_runs, draw, "learning rate (x: diverged)", "final training loss", log_x=True)


def _best_index(result, summary):
    return int(
        np.flatnonzero(
            (result.learning_rates == summary["best_learning_rate"]) & (result.seeds == summary["best_seed"])
        )[0]
    )


def add_targets_and_ratios(summaries, results, runs_by_loss):
    """Shared targets per loss (multiples of depth-1 GD's best final loss) and every
    configuration's acceleration ratio: depth-1 iterations / its iterations, per target."""
    table = {}
    for p, runs in runs_by_loss.items():
        baseline = f"l{p:g}/gd-d1"
        if baseline not in results:
            continue
        finals = results[baseline].losses[-1]
        if not np.isfinite(finals).any():
            continue
        targets = [factor * float(np.nanmin(finals)) for factor in TARGET_FACTORS]
        for run in runs:
            summaries[run.name].update(summarize(results[run.name], targets))
        base_iterations = summaries[baseline]["iterations_to_target"]
        for run in runs:
            own = summaries[run.name]["iterations_to_target"]
            summaries[run.name]["acceleration_vs_depth1"] = {
                key: (base_iterations[key] / own[key]) if own.get(key) and base_iterations.get(key) else None
                for key in base_iterations
            }
        table[f"l{p:g}"] = targets
    return table


# Measured: the full run (25 configurations, 10^6 iterations, 9 rates) took 126 min on 2 cores.
SECONDS_PER_ITERATION = 3.0e-4  # per configuration and iteration, for a grid of 9 points
SECONDS_PER_CONFIGURATION = 3.0  # tracing and setup


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--figure", nargs="+", choices=FIGURES + ("all",), default=["all"], help="which figures (default all)"
    )
    parser.add_argument(
        "--iterations", type=int,
        help="full-batch iterations per run (default 1e6: all figures take about 2 hours on 2 CPU cores)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="number of initialisation seeds (default 1)")
    parser.add_argument("--out", help="output folder, new or empty (default runs/gas_sensor/<UTC time>)")
    parser.add_argument(
        "--resume", metavar="DIR",
        help="continue the interrupted run in DIR (give the same options; the data may have moved)",
    )
    parser.add_argument("--data-dir", help=f"folder of UCI batch*.dat files (or set {DATA_ENV_VAR})")
    parser.add_argument("--download", action="store_true", help="download the UCI archive if no data is found")
    parser.add_argument("--quick", action="store_true", help="CI scale: a short horizon and a coarse grid (~1 min)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def parse_config(argv):
    """The `Config` of a command line (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be a positive int, got {args.iterations}")
    if args.seeds < 1:
        parser.error(f"--seeds must be a positive int, got {args.seeds}")
    if args.resume and args.out:
        parser.error("--resume continues a run in its own folder; leave out --out")
    overrides = dict(
        figures=FIGURES if "all" in args.figure else tuple(dict.fromkeys(args.figure)),
        seeds=tuple(range(args.seeds)), data_dir=args.data_dir, out=args.resume or args.out,
    )
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    return (Config.quick(**overrides) if args.quick else Config(**overrides)), args


def load_data(config, download):
    """The Ethanol data; a missing folder, an empty or corrupt file or a failed download is a
    `UserError` (one line on the command line)."""
    with user_errors():
        return gas_sensor.load_ethanol(config.data_dir, download=download)


def open_run(config, data, resume):
    """The run folder: a new one (config.json written), or with `resume` the folder of a run
    with the same config and data files (by sha256), whose saved summaries are returned."""
    record = {**_jsonable(config), "data": data.description, "data_source": data.source, "data_files": data.files}
    if not resume:
        run_dir = make_run_dir(config.out, "gas_sensor")
        write_json_atomic(run_dir / "config.json", record)
        return run_dir, {}
    saved = _runstate.check_resumable(config.out, _jsonable(config), data.files, ignore=("out", "data_dir"))
    run_dir = pathlib.Path(config.out)
    if saved.get("data_source") != data.source:  # same files, moved: record where they are read now
        write_json_atomic(run_dir / "config.json", {**saved, "data_source": data.source, "data_files": data.files})
    results = run_dir / "results.json"
    return run_dir, (json.loads(results.read_text())["configurations"] if results.exists() else {})


def estimate_seconds(config, runs):
    """Rough wall time of a run from the measured full run's speed."""
    grid = config.grid_points * len(config.seeds) / 9.0
    return len(runs) * (SECONDS_PER_CONFIGURATION + config.iterations * SECONDS_PER_ITERATION * max(grid, 0.25))


@cli
def main(argv=None):
    config, args = parse_config(argv)
    quiet_tensorflow()
    data = load_data(config, args.download)
    run_dir, saved = open_run(config, data, resume=args.resume is not None)
    print(f"data: {data.description}\nfrom: {data.source}\noutput: {run_dir}")

    figures = configurations(config)
    runs = list({run.name: run for figure_runs in figures.values() for run in figure_runs}.values())
    print(f"{len(runs)} configurations x {config.iterations:,} iterations x {config.grid_points} rates x "
          f"{len(config.seeds)} seeds; estimated total time {format_seconds(estimate_seconds(config, runs))}")
    try:
        return train_all(config, data, run_dir, figures, runs, saved)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(run_dir, runs, argv)) from None


def interrupted_message(run_dir, runs, argv):
    done = [r.name for r in runs if _runstate.load_grid(run_dir, r.name, fullbatch.GridResult) is not None]
    checkpoint = _runstate.load_checkpoint(run_dir)
    half = f" and {checkpoint[0]} at iteration {int(checkpoint[2][-1]):,}" if checkpoint else ""
    return (f"kept {len(done)} of {len(runs)} configurations{half} in {run_dir}; "
            f"continue with: {resume_command('experiments.gas_sensor', run_dir, argv)}")


def train_all(config, data, run_dir, figures, runs, saved):
    """Trains every configuration not yet finished in `run_dir`, writing results.json, the
    figures and the finished grids after each one; returns `run_dir`."""
    runs_by_loss = {p: [r for r in runs if r.spec.p == p] for p in sorted({r.spec.p for r in runs})}
    results, summaries, started = {}, {}, time.time()
    checkpoint = _runstate.load_checkpoint(run_dir)
    progress = tqdm(total=config.iterations * len(runs), unit="it", unit_scale=True, file=sys.stdout, mininterval=5)
    for run in runs:
        progress.set_description(run.name)
        finished = _runstate.load_grid(run_dir, run.name, fullbatch.GridResult)
        if finished is not None and run.name in saved:  # kept from the interrupted run
            results[run.name] = finished
            summaries[run.name] = {k: saved[run.name][k] for k in ("label", "loss_p", "spec", "grid", "seconds")}
            progress.update(config.iterations)
        else:
            run_started = time.time()
            resume_from = checkpoint if checkpoint is not None and checkpoint[0] == run.name else None
            results[run.name] = run_configuration(run, data, config, run_dir, progress, resume_from)
            summaries[run.name] = {
                "label": run.label, "loss_p": run.spec.p, "spec": _jsonable(run.spec),
                "grid": _grid_table(results[run.name]), "seconds": time.time() - run_started,
            }
            _runstate.save_grid(run_dir, run.name, results[run.name])
        targets = add_targets_and_ratios(summaries, results, {p: [r for r in rs if r.name in results] for p, rs in runs_by_loss.items()})
        _write_results(run_dir, data, config, summaries, targets, results, time.time() - started)
        if checkpoint is None or checkpoint[0] == run.name:  # the half-done one is finished now
            _runstate.clear_checkpoint(run_dir)
            checkpoint = None
        _plot_figures(run_dir, config, figures, results, summaries)
    progress.close()
    _print_summary(summaries, targets, time.time() - started)
    return run_dir


def _write_results(run_dir, data, config, summaries, targets, results, seconds):
    curves = {}
    for name, summary in summaries.items():
        if summary.get("best_learning_rate") is not None:
            g = _best_index(results[name], summary)
            curves[name] = {"iterations": results[name].iterations, "loss": results[name].losses[:, g]}
    write_json_atomic(
        run_dir / "results.json",
        {
            "data": data.description, "batches": list(data.batches), "rows": int(data.x.shape[0]),
            "iterations": config.iterations, "targets": targets, "seconds": seconds,
            "configurations": summaries, "best_curves": curves,
        },
    )


def _plot_figures(run_dir, config, figures, results, summaries):
    """Draws every figure from the configurations finished so far (called after each one)."""

    def panels(title_runs):
        done = [(title, [r for r in runs if r.name in results]) for title, runs in title_runs]
        return [(title, runs) for title, runs in done if runs]

    def by_loss(runs):
        return panels([(f"l{p} loss", [r for r in runs if r.spec.p == p]) for p in (4, 2)])

    plots = []
    if "depth" in figures:
        if "depth" in config.figures:
            plots.append((plot_curves, "depth.png", by_loss(figures["depth"]), (results, summaries)))
        if "lr-grid" in config.figures:
            plots.append((plot_lr_grid, "lr_grid.png", by_loss(figures["depth"]), (results,)))
    if "optimizers" in figures:
        title_runs = panels([("l4 loss: optimizers", figures["optimizers"])])
        plots.append((plot_curves, "optimizers.png", title_runs, (results, summaries)))
    if "init" in figures:
        title_runs = panels([("l4 loss: near-zero vs identity init", figures["init"])])
        plots.append((plot_curves, "init.png", title_runs, (results, summaries)))
    for plot, name, title_runs, arguments in plots:
        if title_runs:
            plot(run_dir / name, title_runs, *arguments)


def _print_summary(summaries, targets, seconds):
    print(f"\n{'configuration':28s} {'best lr':>9s} {'final loss':>11s}  acceleration vs depth 1 at targets")
    for name, s in summaries.items():
        if s.get("diverged") or s.get("best_learning_rate") is None:
            print(f"{name:28s} {'diverged':>9s}")
            continue
        ratios = " ".join("-" if r is None else f"{r:6.2f}" for r in s.get("acceleration_vs_depth1", {}).values())
        print(f"{name:28s} {s['best_learning_rate']:9.2g} {s['final_loss']:11.4g}  {ratios}")
    for loss, values in targets.items():
        print(f"targets {loss}: " + ", ".join(f"{v:.4g}" for v in values))
    print(f"total time: {seconds:.0f} s")


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, keras.initializers.Initializer):
        return keras.initializers.serialize(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
