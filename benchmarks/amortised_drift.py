"""How far the amortised end-to-end rule (`EndToEnd(refresh_every=k)`) drifts from the exact one.

The MNIST tutorial CNN (`experiments.mnist_cnn.build_cnn`, its defaults: seed, initialisation,
L2 penalty, dropout) trains on the real MNIST training images (the 55000 after the 5000 held
out, in file order, no shuffle) with the tutorial's SGD (learning rate 0.01, momentum 0.9)
wrapped in `EndToEnd(depth=2)` on its two dense kernels (fc1 3136x512, fc2 512x10; the
convolutions train plainly). Three runs from the same weights, the same batches and the same
dropout masks: exact (P(W) every step), refresh_every=10 and refresh_every=100. At fixed steps
the training loss (cross-entropy + L2 penalty, inference mode) of a fixed set of training
images is evaluated; the table gives each amortised run's relative gap |L_k - L_exact| / L_exact.

    python -m benchmarks.amortised_drift [--steps 300] [--every 50] [--eval-examples 2000] [--out DIR]

Writes `<out>/results.json` (default runs/amortised_drift/<UTC time>/) after every run.
"""

import argparse
import gzip
import os
import pathlib
import sys
import time

import numpy as np

from experiments.common.cli import add_common_arguments, cli, quiet_tensorflow
from experiments.common.run_folder import make_run_dir, write_json_atomic

DEFAULT_DATA = pathlib.Path(os.environ.get("TF_OVERPARAM_MNIST_DIR", "/work/shared/data/mnist"))
HELD_OUT = 5000
BATCH = 64
RUNS = {"exact": None, "refresh_every=10": 10, "refresh_every=100": 100}


def load_idx(data_dir, count):
    """The first `count` training images after the held-out 5000 (scaled to [0, 1]) and labels,
    read from the MNIST idx files."""
    with gzip.open(data_dir / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(data_dir / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    chosen = slice(HELD_OUT, HELD_OUT + count)
    return images[chosen].astype("float32") / 255.0, labels[chosen].astype("int32")


def train(refresh_every, x, y, steps, every, eval_x, eval_y):
    """Loss of (eval_x, eval_y) at steps 0, every, 2 every, ..., steps."""
    import keras

    from experiments.mnist_cnn import Config, build_cnn
    from tf_overparam.optimizers import EndToEnd

    keras.utils.set_random_seed(0)
    model = build_cnn(Config())
    optimizer = EndToEnd(
        keras.optimizers.SGD(0.01, momentum=0.9),
        depth=2,
        refresh_every=refresh_every,
        variables=["*fc1/kernel", "*fc2/kernel"],
    )
    model.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = [model.evaluate(eval_x, eval_y, batch_size=500, verbose=0)]
    started = time.perf_counter()
    for start in range(0, steps, every):
        batch = slice(start * BATCH, (start + every) * BATCH)
        model.fit(x[batch], y[batch], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        losses.append(model.evaluate(eval_x, eval_y, batch_size=500, verbose=0))
    return losses, time.perf_counter() - started


def _main(argv):
    """Trains the three runs (TensorFlow and Keras load only after the arguments are read)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.amortised_drift",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--data-dir", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--out")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.steps % args.every or args.eval_examples < 1:
        parser.error("--steps, --every and --eval-examples must be positive, --steps a multiple of --every")
    if not (args.data_dir / "train-images-idx3-ubyte.gz").is_file():
        print(f"error: no MNIST idx files in {args.data_dir} (--data-dir or TF_OVERPARAM_MNIST_DIR)", file=sys.stderr)
        return 2
    x, y = load_idx(args.data_dir, args.steps * BATCH)
    eval_x, eval_y = x[: args.eval_examples], y[: args.eval_examples]
    run_dir = make_run_dir(args.out, "amortised_drift")
    quiet_tensorflow()
    steps = list(range(0, args.steps + 1, args.every))
    results = {"steps": steps, "config": vars(args) | {"data_dir": str(args.data_dir)}, "runs": {}}
    for name, refresh_every in RUNS.items():
        losses, seconds = train(refresh_every, x, y, args.steps, args.every, eval_x, eval_y)
        results["runs"][name] = {"refresh_every": refresh_every, "loss": losses, "train_seconds": seconds}
        write_json_atomic(run_dir / "results.json", results)
    exact = np.array(results["runs"]["exact"]["loss"])
    print(
        "| step | "
        + " | ".join(f"loss {name}" for name in RUNS)
        + " | "
        + " | ".join(f"gap {name}" for name in list(RUNS)[1:])
        + " |"
    )
    print("| ---: " * (2 * len(RUNS)) + "|")
    for i, step in enumerate(steps):
        losses = [results["runs"][name]["loss"][i] for name in RUNS]
        gaps = [abs(loss - exact[i]) / exact[i] for loss in losses[1:]]
        print(
            f"| {step} | "
            + " | ".join(f"{v:.4f}" for v in losses)
            + " | "
            + " | ".join(f"{g:.2e}" for g in gaps)
            + " |"
        )
    print("train seconds: " + ", ".join(f"{n} {r['train_seconds']:.0f}" for n, r in results["runs"].items()))
    print(f"results: {run_dir / 'results.json'}")
    return 0


main = cli(_main)

if __name__ == "__main__":
    sys.exit(main())
