"""Section 2 of `benchmarks.run`: the MNIST tutorial CNN (`experiments.mnist_cnn.build_cnn`) with
plain `Dense`, with `OverparamDense` (`overparameterize(depth=2)`), after `collapse`, and trained
by `EndToEnd`; train step (`train_on_batch`) and inference (`predict_on_batch`) on a random batch."""

import numpy as np

from benchmarks.models import CNN_BASELINES, CNN_VARIANTS, cnn_models
from benchmarks.timing import measure, model_cases


def layer_section(config, models=None):
    """Train step and inference time of the CNN variants, as ratios to the plain CNN with the
    same objective (and the `EndToEnd` optimizer's step also to the twin's, when both ran).
    `models`: name -> compiled model, default every variant of the tutorial CNN."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(config.cnn_batch, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=config.cnn_batch)
    models = cnn_models(CNN_VARIANTS) if models is None else models
    timings = measure(model_cases(models, x, y), config.target_s, config.repeats)
    section = {"batch": config.cnn_batch, "jit_compile": models["plain"].jit_compile, "models": {}, "ratios": {}}
    for name, model in models.items():
        section["models"][name] = {
            "parameters": int(model.count_params()),
            "baseline": CNN_BASELINES.get(name, "plain"),
            **{kind: timings[f"{name}/{kind}"] for kind in ("train", "predict")},
        }

    def ratio(name, baseline, kind):
        return section["models"][name][kind]["seconds_per_step"] / section["models"][baseline][kind]["seconds_per_step"]

    for name, model in section["models"].items():
        section["ratios"][name] = {
            f"{kind}_time_vs_plain": ratio(name, model["baseline"], kind) for kind in ("train", "predict")
        }
    if {"plain, EndToEnd optimizer", "overparameterized"} <= set(models):
        section["ratios"]["plain, EndToEnd optimizer"]["train_time_vs_overparameterized"] = ratio(
            "plain, EndToEnd optimizer", "overparameterized", "train"
        )
    return section
