"""What the l_p toy runs: its settings (`Config`), GD's stability bound, the ODE estimate of
the slow coordinate and the grid of rates (NumPy only)."""

import dataclasses
import math

import numpy as np

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
