"""Reproduces the paper's regression figures on the UCI gas sensor Ethanol problem.

    python -m experiments.gas_sensor --data-dir ../shared/data/gas_sensor [--figure depth init ...]

Figures (Arora, Cohen & Hazan 2018, Section 8 and the authors' blog):
- depth:      l2 and l4 loss, depths 1-4 with hidden width 1 and a wide one, and next to
              depths 2 and 3 the end-to-end update rule (eq. 24) on a single matrix;
- lr-grid:    for every configuration, the final loss over the learning-rate grid, and the
              best rate (the fastest to the shared target loss);
- optimizers: l4: GD depth 1/2/3, AdaGrad, AdaDelta, Adam depth 1 and 2, each at its best rate;
- init:       l4: near-zero versus identity (linear residual) initialisation of deep chains;
- preprocessing (not in "all"): l4 GD depth 1 against depth 2 under each scaling of
              `experiments.data.gas_sensor.PREPROCESSINGS`, without and with a bias feature.

All runs are full-batch, no bias (features and target are z-scored), and train every point
of the learning-rate grid together (`experiments.engine.fullbatch`). A run folder holds
config.json (with the data folder read and each file's sha256 and rows), results.json
(rewritten atomically after every configuration), one PNG per figure, TensorBoard logs
(`tensorboard --logdir <run folder>/tensorboard`), every finished configuration's grid
(grids/*.npz) and the engine checkpoint of the one in progress (checkpoint.npz, rewritten at
every log point). Ctrl-C keeps all of it; `--resume <run folder>` with the same options
continues where it stopped. `--out` never reuses a folder that holds a run.

Rates and seeds (issue 12). Each configuration runs in two stages:
1. screen: the coarse log grid (`grid_points` rates), seed 0, for `screen_fraction` of the
   horizon (default all of it: a deep chain's effective rate grows with its end-to-end norm,
   eq. 27, so a rate stable for the first 10% can diverge later; measured, l4 GD depth 2 at
   1.3e-3..2.4e-3 diverged after 57k-583k iterations); the screen's best rate is the unflagged
   one with the lowest final loss;
2. final: that rate and `refine_points` log-even rates inside each interval to its grid
   neighbours (a best rate on the grid's edge gets the neighbour one grid step beyond), with
   every seed (`headline_seeds` for HEADLINE configurations, `seeds` for the rest), for the
   whole horizon. TensorBoard, tables and figures come from this stage.
Per target, the best rate is the one with the smallest median over seeds of the SUSTAINED
iterations-to-target (`experiments._curves`: the loss stays below the target at every later
log), among rates none of whose seeds is flagged (diverged, incl. bounded blow-ups; stalled
above its best; oscillating). A best rate on the edge of the final rates is flagged in the
table. Speedups are ratios of medians, with the range of the per-seed ratios; recovered spikes
are counted. Stages run in-process, or as Ray tasks with --workers/--address (`_sweep`).
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

from experiments import _curves, _rates, _runstate, _sweep
from experiments._common import (
    RunInterrupted,
    cli,
    format_seconds,
    lazy_import,
    lazy_keras_tensorflow_pyplot,
    make_run_dir,
    provenance,
    quiet_tensorflow,
    resume_command,
    user_errors,
    write_json_atomic,
)

# TensorFlow, Keras and matplotlib load at first use: --help and argument errors return at once.
keras, _, plt = lazy_keras_tensorflow_pyplot()
initializers = lazy_import("tf_overparam.initializers")
gas_sensor = lazy_import("experiments.data.gas_sensor")
fullbatch = lazy_import("experiments.engine.fullbatch")

DATA_ENV_VAR = "TF_OVERPARAM_GAS_SENSOR_DIR"  # experiments.data.gas_sensor.ENV_VAR (tested)
FIGURES = ("depth", "lr-grid", "optimizers", "init")
EXTRA_FIGURES = ("preprocessing",)  # run only when asked for
HEADLINE = ("l4/gd-d1", "l4/gd-d2-w1", "l4/e2e-d2")  # configurations run with `headline_seeds`
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
    seeds: tuple = (0, 1, 2)
    headline_seeds: tuple = (0, 1, 2, 3, 4)
    screen_fraction: float = 1.0
    refine_points: int = 1
    depths: tuple = (1, 2, 3, 4)
    wide_units: int = 16
    init_stddev: float = 0.01
    log_points: int = 600
    data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: a short horizon and a coarse grid."""
        # An odd number of seeds: a median is then one seed's value (with 2 seeds it is their
        # mean, and the hardest target, the best median final loss, may be reached by neither).
        quick = dict(
            iterations=2000,
            grid_points=4,
            depths=(1, 2),
            wide_units=4,
            log_points=40,
            seeds=(0,),
            headline_seeds=(0, 1, 2),
        )
        return cls(**{**quick, **overrides})

    def learning_rates(self, spec, shift=0.0):
        """The log grid of learning rates for a configuration, moved by `shift` decades."""
        for optimizer, p, low, high in self.grid_decades:
            if optimizer == spec.optimizer and p == spec.p:
                return np.logspace(low + shift, high + shift, self.grid_points)
        raise ValueError(f"no learning-rate grid for optimizer {spec.optimizer!r} with l{spec.p:g} loss")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One configuration: a named `ChainSpec` (its loss l_p inside), a label and a line style."""

    name: str
    label: str
    spec: "fullbatch.ChainSpec"
    style: str = "-"
    data_key: str = "default"  # which preprocessing of the data (see `load_variants`)
    rate_shift: float = 0.0  # decades by which its coarse grid is moved


@dataclasses.dataclass(frozen=True)
class Stage:
    """One engine run of a configuration: the screen (coarse grid, one seed, short horizon)
    or the final stage (refined rates, every seed, the whole horizon)."""

    run: RunConfig
    kind: str
    learning_rates: tuple
    seeds: tuple
    iterations: int

    @property
    def name(self):
        return self.run.name if self.kind == "final" else f"{self.run.name}.screen"


def seeds_for(config, name):
    """The seeds of a configuration's final stage."""
    return config.headline_seeds if name in HEADLINE else config.seeds


def screen_stage(config, run):
    """The screen of a configuration: the coarse grid, seed 0, `screen_fraction` of the horizon."""
    rates = tuple(config.learning_rates(run.spec, run.rate_shift))
    return Stage(run, "screen", rates, (config.seeds[0],), max(1, round(config.iterations * config.screen_fraction)))


def final_stage(config, run, screen):
    """The final stage after `screen` (a `GridResult`): the screen's best rate (unflagged,
    lowest final loss) and `refine_points` rates on each side of it, with every seed."""
    reports = [_curves.curve_report(screen.iterations, screen.losses[:, g], []) for g in range(screen.losses.shape[1])]
    coarse = np.unique(screen.learning_rates)
    best = _rates.headline_rate(screen.learning_rates, screen.seeds, reports, screen.losses[-1])
    best = coarse[0] if best is None else best  # all flagged: refine below the smallest rate
    rates = np.sort(np.append(_rates.refine_around(coarse, best, config.refine_points), best))
    return Stage(run, "final", tuple(float(r) for r in rates), tuple(seeds_for(config, run.name)), config.iterations)


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
        spec = fullbatch.ChainSpec(
            depth=depth, hidden_units=width, update=update, optimizer=optimizer, initializer=init, p=p
        )
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
        figures["optimizers"] = (
            [gd(4, 1)]
            + [gd(4, d) for d in deep[:2]]
            + [
                gd(4, 1, optimizer="adagrad"),
                gd(4, 1, optimizer="adadelta"),
                gd(4, 1, optimizer="adam"),
                gd(4, 2, optimizer="adam"),
            ]
        )
    if "init" in config.figures:
        identity = initializers.Identity()
        figures["init"] = [gd(4, 1)] + [
            run for d in deep for run in (gd(4, d), gd(4, d, init=identity, tag="-identity"))
        ]
    if "preprocessing" in config.figures:
        figures["preprocessing"] = [
            dataclasses.replace(
                run, name=f"pre/{key}/{run.name.split('/')[1]}", label=f"{run.label}, {key}", data_key=key
            )
            for key in variant_keys()
            for run in (gd(4, 1), gd(4, 2))
        ]
    return figures


def variant_keys():
    """The data variants of the preprocessing figure: scheme, then scheme+bias."""
    return [f"{scheme}{tag}" for scheme in gas_sensor.PREPROCESSINGS for tag in ("", "+bias")]


def load_variants(config, data, download, runs):
    """The data of every `data_key` the runs use ("default": `data`, as loaded), and each
    run's grid moved by log10(lambda_z / lambda) - (2 - 2/N) log10(|w*| / |w*_z|): lambda is
    the top eigenvalue of the l4 loss's Hessian at w = 0 (3 mean(y_i^2 x_i x_i^T)), which
    bounds depth 1's stable rate, and |w*| the norm of the least-squares solution, whose
    power 2 - 2/N is the factor by which depth N's effective rate grows (eq. 27); _z marks
    the z-scored data the default grids are made for."""
    keys = {run.data_key for run in runs} - {"default"}
    if not keys:
        return {"default": data}, runs
    with user_errors():
        raw = gas_sensor.load_ethanol(config.data_dir, normalize=False, download=download)
    datas = {"default": data}
    for key in keys:
        scheme, _, bias = key.partition("+")
        datas[key] = gas_sensor.preprocess(raw, scheme, bias=bool(bias))

    def scales(d):
        x, y = d.x.astype(np.float64), d.y.astype(np.float64)
        curvature = float(np.linalg.eigvalsh(3 * (x * y**2).T @ x / x.shape[0])[-1])
        return curvature, float(np.linalg.norm(np.linalg.lstsq(x, y, rcond=None)[0]))

    reference = scales(gas_sensor.preprocess(raw, "zscore"))
    ratios = {key: [r / s for r, s in zip(reference, scales(datas[key]))] for key in keys}

    def shift(run):
        if run.data_key == "default":
            return 0.0
        curvature, norm = ratios[run.data_key]
        return math.log10(curvature) + (2 - 2 / run.spec.depth) * math.log10(norm)

    return datas, [dataclasses.replace(r, rate_shift=shift(r)) for r in runs]


def _key(target):
    return f"{target:.6g}"


def _points_at(result, rate):
    return np.flatnonzero(result.learning_rates == rate)


def summarize(result, targets):
    """Per-configuration summary of a final stage's `GridResult` under the counting rules of
    `experiments._curves`: per target the best rate by the median over seeds (`_rates.
    choose_rates`), the configuration's best rate (the one of the hardest target reached,
    else the unflagged rate with the lowest median final loss), its median final loss and
    range, and per grid point the flags and recovered spikes."""
    reports = [
        _curves.curve_report(result.iterations, result.losses[:, g], targets) for g in range(result.losses.shape[1])
    ]
    finals = result.losses[-1]
    flags = {
        "diverged_at": [r["diverged_at"] for r in reports],
        "spikes": [r["spikes"] for r in reports],
        "largest_spike": [r["largest_spike"] for r in reports],
        "stalled": [r["stalled"] for r in reports],
        "oscillating": [r["oscillating"] for r in reports],
    }
    choices = _rates.choose_rates(result.learning_rates, result.seeds, reports, len(targets), finals)
    best = _rates.headline_rate(result.learning_rates, result.seeds, reports, finals)
    if best is None:
        return {
            "diverged": all(r["diverged_at"] is not None for r in reports),
            "best_learning_rate": None,
            "final_loss": None,
            "iterations_to_target": {},
            "per_target": {},
            "flags": flags,
        }
    points = _points_at(result, best)
    return {
        "diverged": False,
        "best_learning_rate": float(best),
        "best_on_edge": _rates.on_edge(result.learning_rates, best),
        "final_loss": float(np.median(finals[points])),
        "final_loss_range": [float(finals[points].min()), float(finals[points].max())],
        "spikes_at_best": int(sum(reports[g]["spikes"] for g in points)),
        "iterations_to_target": {_key(t): c["median"] for t, c in zip(targets, choices)},
        "per_target": {_key(t): c for t, c in zip(targets, choices)},
        "flags": flags,
    }


def _grid_table(result):
    return {
        "learning_rates": result.learning_rates,
        "seeds": result.seeds,
        "final_losses": [None if not math.isfinite(v) else float(v) for v in result.losses[-1]],
        "diverged_at": [None if v < 0 else int(v) for v in result.diverged_at],
    }


class TensorBoardLogger:
    """Writes one TensorBoard run per grid point as training goes (`_sweep.write_log_point`:
    the loss and, every `diagnostics_every` logs, the chain's state through
    `tf_overparam.callbacks.write_chain_summaries`), the events a Ray task's driver writes."""

    def __init__(self, root, name, learning_rates, seeds, diagnostics_every):
        self.writers = _sweep.tensorboard_writers(root, name, learning_rates, seeds)
        self.learning_rates = learning_rates
        self.diagnostics_every = diagnostics_every
        self.calls = 0

    def __call__(self, trainer, iteration, losses):
        with_diagnostics = self.calls % self.diagnostics_every == 0
        self.calls += 1
        factors = _sweep.chain_state(trainer) if with_diagnostics else None
        _sweep.write_log_point(self.writers, self.learning_rates, iteration, losses, factors, trainer.spec.depth)

    def close(self):
        for writer in self.writers:
            writer.close()


def diagnostics_every(schedule):
    """Diagnostics (SVD, balancedness) at every n-th log point: about 50 per run."""
    return max(1, len(schedule) // 50)


def run_configuration(stage, data, config, run_dir, progress, checkpoint=None):
    """Trains one `Stage` over its grid in this process; returns its `GridResult`. The engine
    state is checkpointed (atomically) at every log point; `checkpoint` (from
    `_runstate.load_checkpoint`) continues a half-done one. Only final stages log to
    TensorBoard."""
    run = stage.run
    trainer = fullbatch.FullBatchTrainer(data.x, data.y, run.spec, stage.learning_rates, seeds=stage.seeds)
    schedule = fullbatch.log_schedule(stage.iterations, config.log_points)
    logger = None
    if stage.kind == "final":
        logger = TensorBoardLogger(
            run_dir / "tensorboard", run.name, trainer.learning_rates, trainer.seeds, diagnostics_every(schedule)
        )
    logged = []
    if checkpoint is not None:
        _, state, iterations, losses = checkpoint
        trainer.set_state(state)
        logged = list(losses)
        if logger is not None:
            logger.calls = len(logged)  # diagnostics at the same log points as an uninterrupted run
        progress.update(trainer.iteration)
    last = [trainer.iteration]

    def on_log(trainer, iteration, losses):
        logged.append(losses)
        # Checkpoint first: an interruption before TensorBoard's write loses that step rather
        # than writing it twice on resume.
        _runstate.save_checkpoint(run_dir, stage.name, trainer.get_state(), schedule[: len(logged)], logged)
        if logger is not None:
            logger(trainer, iteration, losses)
        progress.update(iteration - last[0])
        last[0] = iteration

    try:
        result = trainer.run(stage.iterations, schedule=schedule[len(logged) :], on_log=on_log)
    finally:
        if logger is not None:
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


def best_band(result, summary):
    """The median loss curve over seeds at the best rate, and its min and max (the band)."""
    losses = result.losses[:, _points_at(result, summary["best_learning_rate"])]
    return np.median(losses, axis=1), np.min(losses, axis=1), np.max(losses, axis=1)


def plot_curves(path, title_runs, results, summaries):
    """Each configuration's median loss curve over seeds at its best learning rate, with the
    band from the lowest to the highest seed."""

    def draw(ax, color, run):
        summary = summaries[run.name]
        if summary.get("best_learning_rate") is None:
            return
        result = results[run.name]
        median, low, high = best_band(result, summary)
        seeds = len(_points_at(result, summary["best_learning_rate"]))
        edge = ", on edge" if summary.get("best_on_edge") else ""
        label = f"{run.label} (lr {summary['best_learning_rate']:.3g}{edge}, {seeds} seeds)"
        ax.plot(result.iterations, median, run.style, color=color, label=label)
        ax.fill_between(result.iterations, low, high, color=color, alpha=0.2, linewidth=0)

    _plot_panels(path, title_runs, draw, "iteration", "training loss")


def plot_lr_grid(path, title_runs, results):
    """Final loss against learning rate for every configuration (median over seeds, bars from
    the lowest to the highest seed); rates where a seed diverged marked x."""

    def draw(ax, color, run):
        result = results[run.name]
        rates = np.unique(result.learning_rates)
        finals = [result.losses[-1, _points_at(result, r)] for r in rates]
        diverged = np.array([not np.isfinite(f).all() for f in finals])
        median = np.array([np.median(f) if np.isfinite(f).all() else np.nan for f in finals])
        low = np.array([np.min(f) for f in finals])
        high = np.array([np.max(f) for f in finals])
        ax.errorbar(
            rates,
            median,
            yerr=[median - low, high - median],
            fmt="o" + run.style,
            color=color,
            label=run.label,
            markersize=4,
            capsize=2,
        )
        if diverged.any():
            ax.plot(rates[diverged], np.full(diverged.sum(), 1.5 * np.nanmax(result.losses[0])), "x", color=color)

    _plot_panels(path, title_runs, draw, "learning rate (x: diverged)", "final training loss", log_x=True)


def target_groups(runs):
    """Configurations that share targets: per loss on the default data ("l4", "l2"; baseline
    l<p>/gd-d1), per data variant for the preprocessing figure ("pre/<variant>"; baseline
    pre/<variant>/gd-d1). Returns {group: (baseline name, runs)}."""
    groups = {}
    for run in runs:
        group = f"l{run.spec.p:g}" if run.data_key == "default" else f"pre/{run.data_key}"
        baseline = f"{group}/gd-d1"
        groups.setdefault(group, (baseline, []))[1].append(run)
    return groups


def add_targets_and_ratios(summaries, results, groups):
    """Shared targets per group (`target_groups`: multiples of its depth-1 GD's best final
    loss, the lowest median over seeds among its rates with no diverged seed) and every
    configuration's speedup over that depth 1 per target: the ratio of the medians of the
    iterations-to-target (each at its own best rate for that target), with the range of the
    per-seed ratios (common seeds)."""
    table = {}
    for group, (baseline, runs) in groups.items():
        runs = [r for r in runs if r.name in results]
        if baseline not in results:
            continue
        base = results[baseline]
        medians = []
        for rate in np.unique(base.learning_rates):
            points = _points_at(base, rate)
            if all(_curves.diverged_at(base.iterations, base.losses[:, g]) is None for g in points):
                medians.append(float(np.median(base.losses[-1, points])))
        if not medians:
            continue
        targets = [factor * float(min(medians)) for factor in TARGET_FACTORS]
        for run in runs:
            summaries[run.name].update(summarize(results[run.name], targets))
        base_targets = summaries[baseline]["per_target"]
        for run in runs:
            own = summaries[run.name]["per_target"]
            ratios = {}
            for key, base_choice in base_targets.items():
                ratio, span = _curves.speedup(base_choice["per_seed"], own.get(key, {}).get("per_seed", {}))
                ratios[key] = {"ratio": ratio, "range": None if span[0] is None else list(span)}
            summaries[run.name]["acceleration_vs_depth1"] = ratios
        table[group] = targets
    return table


# Cost model of one engine step, a + b x grid points, fitted to the full run of 2026-11-28
# (commit d0c6ba5, --workers 2 beside another job, load ~4): its 25 final stages of 10^6
# iterations took 85-209 s each (3,651 s in all; 9 or 15 points, the point count mattering
# less than depth and width), and the whole run 60 min with 2 tasks at a time.
SECONDS_PER_STEP = 1.2e-4
SECONDS_PER_POINT_STEP = 3.0e-6
SECONDS_PER_CONFIGURATION = 3.0  # tracing and setup, per stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--figure",
        nargs="+",
        choices=FIGURES + EXTRA_FIGURES + ("all",),
        default=["all"],
        help="which figures (default all; 'preprocessing' only when named)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        help="full-batch iterations per run (default 1e6: all figures take about 2 hours in-process by the cost model, and took 1 hour with --workers 2 on 2 CPU cores)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"initialisation seeds of each configuration (default {len(Config.seeds)})",
    )
    parser.add_argument(
        "--headline-seeds",
        type=int,
        default=None,
        help=f"seeds of the headline configurations {', '.join(HEADLINE)} "
        f"(default {len(Config.headline_seeds)}, at least --seeds)",
    )
    parser.add_argument(
        "--refine-points",
        type=int,
        default=None,
        help=f"refined rates on each side of the screen's best (default {Config.refine_points})",
    )
    parser.add_argument("--out", help="output folder, new or empty (default runs/gas_sensor/<UTC time>)")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the interrupted run in DIR (give the same options; the data may have moved)",
    )
    parser.add_argument("--data-dir", help=f"folder of UCI batch*.dat files (or set {DATA_ENV_VAR})")
    parser.add_argument("--download", action="store_true", help="download the UCI archive if no data is found")
    parser.add_argument("--quick", action="store_true", help="CI scale: a short horizon and a coarse grid (~1 min)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    _sweep.add_arguments(parser)
    return parser


def parse_config(argv):
    """The `Config` of a command line (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be a positive int, got {args.iterations}")
    for flag in ("seeds", "headline_seeds", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive int, got {getattr(args, flag)}")
    if args.refine_points is not None and args.refine_points < 1:
        parser.error(f"--refine-points must be a positive int, got {args.refine_points}")
    if args.resume and args.out:
        parser.error("--resume continues a run in its own folder; leave out --out")
    named = tuple(dict.fromkeys(args.figure))
    figures = (FIGURES + tuple(f for f in named if f in EXTRA_FIGURES)) if "all" in named else named
    overrides = dict(figures=figures, data_dir=args.data_dir, out=args.resume or args.out)
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.refine_points is not None:
        overrides["refine_points"] = args.refine_points
    config = Config.quick(**overrides) if args.quick else Config(**overrides)
    seeds = len(config.seeds) if args.seeds is None else args.seeds
    headline = max(seeds, len(config.headline_seeds) if args.headline_seeds is None else args.headline_seeds)
    return dataclasses.replace(config, seeds=tuple(range(seeds)), headline_seeds=tuple(range(headline))), args


def load_data(config, download):
    """The Ethanol data; a missing folder, an empty or corrupt file or a failed download is a
    `UserError` (one line on the command line)."""
    with user_errors():
        return gas_sensor.load_ethanol(config.data_dir, download=download)


def open_run(config, data, resume):
    """The run folder: a new one (config.json written), or with `resume` the folder of a run
    with the same config and data files (by sha256), whose saved summaries are returned."""
    record = {
        **_jsonable(config),
        "data": data.description,
        "data_source": data.source,
        "data_files": data.files,
        "provenance": provenance(),
    }
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
    """Rough wall time of a run (in-process) from the cost model: per configuration, the
    screen (coarse grid x 1 seed, `screen_fraction` of the horizon) and the final stage
    (2 refine_points + 1 rates x its seeds, the whole horizon)."""

    def stage(points, iterations):
        return SECONDS_PER_CONFIGURATION + iterations * (SECONDS_PER_STEP + SECONDS_PER_POINT_STEP * points)

    total = 0.0
    for run in runs:
        total += stage(config.grid_points, config.iterations * config.screen_fraction)
        total += stage((2 * config.refine_points + 1) * len(seeds_for(config, run.name)), config.iterations)
    return total


@cli
def main(argv=None):
    config, args = parse_config(argv)
    quiet_tensorflow()
    data = load_data(config, args.download)
    figures = configurations(config)
    runs = list({run.name: run for figure_runs in figures.values() for run in figure_runs}.values())
    datas, runs = load_variants(config, data, args.download, runs)
    figures = {f: [next(r for r in runs if r.name == run.name) for run in rs] for f, rs in figures.items()}
    with user_errors(ValueError):
        executor = _sweep.Executor(workers=args.workers, address=args.address)
    run_dir, saved = open_run(config, data, resume=args.resume is not None)
    print(f"data: {data.description}\nfrom: {data.source}\noutput: {run_dir}")
    print(
        f"{len(runs)} configurations x {config.iterations:,} iterations: screen {config.grid_points} rates x 1 seed "
        f"x {config.screen_fraction:g} of the horizon, then {2 * config.refine_points + 1} rates x "
        f"{len(config.seeds)} seeds ({len(config.headline_seeds)} for {', '.join(HEADLINE)}); "
        f"estimated total time {format_seconds(estimate_seconds(config, runs))} in-process; running {executor.description}"
    )
    try:
        return train_all(config, datas, run_dir, figures, runs, saved, executor)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(run_dir, runs, argv)) from None
    finally:
        executor.shutdown()


def interrupted_message(run_dir, runs, argv):
    def kept(suffix):
        return sum(_runstate.load_grid(run_dir, r.name + suffix, fullbatch.GridResult) is not None for r in runs)

    checkpoint = _runstate.load_checkpoint(run_dir)
    half = f" and {checkpoint[0]} at iteration {int(checkpoint[2][-1]):,}" if checkpoint else ""
    return (
        f"kept {kept('')} of {len(runs)} configurations (rate screens: {kept('.screen')} of {len(runs)}){half} "
        f"in {run_dir}; "
        f"continue with: {resume_command('experiments.gas_sensor', run_dir, argv)}"
    )


def execute(stages, datas, config, run_dir, progress, executor, checkpoint):
    """Runs `stages`, yielding (stage, GridResult, seconds) as each finishes: in this process with the
    engine checkpointed at every log point (`run_configuration`), or as Ray tasks whose
    TensorBoard logs the driver writes here (`_sweep.write_tensorboard`)."""
    if executor.ray is None:
        for stage in stages:
            progress.set_description(stage.name)
            resume_from = checkpoint if checkpoint is not None and checkpoint[0] == stage.name else None
            start = time.time()
            grid = run_configuration(stage, datas[stage.run.data_key], config, run_dir, progress, resume_from)
            yield stage, grid, time.time() - start
        return
    by_name = {stage.name: stage for stage in stages}
    tasks = []
    for stage in stages:
        data, schedule = datas[stage.run.data_key], fullbatch.log_schedule(stage.iterations, config.log_points)
        tasks.append(
            _sweep.GridTask(
                stage.name,
                data.x,
                data.y,
                stage.run.spec,
                stage.learning_rates,
                stage.seeds,
                schedule,
                diagnostics_every(schedule),
            )
        )
    for outcome in executor.map(tasks):
        stage = by_name[outcome.name]
        if stage.kind == "final":
            _sweep.write_tensorboard(run_dir / "tensorboard", outcome)
        progress.update(stage.iterations)
        yield stage, outcome.result, outcome.seconds


def train_all(config, datas, run_dir, figures, runs, saved, executor=None):
    """Trains every stage not yet finished in `run_dir`: all screens, then all final stages,
    writing the finished grids as they come and, after each final stage, results.json and the
    figures; returns `run_dir`."""
    executor = executor or _sweep.Executor()
    groups = target_groups(runs)
    results, summaries, started = {}, {}, time.time()
    checkpoint = _runstate.load_checkpoint(run_dir)
    screens = [screen_stage(config, run) for run in runs]
    total = sum(stage.iterations for stage in screens) + config.iterations * len(runs)
    progress = tqdm(total=total, unit="it", unit_scale=True, file=sys.stdout, mininterval=5)

    def finished(stages):
        """Loads the stages already done; returns the ones left."""
        left = []
        for stage in stages:
            grid = _runstate.load_grid(run_dir, stage.name, fullbatch.GridResult)
            if grid is None:
                left.append(stage)
            else:
                done[stage.name] = grid
                progress.update(stage.iterations)
        return left

    def record(stage, grid):
        nonlocal checkpoint
        _runstate.save_grid(run_dir, stage.name, grid)
        done[stage.name] = grid
        if checkpoint is None or checkpoint[0] == stage.name:  # the half-done one is finished now
            _runstate.clear_checkpoint(run_dir)
            checkpoint = None

    done = {}
    for stage, grid, _ in execute(finished(screens), datas, config, run_dir, progress, executor, checkpoint):
        record(stage, grid)
    finals = [final_stage(config, stage.run, done[stage.name]) for stage in screens]
    stage_of = {stage.name: stage for stage in finals}

    def add_final(stage, seconds):
        run = stage.run
        screen = done[f"{run.name}.screen"]
        results[run.name] = done[run.name]
        summaries[run.name] = {
            "label": run.label,
            "loss_p": run.spec.p,
            "spec": _jsonable(run.spec),
            "data": run.data_key,
            "rate_shift_decades": run.rate_shift,
            "grid": _grid_table(done[run.name]),
            "screen": {**_grid_table(screen), "iterations": int(screen.iterations[-1])},
            "seconds": seconds,
        }

    def write():
        targets = add_targets_and_ratios(summaries, results, groups)
        _write_results(run_dir, datas["default"], config, summaries, targets, results, time.time() - started)
        _plot_figures(run_dir, config, figures, results, summaries)
        return targets

    left = finished(finals)
    for stage in finals:
        if stage.name in done:  # kept from an interrupted run
            add_final(stage, saved.get(stage.name, {}).get("seconds"))
    targets = write() if results else {}
    for stage, grid, seconds in execute(left, datas, config, run_dir, progress, executor, checkpoint):
        record(stage, grid)
        add_final(stage_of[stage.name], seconds)
        targets = write()
    progress.close()
    _print_summary(summaries, targets, time.time() - started)
    return run_dir


def preprocessing_shapes(results, summaries):
    """Per data variant of the preprocessing figure, the paper's l4 shape test: the median
    final loss of depth 1 over depth 2 (the paper: ~7x) and the logged iteration from which
    depth 2's median curve stays below depth 1's (the paper: late, ~150k of 10^6)."""
    shapes = {}
    for name in results:
        if not (name.startswith("pre/") and name.endswith("/gd-d1")):
            continue
        deep = name[: -len("gd-d1")] + "gd-d2-w1"
        if (
            deep not in results
            or summaries[name].get("best_learning_rate") is None
            or summaries[deep].get("best_learning_rate") is None
        ):
            continue
        shallow_curve = best_band(results[name], summaries[name])[0]
        deep_curve = best_band(results[deep], summaries[deep])[0]
        iterations = results[name].iterations
        above = np.flatnonzero(~(deep_curve < shallow_curve))
        start = 0 if above.size == 0 else above[-1] + 1
        shapes[name.split("/")[1]] = {
            "final_ratio_depth1_over_depth2": float(shallow_curve[-1] / deep_curve[-1]),
            "depth2_below_from": int(iterations[start]) if start < len(iterations) else None,
        }
    return shapes


def _write_results(run_dir, data, config, summaries, targets, results, seconds):
    curves = {}
    for name, summary in summaries.items():
        if summary.get("best_learning_rate") is not None:
            median, low, high = best_band(results[name], summary)
            curves[name] = {"iterations": results[name].iterations, "loss": median, "loss_min": low, "loss_max": high}
    write_json_atomic(
        run_dir / "results.json",
        {
            "data": data.description,
            "batches": list(data.batches),
            "rows": int(data.x.shape[0]),
            "iterations": config.iterations,
            "targets": targets,
            "seconds": seconds,
            "rules": counting_rules(),
            "configurations": summaries,
            "best_curves": curves,
            "preprocessing": preprocessing_shapes(results, summaries),
        },
    )


def counting_rules():
    """The thresholds of the counting rules, recorded with the results."""
    names = (
        "FELL_FRACTION",
        "SPIKE_FACTOR",
        "STALL_FACTOR",
        "TAIL_FRACTION",
        "RISE_TOLERANCE",
        "OSCILLATION_MIN_RISES",
    )
    return {name.lower(): getattr(_curves, name) for name in names}


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
    if "preprocessing" in figures:
        title_runs = panels(
            [(f"l4, {key}", [r for r in figures["preprocessing"] if r.data_key == key]) for key in variant_keys()]
        )
        plots.append((plot_curves, "preprocessing.png", title_runs, (results, summaries)))
    for plot, name, title_runs, arguments in plots:
        if title_runs:
            plot(run_dir / name, title_runs, *arguments)


def _print_summary(summaries, targets, seconds):
    print(
        f"\n{'configuration':34s} {'best lr':>9s} {'final loss (median, range)':>30s} {'spikes':>6s}  "
        "speedup vs depth 1 at targets: median ratio [per-seed range]"
    )
    for name, s in summaries.items():
        if s.get("best_learning_rate") is None:
            print(f"{name:34s} {'diverged' if s.get('diverged') else 'all flagged':>9s}")
            continue
        ratios = " ".join(
            "-"
            if not r or r["ratio"] is None
            else f"{r['ratio']:.2f}" + ("" if not r["range"] else f" [{r['range'][0]:.2f}-{r['range'][1]:.2f}]")
            for r in s.get("acceleration_vs_depth1", {}).values()
        )
        low, high = s["final_loss_range"]
        edge = "*" if s.get("best_on_edge") else " "
        print(
            f"{name:34s} {s['best_learning_rate']:8.3g}{edge} {s['final_loss']:11.4g} [{low:.4g}, {high:.4g}]"
            f" {s['spikes_at_best']:6d}  {ratios}"
        )
    print("*: best rate on the edge of the refined rates (flagged)")
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
