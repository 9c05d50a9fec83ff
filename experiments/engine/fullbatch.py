"""A fast full-batch trainer for linear chains over a whole learning-rate grid.

The paper's regression experiments run full-batch gradient descent for up to 10^6 iterations
per learning rate. `model.fit` pays a Python round trip per epoch; here every point of a grid
(learning rates x seeds) advances together inside one compiled TensorFlow loop: the grid's
end-to-end kernels are stacked into one (inputs, grid x units) matrix, so a step costs two
matmuls with the data, whatever the grid size.

The maths is the library's: `chain_product` for the end-to-end kernel, `LpLoss`'s
(1/p)|y_hat - y|^p, and `end_to_end_direction` for the end-to-end update rule (eq. 24). The
optimizers follow Keras' update rules and default hyper-parameters, so that a grid point
reproduces `model.fit` on the same Keras model (tested).

A grid point whose loss becomes inf/NaN, or exceeds `blowup` times its initial loss, is
marked diverged at that iteration and reported as NaN from then on; the others go on.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from experiments.engine import sharpness as batched_sharpness
from experiments.engine import update_rules
from experiments.engine.update_rules import OPTIMIZERS
from tf_overparam.chain import chain_gradients, chain_product, check_depth, resolve_hidden_units
from tf_overparam.initializers import initialize_chain, seeded
from tf_overparam.losses import check_p, lp_loss_slope, lp_loss_values
from tf_overparam.preconditioning import end_to_end_direction
from tf_overparam.validation import check_positive_int

UNROLL = 4  # steps per iteration of the compiled loop: fewer loop round trips, short traces
UPDATES = ("chain", "end_to_end")


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """One configuration of a linear model trained full batch.

    Args:
        depth: int >= 1, the depth N (of the chain, or emulated by the end-to-end rule).
        hidden_units: hidden width of the chain (an int for all hidden layers).
        update: "chain" (the optimizer on every factor of a depth-N chain) or "end_to_end"
            (a single matrix moved by eq. 24 for depth N, then the optimizer).
        optimizer: "gd", "adagrad", "adadelta" or "adam" (Keras' rules and defaults).
        initializer: chain initializer (instance, name or config) of the factors.
        p: exponent of the l_p loss (1/p)|y_hat - y|^p.
        weight_decay: lambda >= 0: lambda W_j is added to each factor's gradient (eq. 11);
            for "end_to_end", lambda N W_e (eq. 24).
    """

    depth: int = 1
    hidden_units: int = 1
    update: str = "chain"
    optimizer: str = "gd"
    initializer: object = "near_zero"
    p: float = 2.0
    weight_decay: float = 0.0

    def __post_init__(self):
        check_depth(self.depth)
        if self.update not in UPDATES:
            raise ValueError(f"`update` must be one of {UPDATES}, got {self.update!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        check_p(self.p)
        if not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}.")


@dataclasses.dataclass
class GridResult:
    """Loss curves of a grid, logged at `iterations` (iteration 0 is the initial loss).

    `losses[t, g]` is grid point g's full-batch loss after `iterations[t]` steps (NaN once it
    diverged); `diverged_at[g]` is the iteration at which it diverged, or -1.
    `sharpness[s, g]` is grid point g's `FullBatchTrainer.sharpness()` after
    `sharpness_iterations[s]` steps (NaN where diverged); none by default, shape (0, grid).
    """

    learning_rates: np.ndarray
    seeds: np.ndarray
    iterations: np.ndarray
    losses: np.ndarray
    diverged_at: np.ndarray
    kernels: np.ndarray
    sharpness_iterations: np.ndarray = None
    sharpness: np.ndarray = None

    def __post_init__(self):
        if self.sharpness_iterations is None:
            self.sharpness_iterations = np.zeros(0, dtype=np.int64)
        if self.sharpness is None or np.size(self.sharpness) == 0:
            self.sharpness = np.zeros((0, np.size(self.learning_rates)))


def log_schedule(iterations, points=400):
    """Iterations at which to log: log-spaced early, linear later, always 0 and `iterations`."""
    geometric = np.unique(np.round(np.geomspace(1, iterations, points // 2)).astype(np.int64))
    linear = np.linspace(0, iterations, points // 2 + 1).astype(np.int64)
    return np.unique(np.concatenate([[0], geometric, linear]))


def sharpness_schedule(schedule, every):
    """The iterations of `schedule` at which to compute the sharpness: every `every`-th one from
    the first, and the last. Computed from the whole schedule, it names the same iterations
    for a run resumed with the rest of it (`FullBatchTrainer.run(sharpness_at=...)`)."""
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        raise ValueError(f"`sharpness_every` must be a positive int, got {every!r}.")
    schedule = np.asarray(schedule, dtype=np.int64)
    return np.unique(np.concatenate([schedule[::every], schedule[-1:]]))


class FullBatchTrainer:
    """Trains one `ChainSpec` on (x, y) for a grid of learning rates and seeds at once.

    Args:
        x: (examples, inputs) array; y: (examples, units) array.
        spec: the `ChainSpec`.
        learning_rates: sequence of positive floats.
        seeds: sequence of ints; each seed draws its own initial chain.
        blowup: a loss above blowup x the initial loss counts as diverged.
        dtype: float dtype of the computation.

    Example:

    >>> x = np.eye(2, dtype="float32"); y = np.array([[1.0], [0.5]], "float32")
    >>> trainer = FullBatchTrainer(x, y, ChainSpec(depth=1), learning_rates=[0.1, 1.0])
    >>> result = trainer.run(100)
    >>> result.losses.shape[1]
    2
    """

    def __init__(self, x, y, spec, learning_rates, seeds=(0,), blowup=1e6, dtype="float32"):
        self.spec = spec
        self.dtype = tf.as_dtype(dtype)
        self.x = tf.constant(np.asarray(x), dtype=self.dtype)
        self.y = tf.constant(np.asarray(y), dtype=self.dtype)
        if self.x.shape.rank != 2 or self.y.shape.rank != 2 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"`x` and `y` must be 2-D with equal rows, got {self.x.shape} and {self.y.shape}.")
        rates = np.asarray(learning_rates, dtype=np.float64)
        if rates.ndim != 1 or rates.size == 0 or not np.all(rates > 0):
            raise ValueError(f"`learning_rates` must be a non-empty list of positive floats, got {learning_rates!r}.")
        self.learning_rates = np.tile(rates, len(seeds))
        self.seeds = np.repeat(np.asarray(seeds, dtype=np.int64), rates.size)
        self.grid = self.learning_rates.size
        (examples, inputs), self.units = self.x.shape, self.y.shape[1]
        # The gradient matmul uses x / (examples * units): the mean of the loss, folded in once.
        self._x_mean = self.x / (examples * self.units)
        chains = [_initial_chain(spec, int(seed), inputs, self.units) for seed in self.seeds]
        self.factors = [
            tf.Variable(np.stack([chain[j] for chain in chains]), dtype=self.dtype, name=f"factor_{j + 1}")
            for j in range(len(chains[0]))
        ]
        self._slots = [self._make_slots(f) for f in self.factors]
        self._step_count = tf.Variable(0, dtype=tf.int64)
        self._rates = tf.constant(self.learning_rates.reshape(-1, 1, 1), dtype=self.dtype)
        self._diverged_at = tf.Variable(-tf.ones(self.grid, dtype=tf.int64))
        self.divergence_bound = tf.constant(blowup * self.loss().numpy(), dtype=self.dtype)
        self._run_chunk = tf.function(self._chunk)
        self._hessian_product = None  # compiled at the first `sharpness()`
        self.last_sharpness = None

    def _make_slots(self, factor):
        return tuple(tf.Variable(value) for value in update_rules.initial_slots(self.spec.optimizer, factor))

    def kernel(self):
        """The grid's end-to-end kernels, (grid, inputs, units)."""
        return chain_product([tf.convert_to_tensor(f) for f in self.factors])

    def _to_rows(self, kernels):
        """(grid, inputs, units) -> (grid * units, inputs): one row per output of a grid point."""
        if self.units > 1:
            kernels = tf.transpose(kernels, [0, 2, 1])
        return tf.reshape(kernels, [self.grid * self.units, -1])

    def _from_rows(self, rows):
        """The inverse of `_to_rows`."""
        if self.units == 1:
            return tf.reshape(rows, [self.grid, -1, 1])
        return tf.transpose(tf.reshape(rows, [self.grid, self.units, -1]), [0, 2, 1])

    def _residuals(self, kernel):
        """Predictions minus targets, (examples, grid * units): one matmul for the whole grid."""
        predictions = tf.matmul(self.x, self._to_rows(kernel), transpose_b=True)
        return predictions - tf.tile(self.y, [1, self.grid]) if self.units > 1 else predictions - self.y

    def _grid_mean(self, values):
        """Mean over examples and units of an (examples, grid * units) tensor, per grid point."""
        return tf.reduce_mean(tf.reshape(values, [-1, self.grid, self.units]), axis=(0, 2))

    def loss(self):
        """Current full-batch loss of every grid point, (grid,), as `LpLoss` computes it."""
        return self._grid_mean(lp_loss_values(self._residuals(self.kernel()), self.spec.p))

    def _loss_gradients(self, factors):
        """Losses and the loss's gradients with respect to `factors`, by hand: two matmuls with
        the data for the end-to-end gradient, then eq. 14 along the chain (fewer ops than
        autodiff in this hot loop)."""
        p = self.spec.p
        residual = self._residuals(chain_product(factors))
        losses = self._grid_mean(lp_loss_values(residual, p))
        slope = lp_loss_slope(residual, p)
        kernel_gradient = self._from_rows(tf.matmul(slope, self._x_mean, transpose_a=True))
        return losses, chain_gradients(factors, kernel_gradient)

    def _gradients(self, factors):
        """Losses and the update directions: the loss's gradients, moved by eq. 24 for the
        end-to-end rule, plus the weight decay."""
        losses, gradients = self._loss_gradients(factors)
        decay = self.spec.weight_decay
        if self.spec.update == "end_to_end":
            direction = end_to_end_direction(factors[0], gradients[0], self.spec.depth)
            gradients = [direction + (decay * self.spec.depth) * factors[0]] if decay else [direction]
        elif decay:
            gradients = [g + decay * f for g, f in zip(gradients, factors)]
        return losses, gradients

    def _apply(self, factor, gradient, slots, count):
        """One optimizer update (`update_rules`); returns the new factor and slots."""
        return update_rules.apply_update(self.spec.optimizer, factor, gradient, slots, count, self._rates)

    def _step(self, state):
        """One step of every grid point. Grid points never mix (column g of X K and of X^T R
        depends on grid point g alone), so a diverged point needs no masking: it is only
        marked, at the first iteration its loss is NaN or above the blow-up bound."""
        factors, slots, diverged_at, count = state
        losses, gradients = self._gradients(list(factors))
        healthy = (losses <= self.divergence_bound) | (diverged_at >= 0)  # False for NaN losses
        diverged_at = tf.where(healthy, diverged_at, count)
        updates = [self._apply(f, g, s, count) for f, g, s in zip(factors, gradients, slots)]
        return tuple(u[0] for u in updates), tuple(u[1] for u in updates), diverged_at, count + 1

    def _chunk(self, steps):
        state = (
            tuple(tf.convert_to_tensor(f) for f in self.factors),
            tuple(tuple(tf.convert_to_tensor(v) for v in slots) for slots in self._slots),
            tf.convert_to_tensor(self._diverged_at),
            tf.convert_to_tensor(self._step_count),
        )
        for _ in tf.range(steps // UNROLL):
            for _ in range(UNROLL):
                state = self._step(state)
        for _ in tf.range(steps % UNROLL):
            state = self._step(state)
        factors, slots, diverged_at, count = state
        for variable, value in zip(self.factors, factors):
            variable.assign(value)
        for variables, values in zip(self._slots, slots):
            for variable, value in zip(variables, values):
                variable.assign(value)
        self._diverged_at.assign(diverged_at)
        self._step_count.assign(count)
        return self._reported(self.loss(), diverged_at)

    def _reported(self, losses, diverged_at):
        """Losses with NaN where a grid point diverged (also where this loss is the bad one)."""
        healthy = (diverged_at < 0) & (losses <= self.divergence_bound)
        return tf.where(healthy, losses, tf.constant(math.nan, self.dtype))

    def advance(self, steps):
        """Runs `steps` iterations; returns the grid's losses after them (NaN where diverged)."""
        return self._run_chunk(tf.constant(steps, tf.int64)).numpy()

    @property
    def iteration(self):
        return int(self._step_count.numpy())

    def sharpness(self, iterations=20, seed=0):
        """Every grid point's sharpness: the largest eigenvalue of the Hessian of its loss (the
        one `loss()` reports, without weight decay, which adds lambda to every eigenvalue of a
        chain) with respect to what it trains: all factors of its chain, or for "end_to_end" the
        end-to-end matrix. For eq. 24 that is the plain Hessian, not the preconditioned one, so
        2 / rate is not its stability bound; for GD on a chain, rate x sharpness < 2 is (the edge
        of stability, Cohen et al., ICLR 2021). Batched Lanczos with full reorthogonalisation
        (`experiments.engine.sharpness`): at most `iterations` Hessian-vector products for the
        whole grid, no more than the dimension (exact then). Returns float64 (grid,), NaN where
        a grid point diverged."""
        iterations, seed = check_positive_int(iterations, "iterations"), check_positive_int(seed, "seed", minimum=0)
        if self._hessian_product is None:
            self._hessian_product = batched_sharpness.batched_hessian_product(
                lambda factors: self._loss_gradients(factors)[1], self.factors
            )
        dimension = sum(math.prod(f.shape[1:]) for f in self.factors)
        values = batched_sharpness.top_eigenvalues(self._hessian_product, self.grid, dimension, iterations, seed)
        diverged = np.isnan(self._reported(self.loss(), self._diverged_at).numpy())
        return np.where(diverged, np.nan, values)

    def run(self, iterations, schedule=None, on_log=None, sharpness_every=None, sharpness_at=None):
        """Trains for `iterations` steps, logging at `schedule` (default `log_schedule`).

        `on_log(trainer, iteration, losses)` is called at each logged iteration (for progress
        bars and TensorBoard). The sharpness (`sharpness()`) is computed at the logged
        iterations in `sharpness_at`, or at every `sharpness_every`-th of `schedule` and its
        last (`sharpness_schedule`; a resumed run passes `sharpness_at` computed from the whole
        schedule); `last_sharpness` holds it during that log's `on_log`, else None.
        Returns a `GridResult`.
        """
        schedule = log_schedule(iterations) if schedule is None else np.asarray(schedule)
        if sharpness_every is not None and sharpness_at is not None:
            raise ValueError("Give `sharpness_every` or `sharpness_at`, not both.")
        if sharpness_every is not None:
            sharpness_at = sharpness_schedule(schedule, sharpness_every)
        sharpness_at = set() if sharpness_at is None else {int(i) for i in np.ravel(sharpness_at)}
        logged, sharp_iterations, sharp_values = [], [], []
        for target in schedule:
            if target > self.iteration:
                losses = self.advance(int(target) - self.iteration)
            else:
                losses = self._reported(self.loss(), self._diverged_at).numpy()
            logged.append(losses)
            self.last_sharpness = self.sharpness() if int(target) in sharpness_at else None
            if self.last_sharpness is not None:
                sharp_iterations.append(int(target))
                sharp_values.append(self.last_sharpness)
            if on_log is not None:
                on_log(self, int(target), losses)
        return GridResult(
            learning_rates=self.learning_rates,
            seeds=self.seeds,
            iterations=np.asarray(schedule, dtype=np.int64),
            losses=np.asarray(logged, dtype=np.float64),
            diverged_at=self._diverged_at.numpy(),
            kernels=self.kernel().numpy(),
            sharpness_iterations=np.asarray(sharp_iterations, dtype=np.int64),
            sharpness=np.asarray(sharp_values, dtype=np.float64).reshape(-1, self.grid),
        )

    # ------------------------------------------------------------------ checkpoint state

    def get_state(self):
        """The full training state as NumPy arrays (a flat dict, e.g. for `np.savez`): the
        factors, the optimizer slots, the step count, the divergence marks and the divergence
        bound. `set_state` on a trainer built with the same arguments continues exactly."""
        state = {f"factor_{j}": f.numpy() for j, f in enumerate(self.factors)}
        for j, slots in enumerate(self._slots):
            state.update({f"slot_{j}_{k}": s.numpy() for k, s in enumerate(slots)})
        state["step"] = self._step_count.numpy()
        state["diverged_at"] = self._diverged_at.numpy()
        state["divergence_bound"] = self.divergence_bound.numpy()
        return state

    def set_state(self, state):
        """Restores a state from `get_state` (of a trainer with the same x, y, spec, rates and
        seeds). Raises ValueError if a part is missing or has another shape."""
        expected = self.get_state()
        for key, current in expected.items():
            if key not in state or np.shape(state[key]) != np.shape(current):
                got = "missing" if key not in state else f"shape {np.shape(state[key])}"
                raise ValueError(
                    f"`state` does not fit this trainer: {key!r} should have shape {np.shape(current)}, "
                    f"got {got}; restore it into a trainer built with the same spec, learning rates and seeds."
                )
        variables = list(self.factors) + [s for slots in self._slots for s in slots]
        keys = [f"factor_{j}" for j in range(len(self.factors))]
        keys += [f"slot_{j}_{k}" for j, slots in enumerate(self._slots) for k in range(len(slots))]
        for variable, key in zip(variables, keys):
            variable.assign(np.asarray(state[key]))
        self._step_count.assign(int(state["step"]))
        self._diverged_at.assign(np.asarray(state["diverged_at"], dtype=np.int64))
        self.divergence_bound = tf.constant(np.asarray(state["divergence_bound"]), dtype=self.dtype)
        self._run_chunk = tf.function(self._chunk)  # the bound is a constant of the traced loop


def _initial_chain(spec, seed, inputs, units):
    """The initial matrices of one grid point: the chain's factors, or for the end-to-end
    rule the end-to-end kernel of the chain it emulates (float64 NumPy arrays)."""
    widths = [inputs, *resolve_hidden_units(spec.hidden_units, spec.depth, units), units]
    chain = initialize_chain(seeded(spec.initializer, seed), list(zip(widths[:-1], widths[1:])), dtype="float64")
    chain = [np.asarray(f) for f in chain]
    if spec.update == "end_to_end" and spec.depth > 1:
        return [np.asarray(chain_product(chain))]
    return chain
