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

Modules: `protocol` (circles and settings), `integrals` (the field, circulation, curl and
Stokes integrals, and the run), `report` (the printed summary), `plots` (the figure), `cli`.
"""

from experiments._package_exports import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "cli": ("build_parser", "main"),
        "protocol": ("DEFAULT_CIRCLES", "NAME", "Circle", "Config"),
        "integrals": ("circulation", "curl", "field", "run", "stokes"),
        "report": ("print_summary",),
        "plots": ("figure_of", "save_figure"),
    },
)
