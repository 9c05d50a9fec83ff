"""Reproduces the paper's regression figures on the UCI gas sensor Ethanol problem.

    python -m experiments.gas_sensor --data-dir ../shared/data/gas_sensor [--figure depth init ...]

Figures (Arora, Cohen & Hazan 2018, Section 8 and the authors' blog):
- depth:      l2 and l4 loss, depths 1-4 with hidden width 1 and a wide one, and next to
              depths 2 and 3 the end-to-end update rule (eq. 24) on a single matrix;
- lr-grid:    for every configuration, the final loss over the learning-rate grid;
- optimizers: l4: GD depth 1/2/3, AdaGrad, AdaDelta, Adam depth 1 and 2, each at its best rate;
- init:       l4: near-zero versus identity (linear residual) initialisation of deep chains;
- preprocessing (not in "all"): l4 GD depth 1 against depth 2 under each scaling of
              `experiments.data.gas_sensor.PREPROCESSINGS`, without and with a bias feature.

All runs are full-batch, no bias (features and target are z-scored), and train every point of
the learning-rate grid together (`experiments.engine.fullbatch`). Each configuration runs in
stages (`experiments.gas_sensor.stages`), each one after the last:
1. screen: the coarse log grid (`grid_points` rates), seed 0, for `screen_fraction` of the
   horizon (default all of it: a deep chain's effective rate grows with its end-to-end norm,
   eq. 27, so a rate stable early can diverge late);
2. final: the screen's best rate and `refine_points` log-even rates inside each interval to its
   grid neighbours (one grid step beyond an edge), with every seed (`headline_seeds` for the
   headline configurations, `seeds` for the rest), for the whole horizon;
3. below: only if every final rate is flagged, a round one coarse grid step below;
4. edge: for the headline configurations, rounds of 3 rates bisecting the stability edge until
   it is known to 2%; then the sensitivity of the headline to depth 1's rate (l4 GD depth 1 at
   6 rates from 0.002 to its edge).
Every stage also runs an early screen: its rates x 200 seeds for 300 iterations. A rate that
blows up early for at least 5% of the draws is flagged; below that, a seed of a full run that
blew up early is that seed's failure, left out of the medians and listed in results.json.
The headline configurations run first, l4 GD depth 1 first of all (every target and speedup
is measured against it). After a configuration's final stage, and once it is done, results.json,
its TensorBoard runs and the figures that hold it are written.

A best rate is chosen among the unflagged rates whose median final losses lie within 1% of the
lowest: the one fastest to the hardest target reached (targets: multiples of l4 GD depth 1's
best final loss; its own screen, before any target exists, takes the lowest final loss), and
for a headline configuration only up to its stability edge. Per target, the best rate is the
one with the smallest median over seeds of the sustained iterations-to-target
(`experiments.common.curves`). Speedups are ratios of medians, with the range of the per-seed
ratios.

The run folder (`--out`, default runs/gas_sensor/<UTC time>) holds config.json (with the data
files' sha256), sessions.json and results.json (the wall time of every session and their sum),
one PNG per figure, TensorBoard logs (`tensorboard --logdir <run folder>/tensorboard`), the
finished grids (grids/*.npz) and the checkpoint of the stage in progress. Ctrl-C keeps all of
it; `--resume <run folder>` with the same options continues where it stopped. `--out` never
reuses a folder that holds a run. Stages run in-process, or as Ray tasks with --workers or
--address.
"""

from experiments.gas_sensor.cli import main
from experiments.gas_sensor.plan import FIGURES, HEADLINE, Config, RunConfig, Stage
from experiments.gas_sensor.report import summarize

__all__ = ["FIGURES", "HEADLINE", "Config", "RunConfig", "Stage", "main", "summarize"]
