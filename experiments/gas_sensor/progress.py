"""The one progress bar and time estimate of a gas sensor run.

The bar counts work in the cost model's seconds (`plan.stage_cost`) over every stage of the run,
screens and final stages alike, so that the estimate printed at the start and the bar's agree.
The time left is the work left times the seconds per unit of work: the cost model's (divided by
the tasks that run at once) until a stage of this session finishes, then the ratio this session
measured (wall time over work done), refitted as each stage finishes. After a resume the bar
starts at the work already done, and only this session's work and time enter the ratio.
"""

import sys
import time

from tqdm import tqdm

from experiments.common.cli import format_seconds

BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}"


class Progress:
    """Work done and left, the bar, and the estimate of the time left.

    Args:
        total: modelled work of the whole run (cost-model seconds).
        done: work already done (finished stages of earlier sessions).
        parallel: stages that run at once (1 in-process, the CPUs of a Ray cluster).
    The bar is drawn from `start()` on, so that lines printed before it stay above it.
    """

    def __init__(self, total, done=0.0, parallel=1):
        self.total = float(total)
        self.done = float(done)
        self.prior_scale = 1.0 / max(1, parallel)
        self.scale = None  # measured seconds per unit of work, once a stage of this session finished
        self.session_work = 0.0
        self.started = time.monotonic()
        self.bar = None

    def start(self):
        """Draws the bar, at the work done so far; this session's clock starts now."""
        self.started = time.monotonic()
        self.bar = tqdm(total=self.total, initial=self.done, bar_format=BAR_FORMAT, file=sys.stdout, mininterval=5)
        self._show()

    def estimate_seconds(self):
        """The time left by the current fit."""
        return max(0.0, self.total - self.done) * (self.prior_scale if self.scale is None else self.scale)

    def describe(self, name):
        if self.bar is not None:
            self.bar.set_description_str(name, refresh=False)

    def advance(self, work):
        """Records `work` done in this session."""
        work = min(work, self.total - self.done)  # float sums of a stage's fractions may pass 1
        self.done += work
        self.session_work += work
        self._show(refresh=False)  # the bar redraws at most every `mininterval` seconds
        if self.bar is not None:
            self.bar.update(work)

    def replan(self, planned, actual):
        """A stage turned out to cost `actual` where `planned` was counted (a final stage with a
        rate more than planned, beyond the grid's edge)."""
        self.total += actual - planned
        if self.bar is not None:
            self.bar.total = self.total
        self._show()

    def stage_finished(self):
        """Refits the seconds per unit of work to this session's measurement."""
        if self.session_work > 0:
            self.scale = (time.monotonic() - self.started) / self.session_work
        self._show()

    def _show(self, refresh=True):
        if self.bar is not None:
            self.bar.set_postfix_str(f"about {format_seconds(self.estimate_seconds())} left", refresh=refresh)

    def close(self):
        """Closes the bar (before anything else is printed: an interruption's line comes after it)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
