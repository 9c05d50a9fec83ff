"""What the MNIST experiment runs: the arms, the recipe (`Config`), the seeds and their
streams, the order of the (arm, seed) models and the cost model of the start-up estimate.
NumPy only: the command line reads it before TensorFlow is imported."""

import dataclasses

import numpy as np

from experiments.data.mnist_files import NUM_TRAIN

OPTIMIZERS = ("momentum", "sgd", "adam")
DEFAULT_LEARNING_RATES = {"momentum": 0.01, "sgd": 0.01, "adam": 0.001}
# Arm -> how it is built: None (the plain CNN), ("twin", factor init, where the L2 acts), or
# "end_to_end" (the plain CNN, the EndToEnd optimizer on its dense kernels).
ARMS = {
    "plain": None,
    "twin": ("twin", "tutorial", "end_to_end"),
    "balanced": ("twin", "balanced", "end_to_end"),
    "factors": ("twin", "tutorial", "factors"),
    "end_to_end": "end_to_end",
}
SEEDED_ARMS = ("plain", "twin")  # run every seed of --seeds; the others those of --other-seeds
BASELINE = "plain"  # speedups are against it
END_TO_END_DEPTH = 2
END_TO_END_VARIABLES = ("*fc*/kernel",)  # the dense kernels, as the dense twin expands them
EXPANDABLE = {"dense": "Dense", "conv": "Conv2D"}  # --overparameterize kind -> keras.layers class name
# Collapse check: max |logit difference| <= COLLAPSE_RTOL * max(1, max |logit|).
COLLAPSE_RTOL = 1e-4
# The independent streams of one seed (`stream_seed`).
STREAMS = ("conv1", "conv2", "fc1", "fc2", "factors", "balanced", "dropout", "shuffle", "fit")
# The cost model of the start-up estimate, on an idle 2-core CPU machine: seconds per training
# step of each arm (the twins' end-to-end penalty needs F1 F2 every step; end_to_end the eq. 24
# direction of fc1), and per model (building and tracing; evaluation and collapse, which scale
# with the run's length up to the full 8590 steps).
SECONDS_PER_STEP = {"plain": 0.042, "twin": 0.063, "balanced": 0.063, "factors": 0.042, "end_to_end": 0.088}
SECONDS_PER_MODEL = (5.0, 25.0)
FULL_RUN_STEPS = 8590


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run; defaults are the tutorial's recipe (its seed, 66478, first)."""

    epochs: int = 10
    steps: int = None  # cap on steps per epoch
    batch_size: int = 64
    eval_batch_size: int = 500  # validation and test; every replica must get examples
    optimizer: str = "momentum"
    learning_rate: float = None  # None: DEFAULT_LEARNING_RATES[optimizer]
    decay_rate: float = 0.95  # per epoch, staircase
    momentum: float = 0.9
    l2: float = 5e-4  # the tutorial's coefficient of sum(tf.nn.l2_loss) = 0.5 * ||w||^2
    overparameterize: tuple = ("dense",)  # keys of EXPANDABLE
    init_stddev: float = 0.1
    dropout: float = 0.5
    arms: tuple = tuple(ARMS)
    seeds: tuple = (66478, 66479, 66480)  # of SEEDED_ARMS
    other_seeds: tuple = (66478,)  # of the other arms
    seed: int = 66478  # the seed of the model being built (`for_seed`)
    validation_size: int = 5000
    train_examples: int = None  # None: all 55000; else the first n (CI scale)
    validation_examples: int = None
    test_examples: int = None
    window: int = 50  # batches in the running mean of the thresholds
    thresholds: tuple = (1.0, 0.3, 0.1, 0.05, 0.03)  # on the batch cross-entropy, fixed before the runs
    diagnostics_every: int = 100  # steps between OverparamTensorBoard values
    histograms: bool = False  # OverparamTensorBoard's histograms of the factors (large files)
    strategy: str = "none"
    manual_dir: str = None
    tfds_data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: 640 training examples (10 steps per epoch), 2 epochs, 2 seeds, seconds a model."""
        quick = dict(
            epochs=2,
            train_examples=640,
            validation_examples=128,
            test_examples=256,
            eval_batch_size=64,
            window=5,
            thresholds=(2.0, 1.5, 1.0),
            diagnostics_every=10,
            seeds=(66478, 66479),
        )
        return cls(**{**quick, **overrides})

    @property
    def resolved_learning_rate(self):
        return DEFAULT_LEARNING_RATES[self.optimizer] if self.learning_rate is None else self.learning_rate

    @property
    def scale_note(self):
        """'' for a run on the whole training set; else what the quick (partial) run trained on,
        for the figures' titles."""
        parts = []
        if self.train_examples is not None:
            parts.append(f"{self.train_examples} training examples")
        if self.steps is not None:
            parts.append(f"at most {self.steps} steps per epoch")
        if not parts:
            return ""
        return f"quick run: {', '.join(parts)}, {self.epochs} epoch{'s' if self.epochs != 1 else ''}"

    def seeds_of(self, arm):
        return self.seeds if arm in SEEDED_ARMS else self.other_seeds

    def plan(self):
        """The (arm, seed) pairs to train: the arms of `seeds` (plain, twin) seed by seed first,
        so that a run stopped early already holds the headline comparison, then the others."""
        seeds = dict.fromkeys([*self.seeds, *self.other_seeds])
        pairs = [(arm, seed) for seed in seeds for arm in self.arms if seed in self.seeds_of(arm)]
        return [pair for pair in pairs if pair[0] in SEEDED_ARMS] + [
            pair for pair in pairs if pair[0] not in SEEDED_ARMS
        ]

    def for_seed(self, seed):
        return dataclasses.replace(self, seed=seed)

    def train_steps_per_epoch(self):
        """Full batches per epoch of the training split (capped by `steps`)."""
        examples = self.train_examples or (NUM_TRAIN - self.validation_size)
        steps = examples // self.batch_size
        return min(steps, self.steps) if self.steps else steps


def stream_seed(seed, stream):
    """An independent 30-bit seed for one use (`STREAMS`) of `seed`. Keras and TensorFlow
    stateless draws of different shapes from one integer seed share their first values, so
    `seed + offset` would make seed s's conv1 weights the start of seed s-1's conv2 weights."""
    return int(np.random.SeedSequence([seed, STREAMS.index(stream)]).generate_state(1)[0] >> 2)  # room for + offsets


def estimate_seconds(plan, steps):
    """The cost model's seconds for training every (arm, seed) of `plan` for `steps` steps."""
    fixed, scaled = SECONDS_PER_MODEL
    return sum(SECONDS_PER_STEP[arm] * steps + fixed + scaled * min(1.0, steps / FULL_RUN_STEPS) for arm, _ in plan)
