"""The kept preconditioners of `EndToEnd(refresh_every=k)` (`tf_overparam.optimizers`): their
slots, the staggered schedule of their refreshes, and the depth-2 Newton-Schulz refresh spread
over the steps of a kernel's window.

Schedule. Steps t count the calls of `apply`. The i-th selected kernel (in the order of the
model's trainable variables) refreshes at the steps t with t mod k = i mod k, and every kernel
at step 0, so that after the first step no step refreshes them all. A refresh done in one step
computes P(W_t) of the current kernel, which that step and the next k - 1 apply.

Spread refreshes. At depth 2 with k >= 2, the refreshes after step 0 of a kernel of
`preconditioning.NEWTON_SCHULZ_MIN_COLUMNS` columns or more under `method="auto"`, or of two
columns or more under `"newton_schulz"`, take Newton-Schulz spread over the kernel's window, on
every device: an eigh cannot be split over steps, and the iteration can, so that no step pays a
large kernel's whole refresh (its Gram matrix, a Lanczos estimate and up to
`NEWTON_SCHULZ_MAX_STEPS + NEWTON_SCHULZ_SPARE_STEPS` steps of three b x b products). What is
computed in one step (a refresh at step 0, or of any other kernel) follows `method` as an exact
step does, `preconditioning.auto_tries_newton_schulz` deciding under "auto". A spread refresh:

- at its refresh step s the kernel W_s is kept as a snapshot, with the iteration's start from
  its Gram matrix (`newton_schulz.start_iteration`);
- each of the next d = `spread_steps(k)` steps advances the iteration by at most
  `newton_schulz_steps_per_step(k)` steps (none once it has converged), d of them being enough
  for the iteration's whole step budget;
- the d-th moves P(W_s) into the kept slots, where that step applies it. Where the iteration has
  not converged (or declined to start), that step takes P(W_s) by the eigh instead, as a one-step
  refresh falls back.

So the steps s + d, ..., s + d + k - 1 apply P(W_s), and no step pays a whole refresh of such a
kernel but step 0. Kernels refreshed by the eigh (and every kernel at other depths, or at k = 1)
refresh in one step. Every branch only selects values and the slots are assigned outside it:
assigning inside would be a cross-replica synchronisation inside control flow, which
tf.distribute refuses. (Under a strategy of several replicas `EndToEnd` runs `refresh` once for
all of them, in cross-replica context, through `backend.once_per_step`: the slots are mirrored,
and an assignment there writes every replica's copy.)
"""

from typing import NamedTuple

import keras
from keras import ops

from tf_overparam.kernel_groups import grouped_preconditioners, oriented_shape, slot_shapes
from tf_overparam.preconditioning import (
    NEWTON_SCHULZ_MAX_STEPS,
    NEWTON_SCHULZ_MIN_COLUMNS,
    NEWTON_SCHULZ_SPARE_STEPS,
    eigh,
    newton_schulz,
)

__all__ = ["KeptPreconditioners", "PendingRefresh", "newton_schulz_steps_per_step", "spread_steps"]

# The iteration's whole step budget, as `newton_schulz.square_roots` allows it.
_BUDGET = NEWTON_SCHULZ_MAX_STEPS + NEWTON_SCHULZ_SPARE_STEPS


def newton_schulz_steps_per_step(refresh_every):
    """The most Newton-Schulz steps a spread refresh takes in one optimizer step at
    `refresh_every` = k >= 2: the fewest that fit the iteration's step budget in k - 1 steps."""
    return -(-_BUDGET // (refresh_every - 1))


def spread_steps(refresh_every):
    """d, the optimizer steps after a spread refresh's snapshot that advance it; the d-th applies
    its result (at most k - 1 for `refresh_every` = k >= 2)."""
    return -(-_BUDGET // newton_schulz_steps_per_step(refresh_every))


class PendingRefresh(NamedTuple):
    """A spread refresh in progress, for one kernel oriented tall: the snapshot `kernel` W_s, and
    the `newton_schulz.Iteration` of its Gram matrix in `root`, `inverse_root`, `scale`,
    `residual` and `steps`."""

    kernel: object
    root: object
    inverse_root: object
    scale: object
    residual: object
    steps: object


def _slot_dtype(variable):
    return "float64" if keras.backend.standardize_dtype(variable.dtype) == "float64" else "float32"


class KeptPreconditioners:
    """The kept preconditioners of an `EndToEnd` optimizer's selected kernels, their slots and
    their refreshes (module docstring); made when the optimizer is built.

    Args:
        optimizer: the optimizer, whose `add_variable` makes the slots (so that they are saved,
            and held by Keras' stateless JAX steps).
        kernels: [(index, variable)], the selected kernels in the order of the variables.
        maps: {index: LinearMap} of the selected kernels.
        depth, method, refresh_every: the optimizer's, validated (depth >= 2).
    """

    def __init__(self, optimizer, kernels, maps, depth, method, refresh_every):
        self._maps, self._depth, self._method, self._every = maps, depth, method, refresh_every
        self.counter = optimizer.add_variable(
            (), dtype="int", initializer="zeros", aggregation="only_first_replica", name="refresh_counter"
        )
        self._phase = {index: rank % refresh_every for rank, (index, _) in enumerate(kernels)}

        def slots(variable, shapes, suffix=""):
            dtypes = {"steps": "int32"}
            return type(shapes)(
                *(
                    optimizer.add_variable(
                        shape,
                        dtype=dtypes.get(field, _slot_dtype(variable)),
                        initializer="zeros",
                        aggregation="only_first_replica",
                        name=f"{variable.path.replace('/', '_')}{suffix}_{field}",
                    )
                    for shape, field in zip(shapes, shapes._fields)
                )
            )

        self._kept = {index: slots(variable, slot_shapes(maps[index], depth)) for index, variable in kernels}
        self._pending = {
            index: slots(variable, self._pending_shapes(maps[index]), "_pending")
            for index, variable in kernels
            if self._spreads(maps[index])
        }

    def _spreads(self, linear_map):
        """Whether the kernel read as `linear_map` takes the spread refresh."""
        cols = oriented_shape(linear_map)[2]
        if self._depth != 2 or self._every < 2 or cols < 2 or self._method == "eigh":
            return False
        # Not `auto_tries_newton_schulz`: spreading pays on any device, where an eigh would spike.
        return self._method == "newton_schulz" or cols >= NEWTON_SCHULZ_MIN_COLUMNS

    @staticmethod
    def _pending_shapes(linear_map):
        batch, rows, cols = oriented_shape(linear_map)
        lead = () if batch == 1 else (batch,)
        return PendingRefresh(lead + (rows, cols), lead + (cols, cols), lead + (cols, cols), lead + (1, 1), (), ())

    def preconditioners(self, indices):
        """The kept preconditioners of the kernels `indices`, as tensors."""
        return [type(slots)(*(ops.convert_to_tensor(s) for s in slots)) for slots in (self._kept[i] for i in indices)]

    def refresh(self, kernels):
        """Refreshes the kernels [(index, current value)] due at this step, advances the spread
        refreshes in progress, and counts the step."""
        step = ops.convert_to_tensor(self.counter)
        phases, spread = {}, []
        for index, kernel in kernels:
            if index in self._pending:
                spread.append((index, kernel))
            else:
                phases.setdefault(self._phase[index], []).append((index, kernel))
        for phase, members in sorted(phases.items()):
            due = ops.logical_or(ops.equal(step, 0), ops.equal(ops.mod(step, self._every), phase))
            self._assign(members, self._computed_when(due, members))
        if spread:
            initial = self._computed_when(ops.equal(step, 0), spread)  # step 0: every kernel in one step
            for position, (index, kernel) in enumerate(spread):
                fields = len(self._kept[index])
                kept = self._advanced(step, index, kernel, initial[position * fields : (position + 1) * fields])
                self._assign([(index, kernel)], kept)
        self.counter.assign_add(1)

    def _assign(self, members, values):
        slots = [slot for index, _ in members for slot in self._kept[index]]
        for slot, value in zip(slots, values, strict=True):
            slot.assign(value)

    def _computed_when(self, due, members):
        """The kept slots' values of `members` [(index, kernel)], flat: P(W) of the current
        kernels where `due`, else as kept."""
        slots = [slot for index, _ in members for slot in self._kept[index]]
        kept = [ops.convert_to_tensor(s) for s in slots]

        def computed():
            kernels, maps = [kernel for _, kernel in members], [self._maps[index] for index, _ in members]
            values = grouped_preconditioners(kernels, maps, self._depth, self._method)
            return [ops.cast(v, slot.dtype) for v, slot in zip([v for value in values for v in value], slots)]

        return ops.cond(due, computed, lambda: kept)

    def _advanced(self, step, index, kernel, kept):
        """One step of `index`'s spread refresh: assigns its pending slots and returns its kept
        slots' values (`kept`, or P(W_s) at the step that applies it first)."""
        offset = ops.mod(step - self._phase[index], self._every)  # steps since its refresh step s
        started = step - offset >= 1  # s >= 1: step 0 refreshed in one step
        slots = self._pending[index]
        pending = [ops.convert_to_tensor(s) for s in slots]
        snapshot = ops.logical_and(started, ops.equal(offset, 0))
        pending = ops.cond(snapshot, lambda: self._snapshot(kernel, index, slots.kernel.dtype), lambda: pending)
        spread = spread_steps(self._every)
        advancing = ops.logical_and(started, ops.logical_and(offset >= 1, offset <= spread))
        limit = ops.cast(ops.where(advancing, newton_schulz_steps_per_step(self._every), 0), "int32")
        iteration = newton_schulz.advance_iteration(newton_schulz.Iteration(*pending[1:]), limit)
        pending = PendingRefresh(pending[0], *iteration)
        for slot, value in zip(slots, pending):
            slot.assign(value)
        applied = ops.logical_and(started, ops.equal(offset, spread))
        return ops.cond(applied, lambda: list(_finished(pending)), lambda: list(kept))

    def _snapshot(self, kernel, index, dtype):
        """A new `PendingRefresh` of the current `kernel`, as a list."""
        linear_map = self._maps[index]
        w = ops.cast(linear_map.to_matrix(kernel), dtype)
        _, rows, cols = linear_map.matrix_shape
        w = ops.swapaxes(w, -1, -2) if rows < cols else w
        w = w[0] if linear_map.matrix_shape[0] == 1 else w
        return [w, *newton_schulz.start_iteration(ops.matmul(ops.swapaxes(w, -1, -2), w))]


def _finished(pending):
    """The `RootPreconditioner` fields of a `PendingRefresh`: its iteration's roots, or the
    eigh's where it has not converged."""
    roots = newton_schulz.finish_iteration(newton_schulz.Iteration(*pending[1:]))
    root, inverse_root = ops.cond(
        roots.converged, lambda: (roots.root, roots.inverse_root), lambda: eigh.square_roots(pending.kernel)
    )
    return pending.kernel, root, inverse_root
