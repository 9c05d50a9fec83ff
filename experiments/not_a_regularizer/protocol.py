"""What the circulation experiment integrates: the circles and the settings (`Config`)."""

import dataclasses
import math

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
