"""`python -m experiments.mnist_cnn`: the options, and a run from the first model to the
summary. Nothing here imports TensorFlow before the options are read and the data are found."""

import argparse

from experiments.common.cli import (
    RunInterrupted,
    add_common_arguments,
    cli,
    format_seconds,
    quiet_tensorflow,
    resume_command,
    user_errors,
)
from experiments.common.run_folder import provenance
from experiments.data import mnist_files
from experiments.mnist_cnn.protocol import ARMS, EXPANDABLE, OPTIMIZERS, Config, estimate_seconds

DATA_HELP = """\
MNIST comes from tfds' prepared copy in --tfds-data-dir if there is one, else
it is prepared there once from the four original IDX files of --manual-dir
(no network needed), else downloaded. Without the files and without network,
the run stops at once and says so."""


def _int_list(text, name, parser):
    try:
        values = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        parser.error(f"--{name} must be comma-separated integers, got {text!r}")
    if any(value < 0 for value in values):
        parser.error(f"--{name} must be integers >= 0, got {text!r}")
    return values


def build_parser():
    from experiments import mnist_cnn

    parser = argparse.ArgumentParser(
        prog="python -m experiments.mnist_cnn",
        description=mnist_cnn.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated arms to train (default all: {','.join(ARMS)})"
    )
    parser.add_argument(
        "--seeds", help="comma-separated seeds of plain and twin (default 66478,66479,66480; --quick 66478,66479)"
    )
    parser.add_argument(
        "--other-seeds", help="comma-separated seeds of balanced, factors and end_to_end (default 66478)"
    )
    parser.add_argument("--epochs", type=int, help="epochs (default 10, the tutorial's)")
    parser.add_argument("--steps", type=int, help="cap on steps per epoch (default: the whole training set)")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="momentum",
        help="momentum 0.9 (default, the tutorial's), plain sgd, or adam",
    )
    parser.add_argument(
        "--learning-rate", type=float, help="initial learning rate (default 0.01; adam 0.001), decayed x0.95 per epoch"
    )
    parser.add_argument(
        "--overparameterize",
        default="dense",
        help="comma-separated layer kinds the twins expand: dense (default), conv, or dense,conv",
    )
    parser.add_argument(
        "--strategy",
        choices=("none", "mirrored"),
        default="none",
        help="mirrored: tf.distribute.MirroredStrategy over 2 GPUs, or 2 logical CPU devices",
    )
    data = parser.add_argument_group("data", DATA_HELP)
    data.add_argument(
        "--manual-dir",
        "--data-dir",
        dest="manual_dir",
        metavar="DIR",
        help=f"folder of the four MNIST *-ubyte.gz files, as downloaded (or set {mnist_files.ENV_VAR})",
    )
    data.add_argument(
        "--tfds-data-dir",
        metavar="DIR",
        help="where tfds keeps the prepared data set (default $TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="output folder, new or empty (default runs/mnist_cnn/<UTC time>)")
    output.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR: finished arms and seeds are kept (same options; "
        "--arms, --seeds and --other-seeds may add more)",
    )
    output.add_argument(
        "--histograms", action="store_true", help="also write the twins' factor histograms to TensorBoard (large)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI scale: 640 training examples, 2 epochs, 2 seeds, about 2 minutes (the full default run: about "
        "1.3 hours on an idle 2-core machine)",
    )
    add_common_arguments(parser)
    return parser


def parse_args(argv):
    """(Config, the parsed arguments); a bad value exits through the parser (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.out:
        parser.error("--resume continues a run in its own folder; leave out --out")
    for name in ("epochs", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive int, got {value}")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning-rate must be positive, got {args.learning_rate}")
    kinds = tuple(dict.fromkeys(kind.strip() for kind in args.overparameterize.split(",")))
    if not kinds or not set(kinds) <= set(EXPANDABLE):
        parser.error(
            f"--overparameterize must be a comma-separated subset of {sorted(EXPANDABLE)}, "
            f"got {args.overparameterize!r}"
        )
    arms = tuple(dict.fromkeys(arm.strip() for arm in args.arms.split(",")))
    if not set(arms) <= set(ARMS):
        parser.error(f"--arms must be a comma-separated subset of {','.join(ARMS)}, got {args.arms!r}")
    overrides = dict(
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        strategy=args.strategy,
        manual_dir=args.manual_dir,
        tfds_data_dir=args.tfds_data_dir,
        out=args.resume or args.out,
        steps=args.steps,
        overparameterize=kinds,
        arms=arms,
        histograms=args.histograms,
    )
    if args.seeds is not None:
        overrides["seeds"] = _int_list(args.seeds, "seeds", parser)
    if args.other_seeds is not None:
        overrides["other_seeds"] = _int_list(args.other_seeds, "other-seeds", parser)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    return Config.quick(**overrides) if args.quick else Config(**overrides), args


@cli
def main(argv=None):
    """Runs the experiment; returns the run folder."""
    config, args = parse_args(argv)
    from experiments.mnist_cnn.run_state import RunState

    resume = args.resume is not None
    RunState.check(config, resume)
    # Decided before TensorFlow is imported: offline without the files, this fails in seconds.
    with user_errors():
        mnist_files.check_available(config.manual_dir, config.tfds_data_dir)
    quiet_tensorflow()
    from experiments.mnist_cnn import report, training

    strategy = training.make_strategy(config.strategy)  # before anything initialises TensorFlow
    with user_errors():
        data = training.load_data(config)
    steps_per_epoch = config.train_steps_per_epoch()
    state = RunState.open(config, resume)
    plan, todo = state.plan, state.todo
    print(
        f"output: {state.run_dir}\nsteps per epoch: {steps_per_epoch}, epochs: {config.epochs}, "
        f"replicas: {strategy.num_replicas_in_sync}\n{len(plan)} models (arm/seed), {len(plan) - len(todo)} finished; "
        f"estimated time of the rest {format_seconds(estimate_seconds(todo, steps_per_epoch * config.epochs))} "
        "(idle 2-core machine)"
    )
    state.record_start(training.machine_record(strategy), provenance(), steps_per_epoch)
    for arm, seed in plan:
        if (arm, seed) in state.finished:
            print(f"{arm}/{seed}: kept from the resumed run")
    try:
        for arm, seed in todo:
            record = training.train_and_save(arm, config.for_seed(seed), data, steps_per_epoch, state.run_dir, strategy)
            state.add(arm, seed, record)
    except KeyboardInterrupt:
        kept = state.kept()
        raise RunInterrupted(
            f"kept {', '.join(kept) or 'no model'} ({len(kept)} of {len(plan)} arm/seed models) "
            f"in {state.run_dir}; continue with: {resume_command('experiments.mnist_cnn', state.run_dir, argv)}"
        ) from None
    results = state.write()
    report.print_summary(results)
    failed = [name for name, row in results["arms"].items() if row["collapse_passed"] is False]
    if failed:
        raise AssertionError(
            f"a collapsed twin does not predict as the twin it came from: {failed} (see arms/*/*.json)"
        )
    return state.run_dir
