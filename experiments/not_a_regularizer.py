"""For a single output, the end-to-end update field is not the gradient of any function (Section 6).

With one output the end-to-end matrix is a row vector w in R^d and the update of eq. 27 is
w <- w - eta F(w), with

    F(w) = ||w||^{2-2/N} (phi(w) + (N - 1) <phi(w), w> / ||w||^2 w),   F(0) = 0,

where phi = grad L_1. If F were grad g for some function g (a loss, a regularised loss, ...),
its line integral around every closed curve would be 0 (fundamental theorem of line
integrals). This script integrates F around circles in d = 2 and finds a non-zero limit.

Loss: L_1(w) = 1/2 (w - w*)^T A (w - w*), A = diag(a_1, a_2) > 0, so phi(w) = A (w - w*).
F is evaluated by `tf_overparam.preconditioning.end_to_end_direction` on the (1, 2) kernel w
with gradient phi(w) (eq. 27); depth 1 gives phi itself, a true gradient, as the control.

The circulation around the circle c + r (cos t, sin t) is the integral over [0, 2 pi] of
F(c + r u(t)) . r u'(t); the K-point trapezoid rule on this periodic integrand converges
geometrically in K while the curve stays off w = 0 (where F is not smooth), so successive
differences I_K - I_{K/2} shrink geometrically to round-off.

Why A must be anisotropic for N = 2: the curl is
    curl F = dF_2/dw_1 - dF_1/dw_2 = (a_1 - a_2) w_1 w_2 / ||w||            (N = 2),
so for A = a I the field is a gradient, F = a grad(2/3 ||w||^3 - ||w|| <w*, w>), and every
circulation vanishes. For N = 3 the curl is non-zero even for A = a I (if w* != 0). As an
independent check (Green's theorem), the script integrates the curl, taken by autodiff of the
same field, over each disk (Gauss-Legendre in the radius, trapezoid in the angle); the curl
is not smooth at w = 0, so this check is less accurate (~1e-5 relative) for a disk around it.

    python -m experiments.not_a_regularizer [--depths 2 3] [--hessian 1 4] [--quick] [--out DIR]
"""

import argparse
import dataclasses
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments._common import cli, record_run  # noqa: E402
from tf_overparam.preconditioning import end_to_end_direction  # noqa: E402

NAME = "not_a_regularizer"


@dataclasses.dataclass(frozen=True)
class Circle:
    """The closed curve center + radius (cos t, sin t), t in [0, 2 pi)."""

    name: str
    center: tuple
    radius: float

    @property
    def encloses_origin(self):
        return math.hypot(*self.center) < self.radius


DEFAULT_CIRCLES = (
    Circle("off_origin", (1.5, 1.0), 1.0),
    Circle("around_origin", (0.5, 0.25), 1.0),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one run; invalid values raise a `ValueError` naming the field."""

    depths: tuple = (2, 3)
    hessian: tuple = (1.0, 4.0)
    minimizer: tuple = (1.0, 1.0)
    ks: tuple = (16, 32, 64, 128, 256, 512, 1024)
    circles: tuple = DEFAULT_CIRCLES
    stokes_nodes: tuple = (64, 512)  # (radial Gauss-Legendre, angular trapezoid)

    def __post_init__(self):
        if not self.depths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.depths):
            raise ValueError(f"`depths` must be ints >= 2 (depth 1 is always run as the control), got {self.depths!r}.")
        if len(self.hessian) != 2 or any(not (math.isfinite(a) and a > 0) for a in self.hessian):
            raise ValueError(f"`hessian` must be two positive finite numbers (a convex L_1), got {self.hessian!r}.")
        if len(self.minimizer) != 2 or any(not math.isfinite(s) for s in self.minimizer):
            raise ValueError(f"`minimizer` must be two finite numbers, got {self.minimizer!r}.")
        ks = list(self.ks)
        valid = all(isinstance(k, int) and not isinstance(k, bool) and k >= 3 for k in ks)
        if len(ks) < 2 or not valid or ks != sorted(set(ks)):
            raise ValueError(f"`ks` must be at least two increasing ints >= 3, got {self.ks!r}.")
        for circle in self.circles:
            if not (circle.radius > 0 and abs(math.hypot(*circle.center) - circle.radius) > 1e-3 * circle.radius):
                raise ValueError(f"`circles`: {circle} must have a positive radius and stay off w = 0.")
        if len(self.stokes_nodes) != 2 or any(n < 1 for n in self.stokes_nodes):
            raise ValueError(f"`stokes_nodes` must be two positive ints, got {self.stokes_nodes!r}.")


def field(points, depth, hessian, minimizer):
    """F(w) of eq. 27 at each row of `points` (B, 2), via `end_to_end_direction` on (1, 2) kernels."""
    w = tf.convert_to_tensor(points, tf.float64)
    phi = tf.constant(hessian, tf.float64) * (w - tf.constant(minimizer, tf.float64))
    return end_to_end_direction(w[:, tf.newaxis, :], phi[:, tf.newaxis, :], depth)[:, 0, :]


def circulation(circle, k, depth, hessian, minimizer):
    """The K-point trapezoid rule for the line integral of F around `circle` (counter-clockwise)."""
    t = 2 * np.pi * np.arange(k) / k
    direction = np.stack([np.cos(t), np.sin(t)], axis=1)
    points = np.asarray(circle.center) + circle.radius * direction
    tangent = circle.radius * np.stack([-np.sin(t), np.cos(t)], axis=1)
    values = field(points, depth, hessian, minimizer).numpy()
    return float(np.sum(values * tangent) * (2 * np.pi / k))


def curl(points, depth, hessian, minimizer):
    """dF_2/dw_1 - dF_1/dw_2 at each row of `points`, by autodiff of `field`."""
    w = tf.convert_to_tensor(points, tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(w)
        values = field(w, depth, hessian, minimizer)
        first, second = tf.reduce_sum(values[:, 0]), tf.reduce_sum(values[:, 1])
    # Row b of F depends on row b of w only, so the gradient of a column's sum is its Jacobian row.
    return (tape.gradient(second, w)[:, 0] - tape.gradient(first, w)[:, 1]).numpy()


def stokes(circle, depth, hessian, minimizer, nodes):
    """The integral of the curl of F over the disk of `circle` (Green's theorem's other side)."""
    radial, angular = nodes
    x, weights = np.polynomial.legendre.leggauss(radial)
    rho, rho_weights = circle.radius * (x + 1) / 2, circle.radius * weights / 2
    t = 2 * np.pi * np.arange(angular) / angular
    points = np.asarray(circle.center) + rho[:, None, None] * np.stack([np.cos(t), np.sin(t)], axis=-1)
    values = curl(points.reshape(-1, 2), depth, hessian, minimizer).reshape(radial, angular)
    return float(np.sum(rho_weights * rho * values.sum(axis=1)) * (2 * np.pi / angular))


def run(config):
    """Circulations at every K for depth 1 and each depth N, their differences, and Stokes."""
    args = (config.hessian, config.minimizer)
    results = {
        "loss": "L_1(w) = 1/2 (w - w*)^T diag(hessian) (w - w*), phi = diag(hessian) (w - w*)",
        "field": "F(w) = ||w||^(2-2/N) (phi + (N-1) <phi, w> / ||w||^2 w)  (eq. 27, end_to_end_direction)",
        "ks": list(config.ks),
        "circles": [{**dataclasses.asdict(c), "encloses_origin": c.encloses_origin} for c in config.circles],
        "depth_1": {},
        "depths": {},
    }
    for circle in config.circles:
        results["depth_1"][circle.name] = [circulation(circle, k, 1, *args) for k in config.ks]
    for depth in config.depths:
        per_circle = {}
        for circle in config.circles:
            values = [circulation(circle, k, depth, *args) for k in config.ks]
            per_circle[circle.name] = {
                "circulation": values,
                "differences": [abs(b - a) for a, b in zip(values, values[1:])],
                "limit": values[-1],
                "stokes": stokes(circle, depth, *args, config.stokes_nodes),
            }
        results["depths"][str(depth)] = per_circle
    return results


def plot(results, config, path):
    """The field F (N = first depth) with the circles, and the convergence of the circulations."""
    depth = config.depths[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    grid = np.linspace(-1.0, 3.0, 121)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    values = field(points, depth, config.hessian, config.minimizer).numpy()
    curls = curl(points, depth, config.hessian, config.minimizer).reshape(xx.shape)
    limit = np.nanmax(np.abs(curls))
    image = left.pcolormesh(xx, yy, curls, cmap="RdBu_r", vmin=-limit, vmax=limit, shading="auto")
    figure.colorbar(image, ax=left, label="curl F")
    left.streamplot(
        xx, yy, values[:, 0].reshape(xx.shape), values[:, 1].reshape(xx.shape), color="k", linewidth=0.5, density=1.2
    )
    t = np.linspace(0, 2 * np.pi, 200)
    for circle in config.circles:
        left.plot(
            circle.center[0] + circle.radius * np.cos(t),
            circle.center[1] + circle.radius * np.sin(t),
            lw=2,
            label=circle.name,
        )
    left.plot(*config.minimizer, "k*", ms=10, label="w*")
    left.set(
        xlabel="w1", ylabel="w2", aspect="equal", title=f"F (N = {depth}), A = diag{tuple(config.hessian)}, and curl F"
    )
    left.legend(fontsize=7, loc="lower right")
    ks = np.array(config.ks)
    floor = 1e-18  # exact zeros are drawn here, below round-off
    for depth_name, per_circle in results["depths"].items():
        for name, entry in per_circle.items():
            right.semilogy(
                ks[1:],
                np.maximum(entry["differences"], floor),
                "o-",
                label=f"N = {depth_name}, {name}: |I_K - I_K/2| (limit {entry['limit']:.6g})",
            )
    for name, values in results["depth_1"].items():
        right.semilogy(ks, np.maximum(np.abs(values), floor), "x--", label=f"N = 1 (a gradient), {name}: |I_K|")
    right.set_xscale("log", base=2)
    right.set_ylim(floor / 10, 1.0)
    right.set(xlabel="quadrature points K", ylabel="circulation", title="line integrals around the circles")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_summary(results):
    print(results["loss"])
    print(results["field"])
    header = "".join(f"{'K=' + str(k):>15}" for k in results["ks"])
    print(f"{'depth':>5} {'circle':<14}{header}{'Stokes':>15}")
    for name, values in results["depth_1"].items():
        print(f"{1:>5} {name:<14}" + "".join(f"{v:>15.3e}" for v in values))
    for depth, per_circle in results["depths"].items():
        for name, entry in per_circle.items():
            print(
                f"{depth:>5} {name:<14}"
                + "".join(f"{v:>15.9f}" for v in entry["circulation"])
                + f"{entry['stokes']:>15.9f}"
            )


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments.not_a_regularizer", description=__doc__.split("\n")[0])
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
    return record_run(args.out, NAME, config, run, plot, lambda results, _: print_summary(results))


if __name__ == "__main__":
    main()
