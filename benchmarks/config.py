"""What the benchmarks time, at full and at quick (CI) scale. No TensorFlow or Keras here, so
that `python -m benchmarks.run --help` and argument errors answer at once."""

import dataclasses

SECTIONS = ("fullbatch", "layer", "update_rule", "side_by_side", "ns_threshold", "distributed")
DATA_SECTIONS = ("fullbatch",)  # the sections that need the gas sensor data


@dataclasses.dataclass(frozen=True)
class SideBySide:
    """The side-by-side comparison of optimizers on real models (`benchmarks.side_by_side`).

    `models`: (name, batch) pairs, a name of `benchmarks.models.side_by_side_model`;
    `image_size`, `classes`: the `keras.applications` models' inputs and logits;
    `refresh_every`: the amortised `EndToEnd` variants; `target_s`, `repeats`: as for `measure`;
    `crossover_*`: the batch search (doubling from the model's batch up to `crossover_max_batch`)
    for the smallest batch at which `EndToEnd(SGD, refresh_every=crossover_refresh_every)` costs
    at most `crossover_ratio` times SGD; `conversion_model`: the model whose
    `overparameterize(preserve_function=True)` is timed against `keras.models.clone_model`.
    """

    models: tuple = (("tutorial CNN", 64), ("ResNet50", 8), ("MobileNetV2", 8))
    image_size: int = 32
    classes: int = 10
    refresh_every: tuple = (10, 100)
    learning_rate: float = 1e-3
    target_s: float = 1.0
    repeats: int = 5
    crossover_refresh_every: int = 10
    crossover_ratio: float = 1.2
    crossover_max_batch: int = 512
    crossover_repeats: int = 3
    conversion_model: str = "ResNet50"
    conversion_repeats: int = 3

    @classmethod
    def quick(cls):
        """A tiny CNN, k = 2 and 3, two batches: seconds."""
        return cls(
            models=(("tiny CNN", 4),),
            refresh_every=(2, 3),
            target_s=0.01,
            repeats=2,
            crossover_refresh_every=2,
            crossover_ratio=0.0,  # never met: the search runs to the largest batch
            crossover_max_batch=8,
            crossover_repeats=1,
            conversion_model="tiny CNN",
            conversion_repeats=1,
        )


@dataclasses.dataclass(frozen=True)
class NsThreshold:
    """Where Newton-Schulz pays at depth 2 (`benchmarks.ns_threshold`): per model of `models`
    (names of `benchmarks.models.side_by_side_model`), each group of its selected kernels of one
    matrix shape, its preconditioner by the eigh and by Newton-Schulz; `target_s`, `repeats`: as
    for `measure`."""

    models: tuple = ("tutorial CNN", "ResNet50", "MobileNetV2")
    image_size: int = 32
    classes: int = 10
    target_s: float = 0.2
    repeats: int = 9

    @classmethod
    def quick(cls):
        """The tiny CNN's three kernels: seconds."""
        return cls(models=("tiny CNN",), target_s=0.005, repeats=3)


@dataclasses.dataclass(frozen=True)
class Distributed:
    """`tf.distribute.MirroredStrategy` on `replicas` logical CPU devices against one device, at the
    same global `batch` (`benchmarks.distributed`): SGD and `EndToEnd(SGD)` exact and with
    `refresh_every`, on `model` (a name of `benchmarks.models.side_by_side_model`); `target_s`,
    `repeats`: as for `measure`; `timeout_s`: the subprocess' limit."""

    model: str = "tutorial CNN"
    batch: int = 64
    replicas: int = 2
    refresh_every: int = 10
    learning_rate: float = 1e-3
    target_s: float = 1.0
    repeats: int = 9
    timeout_s: float = 3600.0

    @classmethod
    def quick(cls):
        """The tiny CNN at batch 8, k = 2: seconds (most of them the subprocess' TensorFlow import)."""
        return cls(model="tiny CNN", batch=8, refresh_every=2, target_s=0.01, repeats=2, timeout_s=600.0)


@dataclasses.dataclass(frozen=True)
class Config:
    """What to time. `target_s`: seconds per timed call; `repeats`: interleaved rounds;
    `fit_epochs`: epochs per naive `fit` call, which amortise its per-call set-up; `sections`:
    which of `SECTIONS` run."""

    target_s: float = 0.2
    repeats: int = 15
    fit_epochs: int = 5
    steps_per_execution: int = 1000
    single_learning_rate: float = 1e-3
    grid_points: int = 9
    peak_size: int = 1024
    cnn_batch: int = 64
    kernels: tuple = ((1, 128), (128, 1), (128, 128), (512, 512), (3136, 512))
    # (rows, cols, cond(W)): log-spaced singular values, where depth 2 declines Newton-Schulz
    conditioned_kernels: tuple = ((3136, 512, 1e3),)
    side_by_side: SideBySide = SideBySide()
    ns_threshold: NsThreshold = NsThreshold()
    distributed: Distributed = Distributed()
    sections: tuple = SECTIONS
    data_dir: str = None
    out: str = None
    scale: str = "full"

    @classmethod
    def quick(cls, **overrides):
        """CI scale: short calls, 3 rounds, a 3-point grid, the small kernels only, a tiny
        side-by-side, the tiny CNN's Newton-Schulz threshold and distributed steps."""
        quick = dict(
            scale="quick",
            target_s=0.02,
            repeats=3,
            fit_epochs=1,
            steps_per_execution=100,
            grid_points=3,
            peak_size=512,
            kernels=((1, 128), (128, 1), (128, 128)),
            conditioned_kernels=((300, 128, 1e3),),
            side_by_side=SideBySide.quick(),
            ns_threshold=NsThreshold.quick(),
            distributed=Distributed.quick(),
        )
        return cls(**{**quick, **overrides})
