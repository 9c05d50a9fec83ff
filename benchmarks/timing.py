"""The one timing module of the benchmarks: cases, calibrated calls, interleaved repeats, compiled
loops on any Keras backend, and what the numbers were measured on.

A case is a callable `run(units)` doing `units` units of work (epochs, executions, loop
iterations, batches), each worth `steps_per_unit` steps. `measure` times the first call (one
unit, tracing included) on its own, sizes every case so that one call lasts about `target_s`,
then times `repeats` rounds in which every case runs once (each round starting one case
later), so that a change of the machine's load hits all cases alike; a case's time is the
median over the rounds. Python's cyclic garbage collector runs between timed calls, not
inside them (as `timeit` does).

Nothing here imports TensorFlow or Keras at module level: `benchmarks.run --help` stays fast.
"""

import contextlib
import dataclasses
import gc
import math
import os
import platform
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Case:
    """`run(units)` does `units` units of work of `steps_per_unit` steps each."""

    run: object
    steps_per_unit: int = 1


def repeated(call):
    """A case calling `call()` once per unit."""

    def run(units):
        for _ in range(units):
            call()

    return Case(run)


class StepClock:
    """A case calling `step()` `steps_per_unit` times per unit that keeps every step's wall
    time after its first call (the first call traces). `percentile(q)` of those times shows the
    steps that cost more than the rest (an amortised refresh)."""

    def __init__(self, step, steps_per_unit=1):
        self.step, self.seconds, self._calls = step, [], 0
        self.case = Case(self._run, steps_per_unit)

    def _run(self, units):
        times = []
        for _ in range(units * self.case.steps_per_unit):
            started = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - started)
        if self._calls:
            self.seconds.extend(times)
        self._calls += 1

    def percentile(self, q):
        """The q-th percentile (0..100, linear interpolation) of the kept step times."""
        ordered = sorted(self.seconds)
        position = (len(ordered) - 1) * q / 100
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def model_cases(models, x, y):
    """Per model, "<name>/train" (`train_on_batch`) and "<name>/predict" (`predict_on_batch`)."""
    cases = {}
    for name, model in models.items():
        cases[f"{name}/train"] = repeated(lambda model=model: model.train_on_batch(x, y))
        cases[f"{name}/predict"] = repeated(lambda model=model: model.predict_on_batch(x))
    return cases


@contextlib.contextmanager
def collector_paused():
    """Collects garbage, then keeps Python's cyclic collector off inside the block: a collection
    lands on whichever call crosses its allocation threshold, a spike that belongs to no case."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def clock(call, *args):
    """Seconds of one `call(*args)`, the collector paused."""
    with collector_paused():
        started = time.perf_counter()
        call(*args)
        return time.perf_counter() - started


def _units_for(run, target_s):
    """Units that make one (warm) call of `run` last about `target_s` on a quiet machine.

    Sized on the fastest time per unit seen, since a preempted call is only slower, and grown
    (at most tenfold a call) until a call of the size found confirms it. Every case so gets
    calls of about the same length, which share the machine's load alike.
    """
    units, per_unit = 1, math.inf
    while True:
        per_unit = min(per_unit, clock(run, units) / units)
        sized = max(1, round(target_s / per_unit))
        if sized <= 1.25 * units:
            return sized
        units = min(sized, 10 * units)


def measure(cases, target_s, repeats):
    """Times `cases` (name -> `Case`); returns name -> timing dict.

    A timing dict holds `first_call_s` (the cold call of one unit: tracing and set-up, plus
    that unit), `steps` per timed call, `seconds` (every timed call) and `seconds_per_step`
    (the median call over `steps`).
    """
    first = {name: clock(case.run, 1) for name, case in cases.items()}
    units = {name: _units_for(case.run, target_s) for name, case in cases.items()}
    seconds = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds[name].append(clock(cases[name].run, units[name]))
    timings = {}
    for name, case in cases.items():
        steps = units[name] * case.steps_per_unit
        timings[name] = {
            "first_call_s": first[name],
            "steps": steps,
            "seconds": seconds[name],
            "seconds_per_step": statistics.median(seconds[name]) / steps,
        }
    return timings


def compiled_loop(step, initial, unroll):
    """A case running `state = step(state)` `unroll` times per unit, all units in one compiled
    call of the current Keras backend (a `tf.range` loop in a `tf.function`, a
    `jax.lax.fori_loop` under `jax.jit`; eager steps on torch); a call returns once the result
    is computed. `initial` may be a nested structure of tensors (`keras.tree`)."""
    import keras

    backend = keras.backend.backend()

    def total(state):
        return sum(keras.ops.sum(leaf) for leaf in keras.tree.flatten(state))

    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def loop(units):
            state = initial
            for _ in tf.range(units):
                for _ in range(unroll):
                    state = step(state)
            return total(state)

        return Case(lambda units: loop(tf.constant(units, tf.int64)).numpy(), steps_per_unit=unroll)
    if backend == "jax":
        import jax

        def body(_, state):
            for _ in range(unroll):
                state = step(state)
            return state

        jitted = jax.jit(lambda units: total(jax.lax.fori_loop(0, units, body, initial)))
        return Case(lambda units: float(jitted(units)), steps_per_unit=unroll)

    def eager(units):  # torch: no graph compiler in the loop
        state = initial
        for _ in range(units * unroll):
            state = step(state)
        return float(total(state))

    return Case(eager, steps_per_unit=unroll)


def machine_info():
    """What the numbers were measured on: the Keras backend, its version and devices, the CPUs,
    the load average, and the package and git commit that produced them (provenance)."""
    import keras

    from experiments.common.run_folder import provenance

    backend = keras.backend.backend()
    info = {
        "backend": backend,
        "keras": keras.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        **provenance(),
    }
    if backend == "jax":
        import jax

        info.update(
            version=jax.__version__,
            device_count=jax.device_count(),
            devices=[str(d.device_kind) for d in jax.devices()],
        )
    elif backend == "tensorflow":
        import tensorflow as tf

        info.update(version=tf.__version__, tensorflow=tf.__version__)
        info["devices"] = [d.name for d in tf.config.list_logical_devices()]
        info["device_count"] = len(info["devices"])
    elif backend == "torch":
        import torch

        info.update(
            version=torch.__version__, devices=[torch.cuda.get_device_name(0)] if torch.cuda.is_available() else ["cpu"]
        )
        info["device_count"] = max(1, torch.cuda.device_count())
    return info


def load_sentence(results, cpus):
    """The machine's load during a run (`loadavg_start`, `loadavg_end` of `results`), for the tables."""
    start, end = results["loadavg_start"][0], results["loadavg_end"][0]
    return (
        f"load average {start:.2f} at the start, {end:.2f} at the end"
        f"{' (--quick)' if results['config']['scale'] == 'quick' else ''}."
        + (" The load is above the CPU count: absolute numbers are noisy, compare ratios." if start > cpus else "")
    )
