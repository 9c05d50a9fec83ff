"""The single-output end-to-end field F of eq. 27, its circulation around a circle (trapezoid
rule), its curl (autodiff) and the curl's integral over the disk (Green's theorem)."""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_overparam.preconditioning import end_to_end_direction


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
