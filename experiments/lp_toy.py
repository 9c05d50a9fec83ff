"""The two-point l_p regression of Section 7: plain gradient descent against depth 2.

Inputs x_1 = [1, 0], x_2 = [0, 1], labels y_1 > y_2 > 0, even p >= 2, and the l_p loss of
docs/equations.md ("l_p loss") averaged over the m = 2 points (`tf_overparam.LpLoss`):

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
(w = 0 is a fixed point of depth >= 2). Every method runs on the shared full-batch engine
(`experiments.engine.fullbatch.FullBatchTrainer`, x = I_2, the l_p loss of `LpLoss`), a log grid of
rates at once:
- gd: depth 1 from w = 0;
- depth2: GD on the factors of x -> x^T F_1 F_2 (F_1: 2 x h, F_2: h x 1), balanced at w_0
  (`initializers.Balanced`, `factorization.balanced_factors`), eq. 14 for the factor gradients;
- end_to_end: w <- w - eta `end_to_end_direction`(w, dL/dw, 2) (eq. 24, eq. 27 for one
  output), which balanced depth-2 GD follows up to O(eta^2) per step.

Counting (`experiments._curves`, shared with the gas sensor): a run is diverged when the engine
stops it (loss non-finite or above `divergence_factor` x its initial loss) or by the bounded
blow-up rule on its logged loss; "iterations to target" is the first logged iteration from which
a coordinate's relative error |w_k - y_k| / y_k stays <= target at every later log (the log
schedule is `log_schedule(iterations, log_points)`: log-spaced early, gaps <= 0.5% later).

Headline: each method at its LARGEST STABLE RATE. Stable rates need not form an interval (the
end-to-end rule can converge above a rate at which it diverges), so the largest stable rate is
the one below the method's first divergence on the grid, refined by a bisection of that
stability edge (`experiments._rates.stability_edge`: `edge_rounds` rounds of 3 rates); for
GD the edge found must bracket the bound 4 / y1^(p-2). The fastest rate of the grid (wherever
it lies) is reported beside it.

    python -m experiments.lp_toy [--p 4] [--y1 10] [--y2 1] [--quick] [--out DIR]
"""

import argparse
import dataclasses
import math
import time

import matplotlib

matplotlib.use("Agg")
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import _curves, _rates  # noqa: E402
from experiments._common import cli, record_run  # noqa: E402
from experiments.engine.fullbatch import ChainSpec, FullBatchTrainer, log_schedule  # noqa: E402
from tf_overparam import initializers  # noqa: E402

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
    log_points: int = 2000  # log_schedule: 1000 log-spaced (1.3% apart) + gaps of 0.1% of the horizon
    edge_rounds: int = 3  # stability-edge bisection: each round divides the bracket's log width by 4

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
        for name in ("iterations", "grid_per_decade", "hidden_units", "log_points", "edge_rounds"):
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


def spec(method, config):
    """The engine's `ChainSpec` of a method (see the module docstring)."""
    if method == "gd":
        return ChainSpec(depth=1, initializer="zeros", p=config.p)
    start = keras.initializers.Constant(config.init_scale / math.sqrt(2))
    balanced = initializers.Balanced(start, seed=0)
    update = "end_to_end" if method == "end_to_end" else "chain"
    return ChainSpec(depth=2, hidden_units=config.hidden_units, update=update, initializer=balanced, p=config.p)


def run_method(method, config, rates, schedule):
    """Runs `method` at every rate for `schedule[-1]` full-batch steps on the shared engine.

    Returns a dict of NumPy arrays, R = len(rates), T = len(schedule): `iterations` (T,);
    `losses` (T, R); `history` (T, R, 2), the relative errors |w_k - y_k| / y_k at the logs
    (NaN once diverged); `diverged_at` (R,), the engine's divergence iteration, else the
    bounded blow-up rule's logged iteration (-1 if neither); `iterations_to_target` (R, 2),
    the sustained crossing per coordinate (-1 if not reached); `final_error` (R, 2).
    """
    labels = config.labels
    trainer = FullBatchTrainer(
        np.eye(2), labels[:, np.newaxis], spec(method, config), rates, blowup=config.divergence_factor, dtype="float64"
    )
    errors = []

    def on_log(trainer, iteration, losses):
        error = np.abs(trainer.kernel().numpy()[..., 0] - labels) / labels
        errors.append(np.where(np.isfinite(losses)[:, np.newaxis], error, np.nan))

    result = trainer.run(int(schedule[-1]), schedule=schedule, on_log=on_log)
    history = np.asarray(errors)
    diverged = np.array(
        [
            engine if engine >= 0 else _or_minus_one(_curves.diverged_at(result.iterations, result.losses[:, g]))
            for g, engine in enumerate(result.diverged_at)
        ]
    )
    history[:, diverged >= 0] = np.where(
        result.iterations[:, np.newaxis, np.newaxis] < diverged[diverged >= 0, None], history[:, diverged >= 0], np.nan
    )
    reached = np.array(
        [
            [
                _or_minus_one(_curves.sustained_crossing(result.iterations, history[:, g, k], config.target))
                for k in (0, 1)
            ]
            for g in range(len(rates))
        ]
    )
    return {
        "iterations": result.iterations,
        "losses": result.losses,
        "history": history,
        "diverged_at": diverged,
        "iterations_to_target": reached,
        "final_error": history[-1],
    }


def _or_minus_one(value):
    return -1 if value is None else value


def _iterations_or_none(value):
    return None if value < 0 else int(value)


def _errors_or_none(errors):
    """Errors as JSON lists, a diverged run's NaN as None (strict JSON)."""
    return [None if math.isnan(e) else e for e in np.asarray(errors).tolist()]


def _both(outcome):
    """Iterations until both coordinates stay within the target (-1: not reached)."""
    per_coordinate = outcome["iterations_to_target"]
    return np.where((per_coordinate >= 0).all(axis=1), per_coordinate.max(axis=1), -1)


def _entry(rates, outcome, i):
    """One rate's outcome, JSON-ready."""
    both = _both(outcome)
    return {
        "index": int(i),
        "eta": float(rates[i]),
        "diverged_at": _iterations_or_none(outcome["diverged_at"][i]),
        "iterations": _iterations_or_none(both[i]),
        "iterations_per_coordinate": [_iterations_or_none(n) for n in outcome["iterations_to_target"][i]],
        "final_error": _errors_or_none(outcome["final_error"][i]),
    }


def summarize(rates, outcome):
    """Per-rate outcomes, the best rate (fastest to target, both coordinates), the largest
    rate below the first diverging one (the contiguous stable range) and the best there."""
    both = _both(outcome)
    converged = both >= 0
    diverged = outcome["diverged_at"] >= 0
    first_divergent = int(np.argmax(diverged)) if diverged.any() else len(rates)

    def best(mask):
        if not mask.any():
            return None
        candidates = np.flatnonzero(mask)
        return _entry(rates, outcome, int(candidates[np.argmin(both[candidates])]))

    return {
        "rates": rates.tolist(),
        "diverged_at": [_iterations_or_none(n) for n in outcome["diverged_at"]],
        "iterations_to_target": [_iterations_or_none(n) for n in both],
        "iterations_to_target_per_coordinate": [
            [_iterations_or_none(n) for n in row] for row in outcome["iterations_to_target"]
        ],
        "final_error": [_errors_or_none(row) for row in outcome["final_error"]],
        "best": best(converged),
        "first_divergent_rate": float(rates[first_divergent]) if first_divergent < len(rates) else None,
        "largest_rate_below_first_divergence": float(rates[first_divergent - 1]) if first_divergent else None,
        "best_below_first_divergence": best(converged & (np.arange(len(rates)) < first_divergent)),
    }


def largest_stable(method, config, rates, outcome, summary, schedule):
    """Bisects the stability edge between the largest grid rate below the first divergence and
    that first diverging rate (grid run: `rates`, `outcome`, `summary`); returns the edge
    bracket, the outcome at its stable end (the method's largest stable rate) and its curve.
    None if the grid has no such bracket."""
    low, high = summary["largest_rate_below_first_divergence"], summary["first_divergent_rate"]
    if low is None or high is None:
        return None
    runs = {float(eta): (rates, outcome, i) for i, eta in enumerate(rates)}

    def is_stable(candidates):
        result = run_method(method, config, candidates, schedule)
        runs.update({float(eta): (candidates, result, i) for i, eta in enumerate(candidates)})
        return result["diverged_at"] < 0

    low, high = _rates.stability_edge(is_stable, low, high, rounds=config.edge_rounds)
    at_rates, at_outcome, i = runs[low]
    return {"bracket": [low, high], "at_edge": _entry(at_rates, at_outcome, i), "curve": at_outcome["history"][:, i].T}


def run(config):
    """Runs the whole experiment; returns the results dict (JSON-ready)."""
    bound = stability_bound(config.p, config.y1)
    near_bound = np.array([(1 - config.margin) * bound, (1 + config.margin) * bound])
    grid = rate_grid(config)
    schedule = log_schedule(config.iterations, config.log_points)
    results = {"bound": bound, "bound_formula": "eta < 4 / y1^(p-2)  (loss averaged over the m = 2 points)"}
    curves = {"iterations": schedule.tolist()}
    methods, seconds = {}, {}
    for method in METHODS:
        rates = np.sort(np.concatenate([grid, near_bound])) if method == "gd" else grid
        start = time.perf_counter()
        outcome = run_method(method, config, rates, schedule)
        summary = summarize(rates, outcome)
        edge = largest_stable(method, config, rates, outcome, summary, schedule)
        seconds[method] = time.perf_counter() - start
        if edge is not None:
            summary["stability_edge"] = edge["bracket"]
            summary["at_largest_stable_rate"] = edge["at_edge"]
            curves[f"{method}_largest_stable"] = edge["curve"].tolist()
        methods[method] = summary
        if method == "gd":
            below, above = (int(np.flatnonzero(rates == eta)[0]) for eta in near_bound)
            results["stability"] = {
                "margin": config.margin,
                "below": _entry(rates, outcome, below),
                "above": _entry(rates, outcome, above),
                "predicted_iterations_coordinate_2": predicted_slow_iterations(
                    config.p, near_bound[0], config.y2, config.target
                ),
            }
            curves["gd_below_bound"] = outcome["history"][:, below].T.tolist()
        best = summary["best"]
        curves[method] = None if best is None else outcome["history"][:, best["index"]].T.tolist()
    results["methods"] = methods
    results["headline"] = headline(methods)
    results["curves"] = curves
    results["seconds"] = seconds
    return results


def headline(methods):
    """Each method at its largest stable rate: iterations to target (both coordinates, and
    per coordinate) and the speedup over GD at GD's largest stable rate."""
    rows = {}
    gd = (methods["gd"].get("at_largest_stable_rate") or {}).get("iterations")
    for method, summary in methods.items():
        at_edge = summary.get("at_largest_stable_rate")
        if at_edge is None:
            rows[method] = None
            continue
        n = at_edge["iterations"]
        rows[method] = {
            "eta": at_edge["eta"],
            "iterations": n,
            "iterations_per_coordinate": at_edge["iterations_per_coordinate"],
            "speedup_vs_gd": gd / n if gd and n else None,
        }
    return rows


def plot(results, config, path):
    """Per-coordinate error curves at each method's largest stable rate, and iterations against rate."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    iterations = np.maximum(np.array(results["curves"]["iterations"]), 0.7)  # iteration 0 shown at the left edge
    colors = {"gd": "C0", "depth2": "C1", "end_to_end": "C2"}
    below = results["stability"]["below"]
    for k, style in ((0, "-"), (1, "--")):
        left.loglog(
            iterations,
            results["curves"]["gd_below_bound"][k],
            style,
            color="gray",
            lw=3,
            alpha=0.4,
            label=f"GD at (1 - margin) x bound, w{k + 1} (eta = {below['eta']:.3g})",
        )
    for method in METHODS:
        curve, edge = results["curves"].get(f"{method}_largest_stable"), results["headline"][method]
        if curve is None:
            continue
        for k, style in ((0, "-"), (1, "--")):
            left.loglog(
                iterations,
                curve[k],
                style,
                color=colors[method],
                label=f"{LABELS[method]}, w{k + 1} (eta = {edge['eta']:.4g})",
            )
    left.axhline(config.target, color="gray", lw=0.8, ls=":")
    left.set(
        xlabel="iteration",
        ylabel="|w_k - y_k| / y_k",
        title=f"l{config.p} toy, y = ({config.y1:g}, {config.y2:g}): error per coordinate, largest stable rates",
    )
    left.legend(fontsize=7)
    for method in METHODS:
        summary = results["methods"][method]
        rates = np.array(summary["rates"])
        reached = np.array([np.nan if n is None else n for n in summary["iterations_to_target"]], float)
        diverged = np.array([n is not None for n in summary["diverged_at"]])
        right.loglog(rates, reached, "o-", ms=3, color=colors[method], label=LABELS[method])
        right.plot(rates[diverged], np.full(diverged.sum(), config.iterations), "x", color=colors[method])
        edge = results["headline"][method]
        if edge is not None and edge["iterations"] is not None:
            right.plot([edge["eta"]], [edge["iterations"]], "*", ms=12, color=colors[method])
    right.axvline(results["bound"], color="gray", lw=0.8, ls=":", label="GD bound 4 / y1^(p-2)")
    right.set(
        xlabel="learning rate eta",
        ylabel=f"iterations to error <= {config.target:g}",
        title="x: diverged; *: largest stable rate; no point: not reached",
    )
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _text(value, spec=""):
    return "-" if value is None else format(value, spec)


def print_summary(results, config):
    stability = results["stability"]
    print(
        f"l{config.p} toy, y = ({config.y1:g}, {config.y2:g}), target relative error {config.target:g}, "
        f"{config.iterations} iterations"
    )
    print(f"GD stability bound eta < 4 / y1^(p-2) = {results['bound']:.6g}")
    for side in ("below", "above"):
        s = stability[side]
        state = (
            f"diverged at iteration {s['diverged_at']}"
            if s["diverged_at"]
            else (
                "converges; iterations to target per coordinate "
                + ", ".join(_text(n) for n in s["iterations_per_coordinate"])
            )
        )
        print(f"  eta = {s['eta']:.6g} ({side} the bound): {state}")
    predicted = stability["predicted_iterations_coordinate_2"]
    print(f"  predicted (ODE) iterations for w2 at the lower rate: {predicted:.0f}")
    print("Headline: each method at its largest stable rate (below its first divergence, edge bisected)")
    print(f"{'method':<24}{'largest stable eta':>19}{'edge bracket':>22}{'iters':>9}{'w1':>9}{'w2':>9}{'vs GD':>8}")
    for method in METHODS:
        row, edge = results["headline"][method], results["methods"][method].get("stability_edge")
        if row is None:
            print(f"{LABELS[method]:<24}{'no edge on the grid':>19}")
            continue
        w1, w2 = row["iterations_per_coordinate"]
        bracket = f"[{edge[0]:.5g}, {edge[1]:.5g})"
        speedup = "-" if row["speedup_vs_gd"] is None else f"{row['speedup_vs_gd']:.2f}x"
        print(
            f"{LABELS[method]:<24}{row['eta']:>19.5g}{bracket:>22}{_text(row['iterations']):>9}"
            f"{_text(w1):>9}{_text(w2):>9}{speedup:>8}"
        )
    print("The fastest rate of the grid, wherever it lies (stable rates need not form an interval):")
    print(f"{'method':<24}{'best eta':>10}{'iters':>9}{'w1':>9}{'w2':>9}")
    for method in METHODS:
        best = results["methods"][method]["best"] or {}
        w1, w2 = best.get("iterations_per_coordinate", (None, None))
        print(
            f"{LABELS[method]:<24}{_text(best.get('eta'), '.4g'):>10}{_text(best.get('iterations')):>9}"
            f"{_text(w1):>9}{_text(w2):>9}"
        )


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m experiments.lp_toy", description=__doc__.split("\n")[0])
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
    return record_run(args.out, NAME, config, run, plot, print_summary)


if __name__ == "__main__":
    main()
