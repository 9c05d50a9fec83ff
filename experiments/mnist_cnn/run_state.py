"""A run folder of the MNIST experiment, new or resumed: what it holds, which (arm, seed)
models it has finished, and its results and figure, rewritten after every model.

A run folder holds config.json (the options, the machine, the provenance and every sitting:
a resume is one), per arm and seed `arms/<arm>/seed_<s>.json` (the record: per-batch curves and
results) and `seed_<s>.weights.h5` (the trained weights, no optimizer state), `results.json`
(the tables over the finished models), `batch_loss.png` and `tensorboard/<arm>/seed_<s>/`."""

import dataclasses
import json
import pathlib
import time

from experiments.common import runstate
from experiments.common.run_folder import holds_run, make_run_dir, write_json_atomic
from experiments.mnist_cnn import plots
from experiments.mnist_cnn.protocol import ARMS
from experiments.mnist_cnn.report import summarize

# Keys of Config that a resumed run may change (the set grows, or they change no result).
RESUME_MAY_CHANGE = ("out", "manual_dir", "tfds_data_dir", "arms", "seeds", "other_seeds", "seed", "histograms")
FIGURE = "batch_loss.png"


def model_files(run_dir, arm, seed):
    """(record .json, weights .weights.h5) of one arm and seed."""
    folder = pathlib.Path(run_dir) / "arms" / arm
    return folder / f"seed_{seed}.json", folder / f"seed_{seed}.weights.h5"


def tensorboard_dir(run_dir, arm, seed):
    return pathlib.Path(run_dir) / "tensorboard" / arm / f"seed_{seed}"


def config_record(config):
    """config.json's options: the Config without the per-model `seed`."""
    record = dataclasses.asdict(config)
    record.pop("seed")
    return record


def load_finished(run_dir):
    """{(arm, seed): record} of every arm and seed finished in `run_dir` (record and weights saved)."""
    finished = {}
    for record_path in sorted(pathlib.Path(run_dir).glob("arms/*/seed_*.json")):
        record = json.loads(record_path.read_text())
        if model_files(run_dir, record["arm"], record["seed"])[1].exists():
            finished[(record["arm"], record["seed"])] = record
    return finished


class RunState:
    """One sitting's view of a run folder.

    Attributes:
        run_dir: the folder.
        config: the options of this sitting.
        recorded: the options config.json records (on a resume, the arms and seeds of every sitting).
        finished: {(arm, seed): record} of the finished models, in the order they finished.
    """

    def __init__(self, run_dir, config, recorded, finished, earlier_seconds=()):
        self.run_dir = pathlib.Path(run_dir)
        self.config = config
        self.recorded = recorded
        self.finished = finished
        self.earlier_seconds = list(earlier_seconds)
        self.started = time.time()
        self.machine = None
        self.steps_per_epoch = None

    @staticmethod
    def check(config, resume):
        """Raises the `UserError` that `open` would, creating nothing: a new run's `--out` holds
        a run already, or the resumed run is not one with these options."""
        if resume:
            runstate.check_same_config(config.out, config_record(config), ignore=RESUME_MAY_CHANGE)
        elif config.out is not None and holds_run(config.out):
            make_run_dir(config.out, "mnist_cnn")  # raises, naming the files found there

    @classmethod
    def open(cls, config, resume):
        """A new folder (`config.out`, or runs/mnist_cnn/<UTC time>), or with `resume` the folder
        `config.out` of a run with the same options, whose finished models are kept."""
        if not resume:
            return cls(make_run_dir(config.out, "mnist_cnn"), config, config, {})
        run_dir = pathlib.Path(config.out)
        saved = runstate.check_same_config(run_dir, config_record(config), ignore=RESUME_MAY_CHANGE)
        union = {
            key: tuple(dict.fromkeys([*saved.get(key, ()), *getattr(config, key)]))
            for key in ("arms", "seeds", "other_seeds")
        }
        union["arms"] = tuple(arm for arm in ARMS if arm in union["arms"])
        previous = run_dir / "results.json"
        earlier = []
        if previous.is_file():
            results = json.loads(previous.read_text())
            earlier = results.get("sittings_seconds", [results["seconds"]] if "seconds" in results else [])
        return cls(run_dir, config, dataclasses.replace(config, **union), load_finished(run_dir), earlier)

    @property
    def plan(self):
        return self.config.plan()

    @property
    def todo(self):
        return [key for key in self.plan if key not in self.finished]

    def kept(self):
        """'arm/seed' of the finished models of this sitting's plan."""
        return [f"{arm}/{seed}" for arm, seed in self.plan if (arm, seed) in self.finished]

    def record_start(self, machine, provenance, steps_per_epoch):
        """Writes config.json: the recorded options, the first sitting's machine and provenance,
        and every sitting with what it set out to train."""
        self.machine, self.steps_per_epoch = machine, steps_per_epoch
        sitting = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "machine": machine,
            "provenance": provenance,
            "plan": [f"{arm}/{seed}" for arm, seed in self.todo],
        }
        path = self.run_dir / "config.json"
        sittings = json.loads(path.read_text()).get("sittings", []) if path.is_file() else []
        first = (sittings or [sitting])[0]
        record = config_record(self.recorded)
        write_json_atomic(
            path,
            {
                **record,
                "machine": first["machine"],
                "provenance": first["provenance"],
                "sittings": [*sittings, sitting],
            },
        )

    def add(self, arm, seed, record):
        """Keeps a finished model and rewrites results.json and the figure."""
        self.finished[(arm, seed)] = record
        return self.write()

    def results(self):
        sittings_seconds = [*self.earlier_seconds, time.time() - self.started]
        return {
            "config": config_record(self.recorded),
            "machine": self.machine,
            "steps_per_epoch": self.steps_per_epoch,
            "finished": [f"{arm}/{seed}" for arm, seed in self.finished],
            "sittings_seconds": sittings_seconds,
            "seconds": sum(sittings_seconds),
            **summarize(self.finished, self.config),
        }

    def write(self):
        """Writes results.json and batch_loss.png of the finished models; returns the results."""
        results = self.results()
        write_json_atomic(self.run_dir / "results.json", results)
        if self.finished:
            plots.save_batch_loss_figure(self.run_dir / FIGURE, self.finished, self.config)
        return results
