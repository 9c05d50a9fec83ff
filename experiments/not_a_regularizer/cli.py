"""`python -m experiments.not_a_regularizer`: the options; TensorFlow is imported only once they
are read."""

import argparse
import functools

from experiments.common.cli import add_common_arguments, cli, quiet_tensorflow
from experiments.common.run_folder import record_run
from experiments.not_a_regularizer.protocol import NAME, Config


def build_parser():
    from experiments import not_a_regularizer

    parser = argparse.ArgumentParser(
        prog="python -m experiments.not_a_regularizer",
        description=not_a_regularizer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--depths", type=int, nargs="+", default=list(Config.depths), help="depths N >= 2 (default 2 3)"
    )
    parser.add_argument(
        "--hessian",
        type=float,
        nargs=2,
        default=list(Config.hessian),
        metavar=("A1", "A2"),
        help="diagonal of A in L_1 (default 1 4)",
    )
    parser.add_argument(
        "--minimizer",
        type=float,
        nargs=2,
        default=list(Config.minimizer),
        metavar=("S1", "S2"),
        help="w*, the minimiser of L_1 (default 1 1)",
    )
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="quadrature sizes (default 16 32 ... 1024)")
    parser.add_argument("--quick", action="store_true", help="CI-scale: K up to 128, coarser Stokes grid")
    parser.add_argument("--out", default=None, help="output folder (default runs/not_a_regularizer/<UTC timestamp>/)")
    add_common_arguments(parser)
    return parser


@cli
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    scale = {"ks": (16, 32, 64, 128), "stokes_nodes": (32, 256)} if args.quick else {}
    if args.ks is not None:
        scale["ks"] = tuple(args.ks)
    try:
        config = Config(
            depths=tuple(args.depths), hessian=tuple(args.hessian), minimizer=tuple(args.minimizer), **scale
        )
    except ValueError as error:
        parser.error(str(error))
    quiet_tensorflow()
    from experiments.not_a_regularizer import integrals, plots, report

    figure = functools.partial(plots.save_figure, quick=args.quick)
    return record_run(args.out, NAME, config, integrals.run, figure, lambda results, _: report.print_summary(results))
