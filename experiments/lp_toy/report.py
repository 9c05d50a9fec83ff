"""The l_p toy's printed summary."""

from experiments.lp_toy.protocol import LABELS, METHODS


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
