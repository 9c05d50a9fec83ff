"""What the benchmarks time, at full and at quick (CI) scale. No TensorFlow or Keras here, so
that `python -m benchmarks.run --help` and argument errors answer at once."""

import dataclasses

SECTIONS = ("fullbatch", "layer", "update_rule")
DATA_SECTIONS = ("fullbatch",)  # the sections that need the gas sensor data


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
    sections: tuple = SECTIONS
    data_dir: str = None
    out: str = None
    scale: str = "full"

    @classmethod
    def quick(cls, **overrides):
        """CI scale: short calls, 3 rounds, a 3-point grid, the small kernels only."""
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
        )
        return cls(**{**quick, **overrides})
