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

Counting (`experiments.common.curves`, shared with the gas sensor): a run is diverged when the engine
stops it (loss non-finite or above `divergence_factor` x its initial loss) or by the bounded
blow-up rule on its logged loss; "iterations to target" is the first logged iteration from which
a coordinate's relative error |w_k - y_k| / y_k stays <= target at every later log (the log
schedule is `log_schedule(iterations, log_points)`: log-spaced early, gaps <= 0.5% later).

Headline: each method at its LARGEST STABLE RATE. Stable rates need not form an interval (the
end-to-end rule can converge above a rate at which it diverges), so the largest stable rate is
the one below the method's first divergence on the grid, refined by a bisection of that
stability edge (`experiments.common.rates.stability_edge`: `edge_rounds` rounds of 3 rates); for
GD the edge found must bracket the bound 4 / y1^(p-2). The fastest rate of the grid (wherever
it lies) is reported beside it.

    python -m experiments.lp_toy [--p 4] [--y1 10] [--y2 1] [--quick] [--out DIR]

Modules: `protocol` (settings, bound, grid), `experiment` (the runs), `report` (the printed
summary), `plots` (the figure), `cli` (the command line).
"""

from experiments._package_exports import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "cli": ("build_parser", "main"),
        "protocol": (
            "LABELS",
            "METHODS",
            "NAME",
            "Config",
            "predicted_slow_iterations",
            "rate_grid",
            "stability_bound",
        ),
        "experiment": ("headline", "largest_stable", "run", "run_method", "spec", "summarize"),
        "report": ("print_summary",),
        "plots": ("figure_of", "save_figure"),
    },
)
