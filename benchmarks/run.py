"""Benchmarks of tf_overparam: the full-batch engine, the layer, the update rule, and optimizers
side by side on real models.

    python -m benchmarks.run [--data-dir DIR] [--quick] [--sections NAME ...] [--out DIR]

1. fullbatch (needs the gas sensor data; skipped with a line saying how to give it otherwise):
   steps per second of `model.fit`, of `model.fit` with `steps_per_execution`, and of the
   full-batch engine (depth 1, a depth-2 width-1 chain, the eq. 24 rule at depth 2) on the 1316 x
   128 Ethanol rows, l4 loss, one output, for one learning rate and for the experiment's 9-point
   grid (3 with --quick), next to the machine's bound (`benchmarks.fullbatch`).
2. layer: the MNIST tutorial CNN with plain `Dense`, with `OverparamDense`, after `collapse` and
   trained by `EndToEnd`; train step and inference on a random batch of 64 (`benchmarks.layer`).
3. update_rule: one eq. 24 step against one SGD step and in `W^T G` matmuls of the same kernel,
   exact and amortised, next to its floor (`benchmarks.update_rule`).
4. side_by_side: the tutorial CNN (batch 64), ResNet50 and MobileNetV2 (`weights=None`, 32x32,
   batch 8) under SGD, Adam, Muon and `EndToEnd(SGD)` exact and with refresh_every=10 and 100, as
   ratios to SGD next to the floor of the end-to-end products; the batch at which the amortised
   step costs at most 1.2x SGD; `overparameterize(preserve_function=True)` of ResNet50 against
   `clone_model` (`benchmarks.side_by_side`).
5. ns_threshold: at depth 2, per group of one matrix shape of the kernels `EndToEnd` selects in
   those models, the preconditioner by the eigh and by Newton-Schulz, whether Newton-Schulz
   converged and what method="auto" picks; the column count from which Newton-Schulz is faster
   (`benchmarks.ns_threshold`).
6. distributed: the tutorial CNN's step (batch 64) under SGD and `EndToEnd(SGD)` exact and with
   refresh_every=10, on one device and under `tf.distribute.MirroredStrategy` on 2 logical CPU
   devices (a subprocess): how much of the preconditioner's work the replicas repeat
   (`benchmarks.distributed`).

Every number is a median over interleaved repeats (`benchmarks.timing.measure`); the first
call (tracing) is reported apart. Ratios are taken within one run, so that a shared machine's
load, which moves the absolute numbers, moves them less. The results, with what they were
measured on (`machine`: versions, devices, git commit), are written atomically to
`<out>/results.json` (default runs/benchmarks/<UTC time>/) after every section; at the end the
Markdown tables are printed and written to `<out>/tables.md`.

With `--backend NAME` (tensorflow, jax, torch) it runs instead the CNN and the end-to-end
direction on that Keras backend, without TensorFlow off it (`benchmarks/backend_bench.py`).
"""

import argparse
import dataclasses
import datetime
import os
import sys

from benchmarks.config import (  # noqa: F401 - re-exported
    DATA_SECTIONS,
    SECTIONS,
    Config,
    Distributed,
    NsThreshold,
    SideBySide,
)
from experiments.common.cli import UserError, add_common_arguments, cli, quiet_tensorflow
from experiments.common.run_folder import make_run_dir, replace_atomic, write_json_atomic
from experiments.data import gas_sensor


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", help=f"folder of the gas sensor batch*.dat files (or set {gas_sensor.ENV_VAR}); fullbatch only"
    )
    parser.add_argument("--out", help="output folder (default runs/benchmarks/<UTC time>)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI scale: short calls, small kernels, a tiny side-by-side (a few minutes)",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="NAME", help=f"of {', '.join(SECTIONS)}"
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    overrides = dict(data_dir=args.data_dir, out=args.out, sections=tuple(s for s in SECTIONS if s in args.sections))
    return Config.quick(**overrides) if args.quick else Config(**overrides)


def data_skip_reason(config):
    """Why the data sections cannot run (no --data-dir and no usable $TF_OVERPARAM_GAS_SENSOR_DIR),
    or None. An explicit --data-dir that holds no data is the user's error, not a skip."""
    if config.data_dir is not None:
        if gas_sensor.find_batch_files(config.data_dir) is None:
            raise UserError(f"--data-dir {config.data_dir} holds no gas sensor batch<N>.dat files")
        return None
    if os.environ.get(gas_sensor.ENV_VAR) and gas_sensor.find_batch_files(os.environ[gas_sensor.ENV_VAR]):
        return None
    return (
        f"no gas sensor data: pass --data-dir DIR (the folder of batch1.dat ... batch10.dat, from "
        f"{gas_sensor.UCI_PAGE}) or set {gas_sensor.ENV_VAR}"
    )


def _main(argv):
    """Runs the chosen sections; writes `<out>/results.json` after each, prints the tables;
    returns the results file's path."""
    config = parse_args(argv)
    skipped = {}
    if any(section in DATA_SECTIONS for section in config.sections):
        reason = data_skip_reason(config)
        if reason is not None:
            skipped = {section: reason for section in config.sections if section in DATA_SECTIONS}
            print(f"skipped: {', '.join(skipped)} ({reason})", flush=True)
    run_dir = make_run_dir(config.out, "benchmarks")
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    from benchmarks.tables import format_tables
    from benchmarks.timing import machine_info

    tf.get_logger().setLevel("ERROR")  # the benign "retracing" notes of the many models' functions
    keras.utils.set_random_seed(0)
    path = run_dir / "results.json"
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": dataclasses.asdict(config),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "skipped": skipped,
    }

    def write(section=None, partial=None):
        if section is not None:
            results[section] = partial
        results["loadavg_end"] = os.getloadavg()
        write_json_atomic(path, results)

    write()
    for section in config.sections:
        if section not in skipped:
            write(section, run_section(section, config, lambda partial, section=section: write(section, partial)))
    tables = format_tables(results)
    replace_atomic(run_dir / "tables.md", lambda file: file.write(tables + "\n"))
    print(tables)
    print(f"\nresults: {path} (tables: {run_dir / 'tables.md'})")
    return path


def run_section(name, config, write):
    """One section's results; `write(partial)` saves a long section's finished part."""
    if name == "fullbatch":
        from benchmarks.fullbatch import fullbatch_section

        data = gas_sensor.load_ethanol(config.data_dir)
        return {"data": data.description, **fullbatch_section(config, data.x, data.y)}
    if name == "layer":
        from benchmarks.layer import layer_section

        return layer_section(config)
    if name == "update_rule":
        from benchmarks.update_rule import update_rule_section

        return update_rule_section(config)
    if name == "ns_threshold":
        from benchmarks.ns_threshold import ns_threshold_section

        return ns_threshold_section(config.ns_threshold, write)
    if name == "distributed":
        from benchmarks.distributed import distributed_section

        return distributed_section(config.distributed)
    from benchmarks.side_by_side import side_by_side_section

    return side_by_side_section(config.side_by_side, write)


main = cli(_main)

if __name__ == "__main__":
    from benchmarks import backend_bench

    if backend_bench.requested_backend(sys.argv[1:]) is not None:
        backend_bench.main(sys.argv[1:])
    else:
        main()
