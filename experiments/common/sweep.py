"""A sweep of full-batch configurations that scales out: each configuration is a task, run
in-process (the default, no Ray needed) or as a Ray task (`--workers N` starts a local Ray
with N CPUs, `--address` joins a running cluster; `pip install -e ".[ray]"`).

A task (`GridTask`) trains one configuration over its grid of learning rates and seeds with
`experiments.engine.fullbatch.FullBatchTrainer` and RETURNS everything the run folder needs: the
`GridResult` and the diagnostics at the logged iterations. The driver alone writes the run
folder (results, figures, TensorBoard through `write_tensorboard`), so they are the same
whichever way the tasks ran. Results come back as tasks finish (`Executor.map`), so the
driver can write each one as it comes.
"""

import dataclasses
import math
import os
import socket
import time

import numpy as np


@dataclasses.dataclass
class GridTask:
    """One configuration to train: `spec` on (x, y) for `learning_rates` x `seeds`, logged at
    `schedule`, with the chain's factors kept at every `diagnostics_every`-th log."""

    name: str
    x: np.ndarray
    y: np.ndarray
    spec: object
    learning_rates: tuple
    seeds: tuple
    schedule: np.ndarray
    diagnostics_every: int = 1
    early_seeds: tuple = ()  # the early screen (`early_screen`), before the run; none if empty
    early_iterations: int = 0
    sharpness_every: int = None  # the sharpness at every n-th log (engines that compute it)


@dataclasses.dataclass
class GridOutcome:
    """What a task returns: its `experiments.engine.fullbatch.GridResult`, the chain at the
    diagnostic logs (iteration -> `chain_state`), its wall time and its early screen's grid."""

    name: str
    result: object
    diagnostics: dict
    seconds: float
    depth: int = 1
    early: object = None


def early_screen(x, y, spec, learning_rates, seeds, iterations):
    """Every rate x seed for the first `iterations` iterations in one engine run: a `GridResult`
    logged at 0 and `iterations`, with no kernels (`diverged_at` >= 0: the seed blew up)."""
    from experiments.engine.fullbatch import FullBatchTrainer

    trainer = FullBatchTrainer(x, y, spec, learning_rates, seeds=seeds)
    result = trainer.run(iterations, schedule=np.array([0, iterations]))
    return dataclasses.replace(result, kernels=np.zeros(0))


def sharpness_arguments(trainer_class, schedule, every):
    """`run`'s keyword arguments for the sharpness at every `every`-th log of `schedule`, {} if
    `every` is None or the engine does not compute it."""
    import inspect

    from experiments.engine import fullbatch

    if every is None or "sharpness_at" not in inspect.signature(trainer_class.run).parameters:
        return {}
    return {"sharpness_at": fullbatch.sharpness_schedule(schedule, every)}


def chain_state(trainer):
    """What a diagnostic log keeps: the grid's factors, [(grid, n_{j-1}, n_j)] (float64)."""
    return [np.asarray(f.numpy(), dtype=np.float64) for f in trainer.factors]


def write_chain_state(factors, step, learning_rate, depth):
    """TensorBoard summaries of one grid point's chain (`factors`, input side first, or the
    single matrix of the end-to-end rule emulating depth `depth`) to the default writer, by
    the library's one writer, `tf_overparam.callbacks.write_chain_summaries` (balancedness,
    W_e's spectrum, the effective learning rate of eq. 27); nothing for a non-finite chain."""
    from tf_overparam.callbacks import write_chain_summaries

    write_chain_summaries(factors, step, learning_rate, depth=depth)


def train_grid(task):
    """Runs one `GridTask` (in this process or in a Ray worker); returns a `GridOutcome`."""
    from experiments.engine.fullbatch import FullBatchTrainer  # TensorFlow loads here, not at import (--help)

    start = time.perf_counter()
    early = None
    if task.early_iterations:
        early = early_screen(task.x, task.y, task.spec, task.learning_rates, task.early_seeds, task.early_iterations)
    trainer = FullBatchTrainer(task.x, task.y, task.spec, task.learning_rates, seeds=task.seeds)
    diagnostics, calls = {}, [0]

    def on_log(trainer, iteration, losses):
        if calls[0] % task.diagnostics_every == 0:
            diagnostics[iteration] = chain_state(trainer)
        calls[0] += 1

    schedule = np.asarray(task.schedule)
    sharpness = sharpness_arguments(FullBatchTrainer, schedule, task.sharpness_every)
    result = trainer.run(int(schedule[-1]), schedule=schedule, on_log=on_log, **sharpness)
    return GridOutcome(task.name, result, diagnostics, time.perf_counter() - start, task.spec.depth, early)


def write_log_point(writers, learning_rates, iteration, losses, factors=None, depth=1, sharpness=None):
    """Writes one logged iteration to TensorBoard, one writer per grid point: the loss, with
    `factors` (a `chain_state`) the chain's summaries (`write_chain_state`), and with
    `sharpness` (per grid point) the rate x sharpness `lr_x_sharpness` (stable below 2). A grid
    point whose loss is not finite (diverged) is skipped."""
    import tensorflow as tf

    for g, writer in enumerate(writers):
        if not math.isfinite(losses[g]):
            continue
        with writer.as_default(step=int(iteration)):
            tf.summary.scalar("loss", losses[g])
            if sharpness is not None and math.isfinite(sharpness[g]):
                tf.summary.scalar("lr_x_sharpness", float(learning_rates[g]) * float(sharpness[g]))
            if factors is not None:
                write_chain_state([f[g] for f in factors], int(iteration), float(learning_rates[g]), depth)


def tensorboard_writers(root, name, learning_rates, seeds):
    """One file writer per grid point, under root/<name>/lr_<rate>_seed_<seed>."""
    import tensorflow as tf

    return [
        tf.summary.create_file_writer(os.path.join(str(root), name, f"lr_{rate:.3g}_seed_{seed}"))
        for rate, seed in zip(learning_rates, seeds)
    ]


def write_tensorboard(root, outcome, folder=None):
    """Writes a finished task's logs (`write_log_point` at each logged iteration), as the
    driver does after a Ray task, under root/`folder` (default the task's name)."""
    result = outcome.result
    writers = tensorboard_writers(root, folder or outcome.name, result.learning_rates, result.seeds)
    sharp_iterations = [int(i) for i in getattr(result, "sharpness_iterations", ())]
    for t, iteration in enumerate(result.iterations):
        sharpness = None
        if int(iteration) in sharp_iterations:
            sharpness = result.sharpness[sharp_iterations.index(int(iteration))]
        write_log_point(
            writers,
            result.learning_rates,
            iteration,
            result.losses[t],
            outcome.diagnostics.get(int(iteration)),
            outcome.depth,
            sharpness,
        )
    for writer in writers:
        writer.close()


CONNECT_TIMEOUT = 20.0  # seconds, --connect-timeout
POLL_SECONDS = 1.0  # how often a driver waiting for Ray tasks checks for Ctrl-C


def check_reachable(address, timeout):
    """Raises ValueError unless something accepts a TCP connection at `address` ("host:port",
    optionally "ray://host:port") within `timeout` seconds; "auto" and "local" are left to Ray."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address must be host:port (or auto), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise ValueError(
            f"no Ray cluster at --address {address} ({reason} within {timeout:g} s); start one with "
            "`ray start --head`, or leave out --address to run in-process"
        ) from error


class Executor:
    """Runs tasks in-process (`workers` and `address` None) or on Ray.

    Args:
        workers: start a local Ray with this many CPUs (one task per CPU).
        address: join the Ray cluster at this address ("auto" for the local one).
        timeout: seconds to wait for `address` to answer before giving up (Ray itself retries
            an unreachable address for minutes).
    """

    def __init__(self, workers=None, address=None, timeout=CONNECT_TIMEOUT):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"`workers` must be a positive int, got {workers!r}.")
        self.ray = None
        if workers is None and address is None:
            return
        try:
            import ray
        except ImportError as error:
            raise ValueError(
                '`workers`/`address` need Ray: pip install -e ".[ray]" (or leave them out to run in-process).'
            ) from error
        # Workers import this checkout's packages, whatever the installed copy.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        # One TensorFlow thread per task: a task holds one CPU (num_cpus=1).
        env = {
            "env_vars": {
                "PYTHONPATH": path,
                "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                "TF_NUM_INTRAOP_THREADS": "1",
                "TF_NUM_INTEROP_THREADS": "1",
            }
        }
        if address is not None:
            check_reachable(address, timeout)
            ray.init(address=address, runtime_env=env, ignore_reinit_error=True)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, runtime_env=env, ignore_reinit_error=True)
        self.ray = ray
        self._remote = ray.remote(num_cpus=1)(train_grid)

    @property
    def description(self):
        if self.ray is None:
            return "in-process"
        return f"ray ({int(self.ray.cluster_resources().get('CPU', 0))} CPUs)"

    @property
    def capacity(self):
        """How many tasks run at once: 1 in-process, the cluster's CPUs on Ray."""
        if self.ray is None:
            return 1
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def submit(self, task):
        """Starts `task` as a Ray task; returns its handle (for `next_finished`)."""
        return self._remote.remote(task)

    def next_finished(self, handles, poll_seconds=POLL_SECONDS):
        """Waits for the first of `handles` to finish; returns (its `GridOutcome`, its handle).

        It waits `poll_seconds` at a time and checks for Ctrl-C in between (a task may run for
        many minutes, and the CLI defers the interrupt to `check_interrupt`)."""
        from experiments.common.cli import check_interrupt

        while True:
            done, _ = self.ray.wait(handles, num_returns=1, timeout=poll_seconds)
            if done:
                return self.ray.get(done[0]), done[0]
            check_interrupt()

    def map(self, tasks):
        """Yields each task's `GridOutcome` as it finishes (in order in-process)."""
        if self.ray is None:
            for task in tasks:
                yield train_grid(task)
            return
        pending = [self._remote.remote(task) for task in tasks]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])

    def shutdown(self):
        if self.ray is not None:
            self.ray.shutdown()
            self.ray = None


def add_arguments(parser):
    """The sweep's CLI flags: --workers, --address and --connect-timeout."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="run configurations as Ray tasks on a local Ray with this many CPUs (needs .[ray])",
    )
    parser.add_argument(
        "--address", default=None, help="run configurations on the Ray cluster at this address (host:port or auto)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on an --address that does not answer within this time (default {CONNECT_TIMEOUT:g})",
    )


def executor_from_args(parser, args):
    """An `Executor` for the parsed flags; a bad value exits through `parser.error` (one line)."""
    try:
        return Executor(workers=args.workers, address=args.address, timeout=args.connect_timeout)
    except ValueError as error:
        parser.error(str(error))
