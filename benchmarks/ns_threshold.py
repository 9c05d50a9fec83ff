"""Where Newton-Schulz pays at depth 2: the preconditioner of each group of a model's kernels by
the eigh and by Newton-Schulz, on the real kernels of freshly built models.

`EndToEnd` reads each selected kernel as its layer's linear map and computes the preconditioners
of the matrices of one shape (oriented tall, a >= b) in one batched call. Per model and per such
group (a kernel with a side of 1 takes the closed form whatever the method, and is left out),
`compute_preconditioner(stack, 2, method=...)` of the whole stack is timed with
method="eigh" and method="newton_schulz", each in one compiled loop, the two interleaved
(`benchmarks.timing.measure`, medians). Each loop step feeds the next one the kernels plus
1e-30 times a sum of the roots, which leaves them unchanged in float32 but keeps the work from
being hoisted out of the loop. Newton-Schulz falls back to the eigh where it does not converge
(within the same call, so its time then holds both); `converged` says whether it did, from
`return_info`. `auto_method` is the method `method="auto"` runs on the group on this machine:
Newton-Schulz (or its fallback) where `preconditioning.auto_tries_newton_schulz` says so (from
`NEWTON_SCHULZ_MIN_COLUMNS` columns on, on an accelerator), the eigh otherwise.

The summary gives the smallest column count at which Newton-Schulz was faster, and the smallest
column count from which it was faster for every group with at least that many columns: the
threshold this run supports.
"""

import keras
from keras import ops

from benchmarks import floor
from benchmarks.models import DEPTH, side_by_side_model
from benchmarks.side_by_side import end_to_end_api
from benchmarks.timing import compiled_loop, measure

METHODS = ("eigh", "newton_schulz")


def shape_groups(model):
    """The matrices of the kernels `EndToEnd` selects in `model`, oriented tall and stacked by
    shape: a list of (n, rows, cols) float32 NumPy arrays, largest group first."""
    _, kernels, _ = end_to_end_api()
    return [stack.astype("float32") for stack in floor.stacked_by_shape(kernels(model))]


def preconditioner_case(stack, method):
    """A compiled loop whose step computes the depth-2 preconditioner of the whole `stack`."""
    from tf_overparam.preconditioning import compute_preconditioner

    def step(kernels):
        preconditioner = compute_preconditioner(kernels, DEPTH, method=method)
        return kernels + 1e-30 * (ops.sum(preconditioner.root) + ops.sum(preconditioner.inverse_root))

    return compiled_loop(step, ops.convert_to_tensor(stack), unroll=1)


def method_run(stack, method):
    """The method that `compute_preconditioner(stack, 2, method=method)` runs (`return_info`)."""
    from tf_overparam.preconditioning import compute_preconditioner

    _, info = compute_preconditioner(ops.convert_to_tensor(stack), DEPTH, method=method, return_info=True)
    return info.method_name


def group_result(config, stack):
    """One group's row: shape, size, both timings, their ratio, convergence, `auto`'s pick."""
    from tf_overparam.preconditioning import auto_tries_newton_schulz

    count, rows, cols = stack.shape
    timings = measure({m: preconditioner_case(stack, m) for m in METHODS}, config.target_s, config.repeats)
    seconds = {m: timings[m]["seconds_per_step"] for m in METHODS}
    return {
        "rows": rows,
        "cols": cols,
        "group_size": count,
        "timings": timings,
        "eigh_s": seconds["eigh"],
        "newton_schulz_s": seconds["newton_schulz"],
        "newton_schulz_over_eigh": seconds["newton_schulz"] / seconds["eigh"],
        "newton_schulz_faster": seconds["newton_schulz"] < seconds["eigh"],
        "converged": method_run(stack, "newton_schulz") == "newton_schulz",
        "auto_tries_newton_schulz": auto_tries_newton_schulz(cols),
        "auto_method": method_run(stack, "auto"),
    }


def thresholds(groups):
    """(the smallest column count at which Newton-Schulz was faster, the smallest column count c
    such that it was faster for every group of at least c columns), each None if there is none."""
    faster = [g["cols"] for g in groups if g["newton_schulz_faster"]]
    slower = [g["cols"] for g in groups if not g["newton_schulz_faster"]]
    smallest = min(faster, default=None)
    from_on = [c for c in faster if all(s < c for s in slower)]
    return smallest, min(from_on, default=None)


def ns_threshold_section(config, write=None):
    """Every model of `config.models`; `write(section)` after each, so that a long run leaves its
    finished models on disk."""
    from tf_overparam.preconditioning import NEWTON_SCHULZ_MIN_COLUMNS, auto_tries_newton_schulz

    section = {
        "depth": DEPTH,
        "auto_min_columns": NEWTON_SCHULZ_MIN_COLUMNS,
        # Whether "auto" tries Newton-Schulz at all on this machine (on an accelerator only).
        "auto_tries_newton_schulz_here": auto_tries_newton_schulz(NEWTON_SCHULZ_MIN_COLUMNS),
        "models": {},
    }
    for name in config.models:
        build, input_shape, _ = side_by_side_model(name, config.image_size, config.classes)
        keras.utils.set_random_seed(0)
        model = build()
        stacks = shape_groups(model)
        groups = [group_result(config, s) for s in stacks if min(s.shape[1:]) > 1]
        groups.sort(key=lambda g: (g["cols"], g["rows"]))
        section["models"][name] = {
            "input_shape": list(input_shape),
            "selected_kernels": sum(s.shape[0] for s in stacks),
            "closed_form_kernels": sum(s.shape[0] for s in stacks if min(s.shape[1:]) == 1),
            "groups": groups,
        }
        every = [g for m in section["models"].values() for g in m["groups"]]
        section["smallest_faster_columns"], section["faster_from_columns"] = thresholds(every)
        if write is not None:
            write(section)
    return section
