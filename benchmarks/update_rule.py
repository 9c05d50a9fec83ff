"""Section 3 of `benchmarks.run`: one eq. 24 step (`end_to_end_direction`, depth 2) against one
SGD step and in units of one `W^T G` matmul of the same kernel, exact and amortised
(`refresh_every`), each in a compiled loop, per kernel shape (a single output takes eq. 27)."""

import numpy as np
import tensorflow as tf

from benchmarks.floor import floor_direction
from benchmarks.models import DEPTH, benchmark_kernel
from benchmarks.timing import compiled_loop, measure
from experiments.engine.fullbatch import UNROLL
from tf_overparam.preconditioning import (
    apply_preconditioner,
    auto_tries_newton_schulz,
    compute_preconditioner,
    end_to_end_direction,
    newton_schulz_square_roots,
)

UPDATE_RATE = 1e-3  # learning rate of the update-rule loops
REFRESH_EVERY = 10  # the amortised rule's k reported
RULES = ("sgd", "matmuls", "exact", "between_refreshes", "refresh", "gram_eigh")


def _update_case(kernel, direction, grad):
    """w <- w - r direction(w, G(w)) in a compiled loop; G(w) = G + 1e-3 w, so that no step's work
    is loop-invariant (a constant preconditioner applied to a constant G could be hoisted)."""
    return compiled_loop(lambda w: w - UPDATE_RATE * direction(w, grad + 1e-3 * w), kernel, UNROLL)


def _gram_eigh_step(w, g):
    """G, after the float32 eigh of W^T W (its eigenvalues enter with a tiny weight, so it runs)."""
    oriented = tf.transpose(w) if w.shape[0] < w.shape[1] else w
    eigenvalues = tf.linalg.eigh(tf.matmul(oriented, oriented, transpose_a=True))[0]
    return g + 1e-30 * tf.reduce_sum(eigenvalues)


def takes_newton_schulz(kernel):
    """Whether the exact depth-2 direction of `kernel` goes through Newton-Schulz."""
    oriented = kernel if kernel.shape[0] >= kernel.shape[1] else tf.transpose(kernel)
    return auto_tries_newton_schulz(min(kernel.shape)) and bool(
        newton_schulz_square_roots(tf.matmul(oriented, oriented, transpose_a=True)).converged
    )


def update_rule_section(config):
    """The eq. 24 direction in units of one `W^T G` matmul of the same kernel.

    Cases per kernel, each a whole step w <- w - r d(w): `sgd` (d = G), `matmuls` (d = W (W^T G),
    two matmuls of the `W^T G` kind), `exact` (d = eq. 24 at the current W),
    `between_refreshes` (d = P(W_0) G with a preconditioner kept from the start: the step of the
    amortised rule between refreshes), `gram_eigh` (d = G, plus the Gram matrix of the current W
    and its float32 `eigh`, the part of `exact` no rearrangement of products saves; its input
    changes every step, as in training), `refresh` (d = P(W) G with P(W) computed at the current
    W, `compute_preconditioner` then `apply_preconditioner`: the amortised rule's step at a
    refresh done in one step, by the method of `exact`) and, for
    kernels with both sides above 1, `floor` (d = `benchmarks.floor.floor_direction`, the exact
    depth-2 direction through the eigh with nothing but its unavoidable products). One matmul is
    half the `matmuls` step; the amortised rule with refresh_every = k costs
    between_refreshes + (refresh - between_refreshes) / k on average. Kernels: Gaussian
    N(0, 0.01) of `config.kernels` and `config.conditioned_kernels` with log-spaced singular
    values (where depth 2 declines Newton-Schulz); `newton_schulz` says which path the exact
    direction takes for the kernel the loop starts from (the eigh on a CPU,
    `preconditioning.auto_tries_newton_schulz`).
    """
    rng = np.random.default_rng(0)
    cases, shapes = {}, {}
    kernels = [(shape, None) for shape in config.kernels] + [(spec[:2], spec[2]) for spec in config.conditioned_kernels]
    for shape, condition in kernels:
        kernel = tf.constant(benchmark_kernel(rng, shape, condition), tf.float32)
        grad = tf.constant(rng.normal(scale=0.01, size=shape), tf.float32)
        kept = compute_preconditioner(kernel, DEPTH)
        key = "x".join(map(str, shape)) + ("" if condition is None else f", cond(W) {condition:g}")
        shapes[key] = {"shape": list(shape), "newton_schulz": takes_newton_schulz(kernel)}
        cases[f"{key}/sgd"] = _update_case(kernel, lambda w, g: g, grad)
        cases[f"{key}/matmuls"] = _update_case(
            kernel, lambda w, g: tf.matmul(w, tf.matmul(w, g, transpose_a=True)), grad
        )
        cases[f"{key}/exact"] = _update_case(kernel, lambda w, g: end_to_end_direction(w, g, DEPTH), grad)
        cases[f"{key}/between_refreshes"] = _update_case(kernel, lambda w, g, p=kept: apply_preconditioner(p, g), grad)
        cases[f"{key}/refresh"] = _update_case(
            kernel, lambda w, g: apply_preconditioner(compute_preconditioner(w, DEPTH), g), grad
        )
        cases[f"{key}/gram_eigh"] = _update_case(kernel, _gram_eigh_step, grad)
        if min(shape) > 1:  # a single output takes eq. 27's closed form, below any eigh
            cases[f"{key}/floor"] = _update_case(kernel, floor_direction, grad)
    timings = measure(cases, config.target_s, config.repeats)
    section = {"depth": DEPTH, "refresh_every": REFRESH_EVERY, "kernels": shapes}
    for name, timing in timings.items():
        key, rule = name.split("/")
        section["kernels"][key][rule] = timing
    for rules in section["kernels"].values():
        seconds = {rule: rules[rule]["seconds_per_step"] for rule in RULES}
        matmul = seconds["matmuls"] / 2
        rules["exact_vs_sgd"] = seconds["exact"] / seconds["sgd"]
        rules["exact_in_matmuls"] = seconds["exact"] / matmul
        rules["between_refreshes_in_matmuls"] = seconds["between_refreshes"] / matmul
        rules["refresh_in_matmuls"] = seconds["refresh"] / matmul
        rules["gram_eigh_in_matmuls"] = (seconds["gram_eigh"] - seconds["sgd"]) / matmul
        rules["amortised_in_matmuls"] = (
            seconds["between_refreshes"] + (seconds["refresh"] - seconds["between_refreshes"]) / REFRESH_EVERY
        ) / matmul
        if "floor" in rules:
            rules["floor_in_matmuls"] = rules["floor"]["seconds_per_step"] / matmul
    return section
