"""The command line of `python -m experiments.gas_sensor`: options, the run folder (new or
resumed), the start-up lines, and Ctrl-C."""

import argparse
import dataclasses
import pathlib

from experiments.common import runstate, sweep
from experiments.common.cli import (
    RunInterrupted,
    add_common_arguments,
    cli,
    format_seconds,
    quiet_tensorflow,
    resume_command,
    user_errors,
)
from experiments.common.run_folder import make_run_dir, provenance, write_json_atomic
from experiments.data import gas_sensor as gas_data
from experiments.gas_sensor import plan
from experiments.gas_sensor.plan import EXTRA_FIGURES, FIGURES, HEADLINE, Config
from experiments.gas_sensor.report import jsonable

MODULE = "experiments.gas_sensor"


def build_parser():
    import experiments.gas_sensor as package  # its docstring is the help's description

    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        help="full-batch iterations per run (default 1e6: all figures, with the early screens, the headline's "
        "stability edges and its sensitivity stage, take about 2.6 hours in-process by the cost model, about 1.3 "
        "hours with --workers 2 on 2 CPU cores)",
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
    parser.add_argument("--data-dir", help=f"folder of UCI batch*.dat files (or set {gas_data.ENV_VAR})")
    parser.add_argument(
        "--download",
        action="store_true",
        help=f"if no data is found in --data-dir or ${gas_data.ENV_VAR}, download the UCI archive "
        f"({gas_data.UCI_PAGE}) into the Keras cache (~/.keras/datasets) and read it from there",
    )
    parser.add_argument("--quick", action="store_true", help="CI scale: a short horizon and a coarse grid (~1 min)")
    sweep.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def parse_config(argv):
    """The `Config` of a command line, and the parsed arguments (argparse errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be a positive int, got {args.iterations}")
    for flag in ("seeds", "headline_seeds", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive int, got {getattr(args, flag)}")
    if args.refine_points is not None and args.refine_points < 1:
        parser.error(f"--refine-points must be a positive int, got {args.refine_points}")
    if not args.connect_timeout > 0:
        parser.error(f"--connect-timeout must be positive, got {args.connect_timeout}")
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
        return gas_data.load_ethanol(config.data_dir, download=download)


def open_run(config, data, resume):
    """The run folder: a new one (config.json written), or with `resume` the folder of a run
    with the same config and data files (by sha256)."""
    record = {
        **jsonable(config),
        "data": data.description,
        "data_source": data.source,
        "data_files": data.files,
        "provenance": provenance(),
    }
    if not resume:
        run_dir = make_run_dir(config.out, "gas_sensor")
        write_json_atomic(run_dir / "config.json", record)
        return run_dir
    saved = runstate.check_resumable(config.out, jsonable(config), data.files, ignore=("out", "data_dir"))
    run_dir = pathlib.Path(config.out)
    if saved.get("data_source") != data.source:  # same files, moved: record where they are read now
        write_json_atomic(run_dir / "config.json", {**saved, "data_source": data.source, "data_files": data.files})
    return run_dir


def header(config, runs, executor, estimate):
    """The line that says what the run trains and how long it should take."""
    return (
        f"{len(runs)} configurations x {config.iterations:,} iterations: screen {config.grid_points} rates x 1 seed "
        f"x {config.screen_fraction:g} of the horizon, then {plan.final_rate_count(config)} rates x "
        f"{len(config.seeds)} seeds ({len(config.headline_seeds)} for {', '.join(HEADLINE)}, then their stability "
        f"edges); every stage's rates also x {config.screen_seeds} seeds x {config.early_iterations} iterations "
        f"for early blow-ups; running {executor.description}; estimated time {format_seconds(estimate)}"
    )


@cli
def main(argv=None):
    """Runs the experiment; returns the run folder."""
    from experiments.gas_sensor.runner import GasSensorRun

    config, args = parse_config(argv)
    with user_errors(ValueError):
        executor = sweep.Executor(workers=args.workers, address=args.address, timeout=args.connect_timeout)
    try:
        quiet_tensorflow()
        data = load_data(config, args.download)
        figures = plan.configurations(config)
        datas, runs = plan.load_variants(config, data, args.download, plan.run_order(figures))
        figures = {f: [next(r for r in runs if r.name == run.name) for run in rs] for f, rs in figures.items()}
        run_dir = open_run(config, data, resume=args.resume is not None)
        print(f"data: {data.description}\nfrom: {data.source}\noutput: {run_dir}")
        run = GasSensorRun(run_dir, config, datas, figures, runs, executor)
        print(header(config, runs, executor, run.estimate_seconds()), flush=True)
        try:
            return run.train()
        except KeyboardInterrupt:
            message = (
                f"{run.interrupted_message()} in {run_dir}; continue with: {resume_command(MODULE, run_dir, argv)}"
            )
            raise RunInterrupted(message) from None
    finally:
        executor.shutdown()
