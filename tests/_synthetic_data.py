"""Small synthetic data sets in the real files' formats, for tests that must run without the
shared data: UCI 270 batch files and a linear regression problem."""

import numpy as np


def regression(rows=64, inputs=128, seed=0):
    """z-scored features and a z-scored linear target with a little noise, float64."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, inputs))
    y = x @ rng.normal(size=(inputs, 1)) / np.sqrt(inputs) + 0.1 * rng.normal(size=(rows, 1))
    x = (x - x.mean(0)) / x.std(0)
    return x, (y - y.mean()) / y.std()


def batch_line(gas, concentration, values):
    """One line of a UCI 270 batch file."""
    return f"{gas};{concentration} " + " ".join(f"{i}:{v}" for i, v in enumerate(values, 1)) + " \n"


def write_batch_files(folder, batches=(1, 2), rows=24, seed=0):
    """Writes batch<N>.dat files: `rows` Ethanol rows (gas 1) and 2 Ethylene rows each, with
    a concentration linear in the features. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = regression(rows * len(batches), seed=seed)
    for i, batch in enumerate(batches):
        lines = [
            batch_line(1, f"{100 + 50 * y[r, 0]:.6f}", [f"{v:.6f}" for v in x[r]])
            for r in range(i * rows, (i + 1) * rows)
        ]
        lines += [batch_line(2, "50.0", ["1.0"] * 128)] * 2
        (folder / f"batch{batch}.dat").write_text("".join(lines))
    return folder
