"""`python -m experiments.lp_toy`: the options; TensorFlow is imported only once they are read."""

import argparse
import functools

from experiments.common.cli import add_common_arguments, cli, quiet_tensorflow
from experiments.common.run_folder import record_run
from experiments.lp_toy.protocol import NAME, Config


def build_parser():
    from experiments import lp_toy

    parser = argparse.ArgumentParser(
        prog="python -m experiments.lp_toy",
        description=lp_toy.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--p", type=int, default=Config.p, help="even exponent of the loss (default 4)")
    parser.add_argument("--y1", type=float, default=Config.y1, help="label of x_1 = [1, 0] (default 10)")
    parser.add_argument("--y2", type=float, default=Config.y2, help="label of x_2 = [0, 1] (default 1)")
    parser.add_argument("--target", type=float, default=None, help="target relative error per coordinate")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=(),
        help="explicit learning rates (default: a log grid around the bound)",
    )
    parser.add_argument("--quick", action="store_true", help="CI-scale: 5000 iterations, target 0.1, coarse grid")
    parser.add_argument("--out", default=None, help="output folder (default runs/lp_toy/<UTC timestamp>/)")
    add_common_arguments(parser)
    return parser


@cli
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    scale = (
        {"iterations": 5_000, "target": 0.1, "grid_per_decade": 3, "log_points": 400, "edge_rounds": 2}
        if args.quick
        else {}
    )
    overrides = {name: getattr(args, name) for name in ("target", "iterations") if getattr(args, name) is not None}
    try:
        config = Config(p=args.p, y1=args.y1, y2=args.y2, rates=tuple(args.rates), **{**scale, **overrides})
    except ValueError as error:
        parser.error(str(error))
    quiet_tensorflow()
    from experiments.lp_toy import experiment, plots, report

    figure = functools.partial(plots.save_figure, quick=args.quick)
    return record_run(args.out, NAME, config, experiment.run, figure, report.print_summary)
