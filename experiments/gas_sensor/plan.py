"""The protocol: what a gas sensor run trains (`Config`, the configurations of each figure), its
stages (`Stage`; which stage comes next is `experiments.gas_sensor.stages.next_stage`), in which
order, and what it costs (the cost model behind the time estimate and the progress bar)."""

import dataclasses
import math

import numpy as np

from experiments.common import rates as rate_rules
from experiments.common.cli import lazy_import, user_errors
from experiments.data import gas_sensor as gas_data
from experiments.stability import LATE_SEEDS, SCREEN_SEEDS

# TensorFlow loads at first use: --help and argument errors return at once.
initializers = lazy_import("tf_overparam.initializers")
fullbatch = lazy_import("experiments.engine.fullbatch")

FIGURES = ("depth", "lr-grid", "optimizers", "init")
EXTRA_FIGURES = ("preprocessing",)  # run only when asked for
HEADLINE = ("l4/gd-d1", "l4/gd-d2-w1", "l4/e2e-d2")  # configurations run with `headline_seeds`
TARGET_FACTORS = (4.0, 2.0, 1.0)  # targets: these multiples of depth-1 GD's best final loss
# The early screen's horizon. Depth-1 GD on the l4 loss blows up within its first 2-10 iterations
# where the initial draw's curvature times the rate exceeds 2, and a deep chain's early blow-ups
# (a draw's first steps overshooting) come as soon; 300 iterations hold them with a margin of 30x
# and cost 200 seeds x 300 = 6 x 10^4 point-steps, under a tenth of a full run of one point.
EARLY_ITERATIONS = 300
# The sensitivity of the headline to depth 1's rate: SENSITIVITY_POINTS log-even rates from
# SENSITIVITY_LOW (on the z-scored data; moved with the grid elsewhere) to depth 1's edge.
SENSITIVITY_LOW = 0.002
SENSITIVITY_POINTS = 6
EDGE_ROUNDS_PLANNED = 3  # the cost model's edge rounds per headline configuration

# Cost model of one engine step in this process, a + b x grid points, plus a setup cost per
# stage (tracing), fitted to the stage wall times of a full default run. It is the unit of the
# progress bar; the bar rescales it by the seconds this session measures.
SECONDS_PER_STEP = 1.2e-4
SECONDS_PER_POINT_STEP = 3.0e-6
SECONDS_PER_CONFIGURATION = 3.0


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run. `iterations` is the horizon of every run (the paper's l4 figure: 10^6)."""

    figures: tuple = FIGURES
    iterations: int = 1_000_000
    grid_points: int = 9
    # log10 range of the learning-rate grid per (optimizer, loss p); the stable GD rates end
    # near 2 / curvature: ~3e-2 for l2 and ~5e-3 for l4 on this data.
    grid_decades: tuple = (
        ("gd", 2, -3.0, -1.0),
        ("gd", 4, -4.0, -2.0),
        ("adagrad", 4, -4.0, 0.0),
        ("adam", 4, -4.0, 0.0),
        ("adadelta", 4, -2.0, 2.0),
    )
    seeds: tuple = (0, 1, 2)
    headline_seeds: tuple = (0, 1, 2, 3, 4)
    screen_fraction: float = 1.0
    refine_points: int = 1
    depths: tuple = (1, 2, 3, 4)
    wide_units: int = 16
    init_stddev: float = 0.01
    log_points: int = 600
    screen_seeds: int = SCREEN_SEEDS  # seeds of each stage's early screen
    early_iterations: int = EARLY_ITERATIONS
    late_seeds: int = LATE_SEEDS  # full-horizon seeds of an edge round
    sensitivity_points: int = SENSITIVITY_POINTS
    edge_configurations: tuple = HEADLINE  # whose stability edge is searched
    edge_points: int = rate_rules.POINTS_PER_ROUND  # rates per round of the edge's bisection
    data_dir: str = None
    out: str = None

    @classmethod
    def quick(cls, **overrides):
        """CI scale: a short horizon and a coarse grid."""
        # An odd number of seeds: a median is then one seed's value (with 2 seeds it is their
        # mean, and the hardest target, the best median final loss, may be reached by neither).
        quick = dict(
            iterations=2000,
            grid_points=4,
            depths=(1, 2),
            wide_units=4,
            log_points=40,
            seeds=(0,),
            headline_seeds=(0, 1, 2),
            screen_seeds=20,
            early_iterations=50,
            late_seeds=3,
            sensitivity_points=3,
            # CI scale: one edge (depth 1's, which the sensitivity stage needs) in two rounds.
            edge_configurations=HEADLINE[:1],
            edge_points=15,
        )
        return cls(**{**quick, **overrides})

    @property
    def is_quick(self):
        """Whether this is a short run (below the paper's horizon): its figures say so."""
        return self.iterations < Config.iterations

    def learning_rates(self, spec, shift=0.0):
        """The log grid of learning rates for a configuration, moved by `shift` decades."""
        for optimizer, p, low, high in self.grid_decades:
            if optimizer == spec.optimizer and p == spec.p:
                return np.logspace(low + shift, high + shift, self.grid_points)
        raise ValueError(f"no learning-rate grid for optimizer {spec.optimizer!r} with l{spec.p:g} loss")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One configuration: a named `ChainSpec` (its loss l_p inside), a label and a line style."""

    name: str
    label: str
    spec: "fullbatch.ChainSpec"
    style: str = "-"
    data_key: str = "default"  # which preprocessing of the data (see `load_variants`)
    rate_shift: float = 0.0  # decades by which its coarse grid is moved


@dataclasses.dataclass(frozen=True)
class Stage:
    """One engine run of a configuration, with its early screen (`learning_rates` x
    `early_seeds` for `early_iterations`): the screen (coarse grid, one seed), the final stage
    (refined rates, every seed), the round `below` a fully flagged final stage, the rounds
    `edge` (numbered by `round`) of the stability edge's bisection, or the `sensitivity` of the
    headline to depth 1's rate; all but the screen over the whole horizon."""

    run: RunConfig
    kind: str
    learning_rates: tuple
    seeds: tuple
    iterations: int
    round: int = 0
    early_seeds: tuple = ()
    early_iterations: int = 0

    @property
    def name(self):
        """Unique within a run and stable across sessions: the files of its grids are named by it."""
        if self.kind == "final":
            return self.run.name
        return f"{self.run.name}.{self.kind}{self.round if self.kind == 'edge' else ''}"

    @property
    def work(self):
        """The stage's cost by the cost model (`stage_cost`), early screen included."""
        return stage_cost(len(self.learning_rates) * len(self.seeds), self.iterations) + self.early_work

    @property
    def early_work(self):
        if not self.early_iterations:
            return 0.0
        return stage_cost(len(self.learning_rates) * len(self.early_seeds), self.early_iterations)


def stage_cost(points, iterations):
    """Modelled in-process seconds of a stage of `points` grid points and `iterations` steps."""
    return SECONDS_PER_CONFIGURATION + iterations * (SECONDS_PER_STEP + SECONDS_PER_POINT_STEP * points)


def seeds_for(config, name):
    """The seeds of a configuration's final stage."""
    return config.headline_seeds if name in HEADLINE else config.seeds


def make_stage(config, run, kind, rates, seeds, iterations=None, round=0):
    """A `Stage` of `run` with the early screen of `config` (seeds 0 .. screen_seeds - 1)."""
    return Stage(
        run,
        kind,
        tuple(float(r) for r in rates),
        tuple(int(s) for s in seeds),
        config.iterations if iterations is None else iterations,
        round=round,
        early_seeds=tuple(range(config.screen_seeds)),
        early_iterations=min(config.early_iterations, config.iterations),
    )


def screen_stage(config, run):
    """The screen of a configuration: the coarse grid, seed 0, `screen_fraction` of the horizon."""
    rates = config.learning_rates(run.spec, run.rate_shift)
    iterations = max(1, round(config.iterations * config.screen_fraction))
    return make_stage(config, run, "screen", rates, (config.seeds[0],), iterations)


def final_rate_count(config):
    """Rates of a final stage: the screen's best and `refine_points` on each side."""
    return 2 * config.refine_points + 1


def planned_work(config, run):
    """The modelled cost of a configuration's stages, before its screen has run: the screen,
    the final stage, EDGE_ROUNDS_PLANNED edge rounds for a headline configuration, and the
    sensitivity stage for `l4/gd-d1` (a round below a flagged final stage is not planned)."""
    seeds = seeds_for(config, run.name)
    work = screen_stage(config, run).work
    work += make_stage(config, run, "final", range(final_rate_count(config)), seeds).work
    if run.name in config.edge_configurations:
        edge = make_stage(config, run, "edge", range(config.edge_points), seeds[: config.late_seeds])
        work += EDGE_ROUNDS_PLANNED * edge.work
    if run.name == HEADLINE[0]:
        work += make_stage(config, run, "sensitivity", range(config.sensitivity_points), seeds).work
    return work


def configurations(config):
    """Every configuration the selected figures need, keyed by figure, in figure order."""
    near_zero = initializers.NearZero(config.init_stddev)
    deep = [d for d in config.depths if d > 1]

    def gd(p, depth, width=1, update="chain", optimizer="gd", init=near_zero, tag=""):
        kind = {"chain": optimizer, "end_to_end": "e2e"}[update]
        width_tag = f"-w{width}" if depth > 1 and update == "chain" else ""
        name = f"l{p:g}/{kind}-d{depth}{width_tag}{tag}"
        label = f"{'eq. 24 ' if update == 'end_to_end' else optimizer.upper() + ' '}depth {depth}"
        label += f", width {width}" if width_tag else ""
        label += tag.replace("-", ", ")
        spec = fullbatch.ChainSpec(
            depth=depth, hidden_units=width, update=update, optimizer=optimizer, initializer=init, p=p
        )
        style = ":" if update == "end_to_end" else "--" if width_tag and width > 1 else "-"
        return RunConfig(name, label, spec, style)

    figures = {}
    if "depth" in config.figures or "lr-grid" in config.figures:
        figures["depth"] = [
            run
            for p in (4, 2)  # the headline (l4) first
            for run in [gd(p, 1)]
            + [gd(p, d, w) for w in (1, config.wide_units) for d in deep]
            + [gd(p, d, update="end_to_end") for d in deep[:2]]
        ]
    if "optimizers" in config.figures:
        figures["optimizers"] = (
            [gd(4, 1)]
            + [gd(4, d) for d in deep[:2]]
            + [
                gd(4, 1, optimizer="adagrad"),
                gd(4, 1, optimizer="adadelta"),
                gd(4, 1, optimizer="adam"),
                gd(4, 2, optimizer="adam"),
            ]
        )
    if "init" in config.figures:
        identity = initializers.Identity()
        figures["init"] = [gd(4, 1)] + [
            run for d in deep for run in (gd(4, d), gd(4, d, init=identity, tag="-identity"))
        ]
    if "preprocessing" in config.figures:
        figures["preprocessing"] = [
            dataclasses.replace(
                run, name=f"pre/{key}/{run.name.split('/')[1]}", label=f"{run.label}, {key}", data_key=key
            )
            for key in variant_keys()
            for run in (gd(4, 1), gd(4, 2))
        ]
    return figures


def run_order(figures):
    """The configurations of `figures`, each once, in the order they run: the headline ones
    first, `l4/gd-d1` first of all (every speedup and target needs a depth-1 baseline, so each
    group's `gd-d1` comes before the rest of its group), then figure by figure."""
    unique = list({run.name: run for runs in figures.values() for run in runs}.values())
    headline = [run for name in HEADLINE for run in unique if run.name == name]
    return headline + [run for run in unique if run.name not in HEADLINE]


def variant_keys():
    """The data variants of the preprocessing figure: scheme, then scheme+bias."""
    return [f"{scheme}{tag}" for scheme in gas_data.PREPROCESSINGS for tag in ("", "+bias")]


def load_variants(config, data, download, runs):
    """The data of every `data_key` the runs use ("default": `data`, as loaded), and each
    run's grid moved by log10(lambda_z / lambda) - (2 - 2/N) log10(|w*| / |w*_z|): lambda is
    the top eigenvalue of the l4 loss's Hessian at w = 0 (3 mean(y_i^2 x_i x_i^T)), which
    bounds depth 1's stable rate, and |w*| the norm of the least-squares solution, whose
    power 2 - 2/N is the factor by which depth N's effective rate grows (eq. 27); _z marks
    the z-scored data the default grids are made for."""
    keys = {run.data_key for run in runs} - {"default"}
    if not keys:
        return {"default": data}, runs
    with user_errors():
        raw = gas_data.load_ethanol(config.data_dir, normalize=False, download=download)
    datas = {"default": data}
    for key in keys:
        scheme, _, bias = key.partition("+")
        datas[key] = gas_data.preprocess(raw, scheme, bias=bool(bias))

    def scales(d):
        x, y = d.x.astype(np.float64), d.y.astype(np.float64)
        curvature = float(np.linalg.eigvalsh(3 * (x * y**2).T @ x / x.shape[0])[-1])
        return curvature, float(np.linalg.norm(np.linalg.lstsq(x, y, rcond=None)[0]))

    reference = scales(gas_data.preprocess(raw, "zscore"))
    ratios = {key: [r / s for r, s in zip(reference, scales(datas[key]))] for key in keys}

    def shift(run):
        if run.data_key == "default":
            return 0.0
        curvature, norm = ratios[run.data_key]
        return math.log10(curvature) + (2 - 2 / run.spec.depth) * math.log10(norm)

    return datas, [dataclasses.replace(r, rate_shift=shift(r)) for r in runs]
