"""The two-point l_p regression of Section 7: plain gradient descent against depth 2.

Inputs x_1 = [1, 0], x_2 = [0, 1], labels y_1 > y_2 > 0, even p >= 2, and the l_p loss of
NOTES.md averaged over the m = 2 points (`tf_overparam.LpLoss`):

    L(w) = (1/m) sum_i (1/p) (x_i^T w - y_i)^p = (1/2p) [(w_1 - y_1)^p + (w_2 - y_2)^p],
    dL/dw_k = (1/2) (w_k - y_k)^{p-1}.

Stability bound. With Delta_k = w_k - y_k, gradient descent with step eta reads (Section 7,
with the erratum's exponent p - 1)

    Delta <- Delta - (eta/2) Delta^{p-1} = Delta (1 - u),   u = (eta/2) Delta^{p-2}.

From w = 0, Delta_k = -y_k. If u < 2 then |1 - u| < 1: |Delta| decreases, u does not grow,
and Delta -> 0; if u > 2, |Delta| and u grow and the iteration diverges (u = 2: a 2-cycle).
So gradient descent from 0 converges iff (eta/2) y_k^{p-2} < 2 for k = 1, 2, i.e.

    eta < 4 / y_1^{p-2}    (y_1 > y_2).

The write-up's eta < 2 / y_i^{p-2} is the same bound for the summed loss (no 1/m); this
module averages, so its bound is 4 / y_1^{p-2}. At that rate the second coordinate moves by
Delta_2' = -(eta/2) Delta_2^{p-1}: from Delta_2 = -y_2 the ODE approximation reaches
|Delta_2| = eps y_2 after ((eps y_2)^{2-p} - y_2^{2-p}) / ((p - 2) eta/2) iterations (p > 2).

Overparameterized runs start from the small end-to-end kernel w_0 = init_scale (1, 1)/sqrt 2
(w = 0 is a fixed point of depth >= 2):
- depth 2: GD on the factors of x -> x^T F_1 F_2 (F_1: 2 x h, F_2: h x 1), balanced at
  w_0 (`factorization.balanced_factors`), gradients by autodiff;
- end to end: w <- w - eta `end_to_end_direction`(w, dL/dw, 2) (eq. 24, eq. 27 for one
  output), which balanced depth-2 GD follows up to O(eta^2) per step.

Every method runs a log grid of rates at once (a batch), the GD batch also holding
(1 -/+ margin) x bound. A run is diverged once its loss is inf/NaN or exceeds
`divergence_factor` times its initial loss; it is then frozen and never reaches the target.
"Iterations to target" is the first iteration from which a coordinate's relative error
|w_k - y_k| / y_k stays <= target to the end of the run; the best rate is the fastest to
bring both coordinates there.

    python -m experiments.lp_toy [--p 4] [--y1 10] [--y2 1] [--quick] [--out DIR]
"""

import argparse
import dataclasses
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments._common import cli, record_run  # noqa: E402
from tf_overparam.factorization import balanced_factors  # noqa: E402
from tf_overparam.losses import LpLoss  # noqa: E402
from tf_overparam.preconditioning import end_to_end_direction  # noqa: E402

NAME = "lp_toy"
METHODS = ("gd", "depth2", "end_to_end")
LABELS = {"gd": "gradient descent", "depth2": "depth-2 network (GD)", "end_to_end": "end-to-end rule, N = 2"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one run; invalid values raise a `ValueError` naming the field."""

    p: int = 4
    y1: float = 10.0
    y2: float = 1.0
    target: float = 1e-2
    iterations: int = 300_000
    margin: float = 1e-2
    rates: tuple = ()  # explicit rates; empty: the log grid from 1e-3 to 10 times the bound
    grid_per_decade: int = 6
    init_scale: float = 1e-3
    hidden_units: int = 1
    divergence_factor: float = 1e6
    checkpoints: int = 300

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, int) or self.p < 2 or self.p % 2:
            raise ValueError(f"`p` must be an even int >= 2 (the derivation uses (.)^p), got {self.p!r}.")
        if not (math.isfinite(self.y2) and self.y2 > 0):
            raise ValueError(f"`y2` must be a positive finite number, got {self.y2!r}.")
        if not (math.isfinite(self.y1) and self.y1 > self.y2):
            raise ValueError(f"`y1` must be finite and > y2 = {self.y2!r} (the ill-conditioned case), got {self.y1!r}.")
        if not 0 < self.target < 1:
            raise ValueError(f"`target` must be a relative error in (0, 1), got {self.target!r}.")
        if not 0 < self.margin < 1:
            raise ValueError(f"`margin` must be in (0, 1), got {self.margin!r}.")
        if any(not (math.isfinite(eta) and eta > 0) for eta in self.rates):
            raise ValueError(f"`rates` must all be positive and finite, got {self.rates!r}.")
        for name in ("iterations", "grid_per_decade", "hidden_units", "checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for name in ("init_scale", "divergence_factor"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"`{name}` must be positive and finite, got {getattr(self, name)!r}.")

    @property
    def labels(self):
        return np.array([self.y1, self.y2])


def stability_bound(p, y1):
    """The largest stable GD rate from w = 0 for the averaged loss: 4 / y_1^{p-2}."""
    return 4.0 / y1 ** (p - 2)


def predicted_slow_iterations(p, eta, y, target):
    """Iterations for Delta = -y to reach |Delta| <= target y under Delta <- Delta - (eta/2) Delta^{p-1}.

    Exact for p = 2 (a geometric sequence), the ODE approximation for p > 2 (see the module
    docstring), which holds while (eta/2) y^{p-2} << 1.
    """
    c = eta / 2
    if p == 2:
        return math.ceil(math.log(target) / math.log(abs(1 - c)))
    return ((target * y) ** (2 - p) - y ** (2 - p)) / ((p - 2) * c)


def rate_grid(config):
    """The rates every method runs: `config.rates`, or 10^(j/g) from 1e-3 to 10 times the bound."""
    if config.rates:
        return np.array(sorted(config.rates))
    bound = stability_bound(config.p, config.y1)
    g = config.grid_per_decade
    low, high = math.ceil(g * math.log10(1e-3 * bound)), math.floor(g * math.log10(10 * bound))
    return 10.0 ** (np.arange(low, high + 1) / g)


def _initial_state(method, config, batch):
    """The starting variables of `batch` runs of `method`, float64, Keras layout (inputs, units)."""
    if method == "gd":
        return (tf.zeros((batch, 2, 1), tf.float64),)
    start = np.full((2, 1), config.init_scale / math.sqrt(2))
    if method == "end_to_end":
        return (tf.constant(np.broadcast_to(start, (batch, 2, 1))),)
    factors = balanced_factors(start, [config.hidden_units], rotation_seed=0)
    return tuple(tf.constant(np.broadcast_to(f, (batch, *f.shape))) for f in factors)


def _kernel(state):
    """The end-to-end kernel F_1 ... F_N of a state (a single kernel or a chain)."""
    kernel = state[0]
    for factor in state[1:]:
        kernel = tf.linalg.matmul(kernel, factor)
    return kernel


def run_method(method, config, rates, checkpoints):
    """Runs `method` at every rate for `config.iterations` full-batch steps, all rates at once.

    Returns a dict of NumPy arrays: `diverged_at` (R,), the iteration whose loss left the
    finite range or exceeded `divergence_factor` x the initial loss (-1 if none);
    `iterations_to_target` (R, 2) per coordinate (-1 if not reached); `final_error` (R, 2);
    `history` (len(checkpoints) + 1, R, 2), the relative errors at iteration 0 and at each
    checkpoint (NaN once diverged).
    """
    inputs = tf.eye(2, dtype=tf.float64)
    labels = tf.constant(config.labels, tf.float64)
    loss_fn = LpLoss(config.p, reduction=None, dtype="float64")
    etas = tf.constant(rates, tf.float64)[:, tf.newaxis, tf.newaxis]
    checkpoints = tf.constant(checkpoints, tf.int32)
    n_checkpoints, target = int(checkpoints.shape[0]), config.target

    def losses(kernel):
        outputs = tf.linalg.matmul(inputs, kernel)
        return tf.reduce_mean(loss_fn(tf.broadcast_to(labels[:, tf.newaxis], outputs.shape), outputs), axis=-1)

    def errors(state):
        return tf.abs(_kernel(state)[..., 0] - labels) / labels

    def step(state):
        with tf.GradientTape() as tape:
            tape.watch(state)
            loss = tf.reduce_sum(losses(_kernel(state)))  # runs are independent: sum = batch of losses
        grads = tape.gradient(loss, state)
        if method == "end_to_end":
            return (state[0] - etas * end_to_end_direction(state[0], grads[0], 2),)
        return tuple(v - etas * g for v, g in zip(state, grads))

    @tf.function(jit_compile=True)
    def descend(state):
        initial_loss = losses(_kernel(state))
        alive = tf.ones_like(initial_loss, tf.bool)
        diverged_at = tf.fill(tf.shape(initial_loss), -1)
        error = errors(state)
        last_above = tf.where(error > target, 0, -1)
        history = tf.tensor_scatter_nd_update(
            tf.fill((n_checkpoints + 1, *error.shape), tf.constant(np.nan, tf.float64)), [[0]], error[tf.newaxis]
        )
        k = 0
        for t in tf.range(1, config.iterations + 1):
            candidate = step(state)
            loss = losses(_kernel(candidate))
            fine = alive & tf.math.is_finite(loss) & (loss <= config.divergence_factor * initial_loss)
            diverged_at = tf.where(alive & ~fine, t, diverged_at)
            alive = fine
            state = tuple(tf.where(alive[:, tf.newaxis, tf.newaxis], c, s) for c, s in zip(candidate, state))
            error = tf.where(alive[:, tf.newaxis], errors(state), tf.constant(np.nan, tf.float64))
            last_above = tf.where(error <= target, last_above, t)  # NaN counts as above
            if k < n_checkpoints and t == checkpoints[tf.minimum(k, n_checkpoints - 1)]:
                history = tf.tensor_scatter_nd_update(history, [[k + 1]], error[tf.newaxis])
                k += 1
        return diverged_at, last_above, error, history

    diverged_at, last_above, error, history = (x.numpy() for x in descend(_initial_state(method, config, len(rates))))
    reached = np.where(last_above < config.iterations, last_above + 1, -1)
    return {"diverged_at": diverged_at, "iterations_to_target": reached, "final_error": error, "history": history}


def _iterations_or_none(value):
    return None if value < 0 else int(value)


def _errors_or_none(errors):
    """Errors as JSON lists, a diverged run's NaN as None (strict JSON)."""
    return [None if math.isnan(e) else e for e in np.asarray(errors).tolist()]


def summarize(rates, outcome):
    """Per-rate outcomes, the best rate (fastest to target, both coordinates), and the best one
    below the first diverging rate (the contiguous stable range)."""
    per_coordinate = outcome["iterations_to_target"]
    both = np.where((per_coordinate >= 0).all(axis=1), per_coordinate.max(axis=1), -1)
    converged = both >= 0
    diverged = outcome["diverged_at"] >= 0
    first_divergent = int(np.argmax(diverged)) if diverged.any() else len(rates)

    def best(mask):
        if not mask.any():
            return None
        candidates = np.flatnonzero(mask)
        i = int(candidates[np.argmin(both[candidates])])
        return {
            "index": i,
            "eta": float(rates[i]),
            "iterations": int(both[i]),
            "iterations_per_coordinate": [int(n) for n in per_coordinate[i]],
        }

    return {
        "rates": rates.tolist(),
        "diverged_at": [_iterations_or_none(n) for n in outcome["diverged_at"]],
        "iterations_to_target": [_iterations_or_none(n) for n in both],
        "iterations_to_target_per_coordinate": [[_iterations_or_none(n) for n in row] for row in per_coordinate],
        "final_error": [_errors_or_none(row) for row in outcome["final_error"]],
        "best": best(converged),
        "largest_rate_below_first_divergence": float(rates[first_divergent - 1]) if first_divergent else None,
        "best_below_first_divergence": best(converged & (np.arange(len(rates)) < first_divergent)),
    }


def log_checkpoints(iterations, count):
    """About `count` distinct iterations, log-spaced from 1 to `iterations`."""
    return np.unique(np.geomspace(1, iterations, count).astype(np.int64)).astype(np.int32)


def run(config):
    """Runs the whole experiment; returns the results dict (JSON-ready)."""
    bound = stability_bound(config.p, config.y1)
    near_bound = np.array([(1 - config.margin) * bound, (1 + config.margin) * bound])
    grid = rate_grid(config)
    checkpoints = log_checkpoints(config.iterations, config.checkpoints)
    results = {"bound": bound, "bound_formula": "eta < 4 / y1^(p-2)  (loss averaged over the m = 2 points)"}
    curves = {"iterations": [0, *checkpoints.tolist()]}
    methods, seconds = {}, {}
    for method in METHODS:
        rates = np.sort(np.concatenate([grid, near_bound])) if method == "gd" else grid
        start = time.perf_counter()
        outcome = run_method(method, config, rates, checkpoints)
        seconds[method] = time.perf_counter() - start
        methods[method] = summarize(rates, outcome)
        if method == "gd":
            below, above = (int(np.flatnonzero(rates == eta)[0]) for eta in near_bound)
            results["stability"] = {
                "margin": config.margin,
                "below": _single(rates, outcome, below),
                "above": _single(rates, outcome, above),
                "predicted_iterations_coordinate_2": predicted_slow_iterations(
                    config.p, near_bound[0], config.y2, config.target
                ),
            }
            curves["gd_below_bound"] = outcome["history"][:, below].T.tolist()
        best = methods[method]["best"]
        curves[method] = None if best is None else outcome["history"][:, best["index"]].T.tolist()
    results["methods"] = methods
    results["curves"] = curves
    results["seconds"] = seconds
    return results


def _single(rates, outcome, i):
    return {
        "eta": float(rates[i]),
        "diverged_at": _iterations_or_none(outcome["diverged_at"][i]),
        "iterations_to_target_per_coordinate": [_iterations_or_none(n) for n in outcome["iterations_to_target"][i]],
        "final_error": _errors_or_none(outcome["final_error"][i]),
    }


def plot(results, config, path):
    """Per-coordinate error curves at each method's best rate, and iterations against rate."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    iterations = np.maximum(np.array(results["curves"]["iterations"]), 0.7)  # iteration 0 shown at the left edge
    colors = {"gd": "C0", "depth2": "C1", "end_to_end": "C2"}
    below = results["stability"]["below"]
    for k, style in ((0, "-"), (1, "--")):
        left.loglog(iterations, results["curves"]["gd_below_bound"][k], style, color="gray", lw=3, alpha=0.4,
                    label=f"GD at (1 - margin) x bound, w{k + 1} (eta = {below['eta']:.3g})")
    for method in METHODS:
        curve, best = results["curves"][method], results["methods"][method]["best"]
        if curve is None:
            continue
        for k, style in ((0, "-"), (1, "--")):
            left.loglog(iterations, curve[k], style, color=colors[method],
                        label=f"{LABELS[method]}, w{k + 1} (eta = {best['eta']:.3g})")
    left.axhline(config.target, color="gray", lw=0.8, ls=":")
    left.set(xlabel="iteration", ylabel="|w_k - y_k| / y_k",
             title=f"l{config.p} toy, y = ({config.y1:g}, {config.y2:g}): error per coordinate, best rates")
    left.legend(fontsize=7)
    for method in METHODS:
        summary = results["methods"][method]
        rates = np.array(summary["rates"])
        reached = np.array([np.nan if n is None else n for n in summary["iterations_to_target"]], float)
        diverged = np.array([n is not None for n in summary["diverged_at"]])
        right.loglog(rates, reached, "o-", ms=3, color=colors[method], label=LABELS[method])
        right.plot(rates[diverged], np.full(diverged.sum(), config.iterations), "x", color=colors[method])
    right.axvline(results["bound"], color="gray", lw=0.8, ls=":", label="GD bound 4 / y1^(p-2)")
    right.set(xlabel="learning rate eta", ylabel=f"iterations to error <= {config.target:g}",
              title=f"x: diverged (drawn at {config.iterations}); no point: target not reached")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _text(value, spec=""):
    return "-" if value is None else format(value, spec)


def print_summary(results, config):
    stability = results["stability"]
    print(f"l{config.p} toy, y = ({config.y1:g}, {config.y2:g}), target relative error {config.target:g}, "
          f"{config.iterations} iterations")
    print(f"GD stability bound eta < 4 / y1^(p-2) = {results['bound']:.6g}")
    for side in ("below", "above"):
        s = stability[side]
        state = f"diverged at iteration {s['diverged_at']}" if s["diverged_at"] else (
            "converges; iterations to target per coordinate "
            + ", ".join(_text(n) for n in s["iterations_to_target_per_coordinate"]))
        print(f"  eta = {s['eta']:.6g} ({side} the bound): {state}")
    predicted = stability["predicted_iterations_coordinate_2"]
    print(f"  predicted (ODE) iterations for w2 at the lower rate: {predicted:.0f}")
    print(f"{'method':<24}{'best eta':>10}{'iters':>9}{'w1':>9}{'w2':>9}  |"
          f"{'stable edge':>12}{'best there':>11}{'iters':>9}")
    for method in METHODS:
        s = results["methods"][method]
        best, contiguous = s["best"] or {}, s["best_below_first_divergence"] or {}
        w1, w2 = best.get("iterations_per_coordinate", (None, None))
        print(f"{LABELS[method]:<24}{_text(best.get('eta'), '.4g'):>10}{_text(best.get('iterations')):>9}"
              f"{_text(w1):>9}{_text(w2):>9}  |{_text(s['largest_rate_below_first_divergence'], '.4g'):>12}"
              f"{_text(contiguous.get('eta'), '.4g'):>11}{_text(contiguous.get('iterations')):>9}")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments.lp_toy", description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, default=Config.p, help="even exponent of the loss (default 4)")
    parser.add_argument("--y1", type=float, default=Config.y1, help="label of x_1 = [1, 0] (default 10)")
    parser.add_argument("--y2", type=float, default=Config.y2, help="label of x_2 = [0, 1] (default 1)")
    parser.add_argument("--target", type=float, default=None, help="target relative error per coordinate")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run")
    parser.add_argument("--rates", type=float, nargs="+", default=(),
                        help="explicit learning rates (default: a log grid around the bound)")
    parser.add_argument("--quick", action="store_true", help="CI-scale: 5000 iterations, target 0.1, coarse grid")
    parser.add_argument("--out", default=None, help="output folder (default runs/lp_toy/<UTC timestamp>/)")
    return parser


@cli
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    scale = {"iterations": 5_000, "target": 0.1, "grid_per_decade": 3, "checkpoints": 100} if args.quick else {}
    overrides = {name: getattr(args, name) for name in ("target", "iterations") if getattr(args, name) is not None}
    try:
        config = Config(p=args.p, y1=args.y1, y2=args.y2, rates=tuple(args.rates), **{**scale, **overrides})
    except ValueError as error:
        parser.error(str(error))
    return record_run(args.out, NAME, config, run, plot, print_summary)


if __name__ == "__main__":
    main()
