"""The one timing helper of the benchmarks: warm-up apart, calibrated calls, interleaved repeats.

A case is a callable `run(units)` doing `units` units of work (epochs, executions, loop
iterations, batches), each worth `steps_per_unit` steps. `measure` times the first call (one
unit, tracing included) on its own, sizes every case so that one call lasts about `target_s`,
then times `repeats` rounds in which every case runs once (each round starting one case
later), so that a change of the machine's load hits all cases alike; a case's time is the
median over the rounds.
"""

import dataclasses
import math
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


def model_cases(models, x, y):
    """Per model, "<name>/train" (`train_on_batch`) and "<name>/predict" (`predict_on_batch`)."""
    cases = {}
    for name, model in models.items():
        cases[f"{name}/train"] = repeated(lambda model=model: model.train_on_batch(x, y))
        cases[f"{name}/predict"] = repeated(lambda model=model: model.predict_on_batch(x))
    return cases


def load_sentence(results, cpus):
    """The machine's load during a run (`loadavg_start`, `loadavg_end` of `results`), for the tables."""
    start, end = results["loadavg_start"][0], results["loadavg_end"][0]
    return (
        f"load average {start:.2f} at the start, {end:.2f} at the end"
        f"{' (--quick)' if results['config']['scale'] == 'quick' else ''}."
        + (" The load is above the CPU count: absolute numbers are noisy, compare ratios." if start > cpus else "")
    )


def _clock(run, units):
    started = time.perf_counter()
    run(units)
    return time.perf_counter() - started


def _units_for(run, target_s):
    """Units that make one (warm) call of `run` last about `target_s` on a quiet machine.

    Sized on the fastest time per unit seen, since a preempted call is only slower, and grown
    (at most tenfold a call) until a call of the size found confirms it. Every case so gets
    calls of about the same length, which share the machine's load alike.
    """
    units, per_unit = 1, math.inf
    while True:
        per_unit = min(per_unit, _clock(run, units) / units)
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
    first = {name: _clock(case.run, 1) for name, case in cases.items()}
    units = {name: _units_for(case.run, target_s) for name, case in cases.items()}
    seconds = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds[name].append(_clock(cases[name].run, units[name]))
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
    """A case running `state = step(state)` `unroll` times per unit, all units in one
    `tf.function` call (a `tf.range` loop); a call returns once the result is computed.
    TensorFlow only; `benchmarks.backend_bench.compiled_loop` is the same on any backend."""
    import tensorflow as tf  # here, so that the timing helper above needs no TensorFlow

    @tf.function
    def loop(units):
        state = initial
        for _ in tf.range(units):
            for _ in range(unroll):
                state = step(state)
        return tf.reduce_sum(state)

    return Case(lambda units: loop(tf.constant(units, tf.int64)).numpy(), steps_per_unit=unroll)
