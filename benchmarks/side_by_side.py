"""Optimizers side by side on real models: each step as a ratio to SGD's, next to its floor.

Per model (`config.models`, random inputs and labels at a fixed batch), one `measure` times, in
interleaved rounds, a `train_on_batch` step under SGD, Adam, Keras' `Muon`, `EndToEnd(SGD)`
exact and `EndToEnd(SGD, refresh_every=k)`, and the floor of the end-to-end step for the kernels
`EndToEnd` selects (`benchmarks.floor`: the products alone in one compiled loop, kernels of one
shape batched; exact: a refresh, through the `eigh`, and an apply every step; amortised: the
apply plus 1/k of a refresh). On an accelerator the library's exact step may take
Newton-Schulz instead of the `eigh` on wide kernels, and an amortised step's spread refresh
takes it on any device, so either can come in under this floor. A call of an amortised case
is a whole number of k-step windows, so every call holds its share of refreshes. Reported:

- `vs_sgd`: the median step over SGD's;
- `floor_vs_sgd`: (SGD step + floor) over SGD step, the best the end-to-end step could do;
- `extra_over_floor`: (step - SGD step) / floor, how far the library is from its floor;
- `p95_over_median`, `max_over_median`: of the single steps (a refresh shows as a spike);
- the crossover: batches doubled from the model's until `EndToEnd(SGD, refresh_every=k)` costs at
  most `crossover_ratio` times SGD (the end-to-end work does not grow with the batch);
- the conversion: `overparameterize(model, preserve_function=True)` over
  `keras.models.clone_model(model)`.

Keras' `Muon` hands every non-2-D variable (all convolution kernels) to AdamW: it is a like-for-like
peer only on dense kernels.
"""

import warnings

import keras
import numpy as np

from benchmarks import floor, timing
from benchmarks.models import DEPTH, compiled, side_by_side_model
from benchmarks.timing import StepClock, measure


def end_to_end_api():
    """Every call into `tf_overparam` of this section, in one place so that it follows the API:
    (make(model, inner, refresh_every) -> the depth-2 `EndToEnd` optimizer for `model`;
    kernels(model) -> the kernels it preconditions, as the NumPy matrices it reads them as;
    convert(model) -> the function-preserving depth-2 twin of `model`, every registered layer
    kind converted)."""
    from tf_overparam.layers import registry
    from tf_overparam.linear_maps import linear_maps
    from tf_overparam.models import overparameterize
    from tf_overparam.optimizers import EndToEnd

    def make(model, inner, refresh_every):
        return EndToEnd(inner, depth=DEPTH, refresh_every=refresh_every, model=model)

    def kernels(model):
        maps = linear_maps(model)
        return [
            matrix
            for v in model.trainable_variables
            if v.path in maps
            for matrix in keras.ops.convert_to_numpy(maps[v.path].to_matrix(v))
        ]

    def convert(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return overparameterize(model, depth=DEPTH, preserve_function=True, layers=registry.plain_classes())

    return make, kernels, convert


def optimizers(config, make):
    """name -> (a function making a fresh optimizer for a model, k or None)."""
    rate = config.learning_rate
    made = {
        "SGD": (lambda model: keras.optimizers.SGD(rate), None),
        "Adam": (lambda model: keras.optimizers.Adam(rate / 10), None),
        "Muon": (lambda model: keras.optimizers.Muon(), None),
        "EndToEnd(SGD)": (lambda model: make(model, keras.optimizers.SGD(rate), None), None),
    }
    for k in config.refresh_every:
        made[f"EndToEnd(SGD, refresh_every={k})"] = (lambda model, k=k: make(model, keras.optimizers.SGD(rate), k), k)
    return made


def _batch(rng, input_shape, classes, batch):
    x = rng.uniform(-0.5, 0.5, size=(batch, *input_shape)).astype("float32")
    return x, rng.integers(0, classes, size=batch)


def _clocks(models, refresh_every, data):
    return {
        name: StepClock(lambda model=model: model.train_on_batch(*data), refresh_every[name] or 1)
        for name, model in models.items()
    }


def _finite(model):
    return all(np.all(np.isfinite(keras.ops.convert_to_numpy(w))) for w in model.weights)


def model_result(config, name, batch):
    """One model's row group: timings, ratios, floor, spikes and the crossover search."""
    build, input_shape, classes = side_by_side_model(name, config.image_size, config.classes)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    make, selected, _ = end_to_end_api()
    models, refresh_every = {}, {}
    for optimizer, (new, k) in optimizers(config, make).items():
        keras.utils.set_random_seed(0)
        model = build()
        models[optimizer], refresh_every[optimizer] = compiled(model, new(model)), k
    kernels = selected(models["EndToEnd(SGD)"])
    stacks = floor.stacked_by_shape(kernels)
    clocks = _clocks(models, refresh_every, _batch(rng, input_shape, classes, batch))
    cases = {f"optimizer/{n}": clock.case for n, clock in clocks.items()}
    cases.update({f"floor/{n}": case for n, case in floor.floor_cases(stacks).items()})
    timings = measure(cases, config.target_s, config.repeats)
    floors = {n.split("/", 1)[1]: t for n, t in timings.items() if n.startswith("floor/")}
    result = {
        "model": name,
        "batch": batch,
        "input_shape": list(input_shape),
        "parameters": int(models["SGD"].count_params()),
        "selected_kernels": len(kernels),
        "kernel_groups": [list(s.shape) for s in stacks],
        **floor.floor_products(stacks),
        "floor": floors,
        "optimizers": {},
    }
    sgd = timings["optimizer/SGD"]["seconds_per_step"]
    for optimizer, clock in clocks.items():
        step = timings[f"optimizer/{optimizer}"]["seconds_per_step"]
        row = {
            **timings[f"optimizer/{optimizer}"],
            "refresh_every": refresh_every[optimizer],
            "finite": _finite(models[optimizer]),
            "vs_sgd": step / sgd,
            "median_step_s": clock.percentile(50),
            "p95_step_s": clock.percentile(95),
            "max_step_s": clock.percentile(100),
        }
        row["p95_over_median"] = row["p95_step_s"] / row["median_step_s"]
        row["max_over_median"] = row["max_step_s"] / row["median_step_s"]
        if optimizer.startswith("EndToEnd"):
            k = refresh_every[optimizer]
            seconds = floor_seconds(floors, k)
            row.update(floor_s=seconds, floor_vs_sgd=(sgd + seconds) / sgd, extra_over_floor=(step - sgd) / seconds)
        result["optimizers"][optimizer] = row
    result["crossover"] = crossover(config, models, refresh_every, batch, rng, input_shape, classes, result)
    return result


def floor_seconds(floors, refresh_every):
    """The floor of a step: exact (None), or the apply plus 1/k of a refresh."""
    if refresh_every is None:
        return floors["exact"]["seconds_per_step"]
    return floors["apply"]["seconds_per_step"] + floors["refresh"]["seconds_per_step"] / refresh_every


def crossover(config, models, refresh_every, batch, rng, input_shape, classes, result):
    """The smallest batch, doubling from `batch`, at which the amortised step costs at most
    `config.crossover_ratio` times SGD's (None if not by `config.crossover_max_batch`)."""
    name = f"EndToEnd(SGD, refresh_every={config.crossover_refresh_every})"
    search = {
        "optimizer": name,
        "target_ratio": config.crossover_ratio,
        "tried": [{"batch": batch, "vs_sgd": result["optimizers"][name]["vs_sgd"]}],
    }
    while search["tried"][-1]["vs_sgd"] > config.crossover_ratio and 2 * search["tried"][-1]["batch"] <= (
        config.crossover_max_batch
    ):
        size = 2 * search["tried"][-1]["batch"]
        pair = {n: models[n] for n in ("SGD", name)}
        clocks = _clocks(pair, refresh_every, _batch(rng, input_shape, classes, size))
        timings = measure({n: c.case for n, c in clocks.items()}, config.target_s, config.crossover_repeats)
        ratio = timings[name]["seconds_per_step"] / timings["SGD"]["seconds_per_step"]
        search["tried"].append({"batch": size, "vs_sgd": ratio})
    last = search["tried"][-1]
    search["batch"] = last["batch"] if last["vs_sgd"] <= config.crossover_ratio else None
    return search


def conversion_result(config):
    """`overparameterize(preserve_function=True)` against `clone_model` of the same model: a first
    call of each (which builds caches), then `conversion_repeats` rounds of one call each,
    interleaved as `measure` does; each the median over the rounds."""
    build, _, _ = side_by_side_model(config.conversion_model, config.image_size, config.classes)
    keras.utils.set_random_seed(0)
    model = build()
    _, _, convert = end_to_end_api()
    calls = {"clone_model": lambda: keras.models.clone_model(model), "overparameterize": lambda: convert(model)}
    first = {name: timing.clock(call) for name, call in calls.items()}
    times = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(config.conversion_repeats):
        for name in names[round_ % 2 :] + names[: round_ % 2]:
            times[name].append(timing.clock(calls[name]))
    seconds = {
        name: {"first_call_s": first[name], "seconds": times[name], "median_s": float(np.median(times[name]))}
        for name in calls
    }
    return {
        "model": config.conversion_model,
        **seconds,
        "overparameterize_vs_clone_model": seconds["overparameterize"]["median_s"] / seconds["clone_model"]["median_s"],
    }


def side_by_side_section(config, write=None):
    """Every model of `config.models`, then the conversion; `write(section)` after each, so that
    a long run leaves its finished rows on disk."""
    section = {"depth": DEPTH, "models": {}}
    for name, batch in config.models:
        section["models"][name] = model_result(config, name, batch)
        if write is not None:
            write(section)
    section["conversion"] = conversion_result(config)
    return section
