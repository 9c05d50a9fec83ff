"""Gas Sensor Array Drift Dataset at Different Concentrations (UCI id 270).

The data set holds 13910 measurements of 16 metal-oxide gas sensors exposed
to six gases at various concentrations, recorded over 36 months and split
into ten files `batch1.dat` ... `batch10.dat`. Each measurement has 128
features (16 sensors x 8 features). Following Arora, Cohen & Hazan (2018),
`load_ethanol()` keeps the Ethanol measurements (gas class 1, 2565 rows in
the full set) and returns a regression problem: features -> concentration
(ppmv). The files' format and parser: `experiments.data.uci_batch_files`;
the download: `experiments.data.uci_archive`.

Data set page: https://archive.ics.uci.edu/dataset/270
(DOI 10.24432/C5MK6M). UCI states that the data is for research use only.

References:
    - A. Vergara, S. Vembu, T. Ayhan, M. A. Ryan, M. L. Homer, R. Huerta.
      "Chemical gas sensor drift compensation using classifier ensembles."
      Sensors and Actuators B: Chemical 166-167 (2012) 320-329.
    - I. Rodriguez-Lujan, J. Fonollosa, A. Vergara, M. Homer, R. Huerta.
      "On the calibration of sensor arrays for pattern recognition using the
      minimal number of experiments." Chemometrics and Intelligent
      Laboratory Systems 130 (2014) 123-134.
"""

import argparse
import dataclasses
import os
import pathlib

import numpy as np

from experiments.data._checksums import file_sha256
from experiments.data.uci_archive import UCI_PAGE, download_and_extract
from experiments.data.uci_batch_files import GAS_CLASSES, NUM_FEATURES, find_batch_files, parse_batch_file

UCI_URL = "https://archive.ics.uci.edu/static/public/270/gas+sensor+array+drift+dataset+at+different+concentrations.zip"
ENV_VAR = "TF_OVERPARAM_GAS_SENSOR_DIR"

NUM_BATCHES = 10
BATCH_NAMES = tuple(f"batch{i}" for i in range(1, NUM_BATCHES + 1))


@dataclasses.dataclass(frozen=True, eq=False)
class GasSensorData:
    """One gas class of UCI 270 as a regression problem.

    Undo the normalisation with `x * feature_std + feature_mean` and
    `y * target_std + target_mean` (with `normalize=False` the statistics are
    the identity: means 0, stds 1).

    Attributes:
        x: float32 array `(rows, 128)`, the sensor features.
        y: float32 array `(rows, 1)`, the concentration (ppmv).
        batches: names of the batch files read, in numeric order,
            e.g. `("batch1", "batch2", ...)`.
        rows_per_batch: dict batch name -> number of rows it contributed.
        missing_batches: names among `batch1` ... `batch10` not found.
        feature_mean: float64 array `(128,)`, subtracted from each feature.
        feature_std: float64 array `(128,)`, each feature was divided by it.
        target_mean: float, subtracted from the target.
        target_std: float, the target was divided by it.
        source: the directory the batch files were read from.
        gas_class: the gas class kept (1 = Ethanol).
        normalized: whether features and target were z-scored.
        files: dict batch name -> {"path", "sha256", "rows" (all rows of the file),
            "rows_used" (rows of `gas_class`)}: what was read, to record with a run.
        scaling: how `preprocess` scaled the data (None: as `normalized` says).
    """

    x: np.ndarray
    y: np.ndarray
    batches: tuple
    rows_per_batch: dict
    missing_batches: tuple
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float
    source: str
    gas_class: int = 1
    normalized: bool = True
    files: dict = dataclasses.field(default_factory=dict)
    scaling: str = None

    @property
    def num_rows(self):
        return int(self.x.shape[0])

    @property
    def description(self):
        """One-line human summary of what was loaded."""
        used = _compact_batch_list(self.batches)
        where = f"({used}; missing {', '.join(self.missing_batches)})"
        if not self.missing_batches:
            where = f"({used})"
        scaling = self.scaling or (
            "features and target z-scored" if self.normalized else "raw features and target (not normalised)"
        )
        return (
            f"UCI 270 {GAS_CLASSES[self.gas_class]}: {self.num_rows} rows "
            f"from {len(self.batches)} of {NUM_BATCHES} batches {where}, "
            f"{scaling}"
        )


def load_ethanol(
    data_dir=None,
    *,
    gas_class=1,
    normalize=True,
    download=False,
    cache_dir=None,
    origin=None,
):
    """Loads the Ethanol rows of UCI 270 as a regression problem.

    The batch files are looked for, in order, in: `data_dir`; the directory
    in the environment variable `TF_OVERPARAM_GAS_SENSOR_DIR`; and, only if
    `download=True`, the UCI archive fetched with `keras.utils.get_file`
    into `cache_dir` and extracted. A directory is used if it, or a
    subdirectory of it, holds `batch<N>.dat` files; any subset of `batch1`
    ... `batch10` is accepted, read in numeric order.

    Normalisation (`normalize=True`): each feature is z-scored over the rows
    returned (mean 0, population std 1; a constant feature gets std 1, so it
    becomes 0), and the target, the concentration in ppmv, is z-scored the
    same way. The statistics are returned so the scaling can be undone.
    `normalize=False` returns the raw values.

    Args:
        data_dir: directory holding the batch files, or `None`.
        gas_class: gas class to keep, an int in 1..6 (1 = Ethanol,
            2 Ethylene, 3 Ammonia, 4 Acetaldehyde, 5 Acetone, 6 Toluene).
        normalize: whether to z-score features and target.
        download: whether to download the UCI archive when no local copy
            is found.
        cache_dir: where `keras.utils.get_file` stores the archive
            (default: the Keras cache, `~/.keras`).
        origin: URL of the archive (default `UCI_URL`).

    Returns:
        A `GasSensorData`.

    Raises:
        FileNotFoundError: if no batch file is found.
        ValueError: if `gas_class` is invalid, a file is malformed or no row
            has the requested class.

    Example:

    >>> data = load_ethanol("/data/gas_sensor")
    >>> data.x.shape, data.y.shape
    ((1316, 128), (1316, 1))
    >>> print(data.description)
    UCI 270 Ethanol: 1316 rows from 8 of 10 batches (batch1..6, batch8,
    batch9; missing batch7, batch10), features and target z-scored
    """
    if isinstance(gas_class, bool) or not isinstance(gas_class, (int, np.integer)) or int(gas_class) not in GAS_CLASSES:
        raise ValueError(
            f"`gas_class` must be an int in 1..6 "
            f"({', '.join(f'{k} {v}' for k, v in GAS_CLASSES.items())}); "
            f"received gas_class={gas_class!r}"
        )
    gas_class = int(gas_class)
    origin = UCI_URL if origin is None else origin
    source, files = _locate(data_dir, download, cache_dir, origin)

    xs, ys, rows_per_batch, provenance = [], [], {}, {}
    for name, path in files.items():
        classes, concentrations, features = parse_batch_file(path)
        if classes.size == 0:
            raise ValueError(
                f"{path} holds no rows (empty or blank lines only); restore the "
                f"file from the UCI archive ({UCI_URL}) or remove it"
            )
        keep = classes == gas_class
        xs.append(features[keep])
        ys.append(concentrations[keep])
        rows_per_batch[name] = int(keep.sum())
        provenance[name] = {
            "path": str(path),
            "sha256": file_sha256(path),
            "rows": int(classes.size),
            "rows_used": rows_per_batch[name],
        }
    x = np.concatenate(xs, axis=0)
    y = np.concatenate(ys, axis=0).reshape(-1, 1)
    if x.shape[0] == 0:
        raise ValueError(
            f"no rows of gas class {gas_class} ({GAS_CLASSES[gas_class]}) in {', '.join(files)} under {source}"
        )

    if normalize:
        feature_mean, feature_std = _zscore_stats(x)
        target_mean, target_std = _zscore_stats(y)
        x = (x - feature_mean) / feature_std
        y = (y - target_mean) / target_std
        target_mean, target_std = float(target_mean[0]), float(target_std[0])
    else:
        feature_mean = np.zeros(NUM_FEATURES)
        feature_std = np.ones(NUM_FEATURES)
        target_mean, target_std = 0.0, 1.0

    return GasSensorData(
        x=x.astype(np.float32),
        y=y.astype(np.float32),
        batches=tuple(files),
        rows_per_batch=rows_per_batch,
        missing_batches=tuple(n for n in BATCH_NAMES if n not in files),
        feature_mean=feature_mean,
        feature_std=feature_std,
        target_mean=target_mean,
        target_std=target_std,
        source=str(source),
        gas_class=gas_class,
        normalized=bool(normalize),
        files=provenance,
    )


PREPROCESSINGS = {
    "zscore": "features and target z-scored",
    "minmax": "features and target min-max scaled to [0, 1]",
    "zscore-target-max": "features z-scored, target divided by its maximum",
    "zscore-raw-target": "features z-scored, target in raw ppmv",
}


def preprocess(data, scheme="zscore", bias=False):
    """Scales raw data (`load_ethanol(..., normalize=False)`) by one of `PREPROCESSINGS`.

    The scalings are affine, x_scaled = (x - feature_mean) / feature_std per column and
    y_scaled = (y - target_mean) / target_std, and the returned `GasSensorData` holds those
    offsets and scales (min-max: offset = min, scale = max - min; a constant column maps to
    0). `bias=True` appends a constant feature 1 after scaling (its offset 0, scale 1).

    Raises:
        ValueError: unknown `scheme`, or `data` already normalised.
    """
    if scheme not in PREPROCESSINGS:
        raise ValueError(f"`scheme` must be one of {sorted(PREPROCESSINGS)}, got {scheme!r}.")
    if data.normalized:
        raise ValueError("`data` must be raw: load it with load_ethanol(..., normalize=False).")
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
    if scheme == "minmax":
        x_offset, x_scale = x.min(axis=0), np.ptp(x, axis=0)
        x_scale = np.where(x_scale == 0, 1.0, x_scale)
        y_offset, y_scale = float(y.min()), float(np.ptp(y)) or 1.0
    else:
        x_offset, x_scale = _zscore_stats(x)
        y_offset, y_scale = {
            "zscore": tuple(float(v[0]) for v in _zscore_stats(y)),
            "zscore-target-max": (0.0, float(np.abs(y).max()) or 1.0),
            "zscore-raw-target": (0.0, 1.0),
        }[scheme]
    x = (x - x_offset) / x_scale
    y = (y - y_offset) / y_scale
    description = PREPROCESSINGS[scheme]
    if bias:
        x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        x_offset, x_scale = np.append(x_offset, 0.0), np.append(x_scale, 1.0)
        description += ", with a constant bias feature"
    return dataclasses.replace(
        data,
        x=x.astype(np.float32),
        y=y.astype(np.float32),
        feature_mean=x_offset,
        feature_std=x_scale,
        target_mean=y_offset,
        target_std=y_scale,
        normalized=True,
        scaling=description,
    )


def _zscore_stats(a):
    """Per-column mean and population std; a constant column gets its value
    as mean and std 1, so it maps exactly to 0."""
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    constant = a.max(axis=0) == a.min(axis=0)
    mean = np.where(constant, a[0], mean)
    std = np.where(constant, 1.0, std)
    return mean, std


def _locate(data_dir, download, cache_dir, origin):
    """Returns `(directory, {batch name: path})` of the first place that
    holds batch files."""
    tried = []
    if data_dir is not None:
        # An explicit folder is never silently replaced by another source.
        found = find_batch_files(data_dir)
        if found:
            return found
        state = "does not exist" if not pathlib.Path(data_dir).expanduser().exists() else "holds no batch<N>.dat files"
        raise FileNotFoundError(
            f"data_dir={os.fspath(data_dir)!r} {state}: pass the folder holding "
            f"batch1.dat ... batch10.dat (from {UCI_PAGE})"
        )
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        found = find_batch_files(env_dir)
        if found:
            return found
        tried.append(f"${ENV_VAR}={env_dir!r}")
    else:
        tried.append(f"${ENV_VAR} (not set)")
    if download:
        extracted = download_and_extract(origin, cache_dir)
        found = find_batch_files(extracted)
        if found:
            return found
        tried.append(f"the archive downloaded from {origin} (extracted to {extracted!s})")
    else:
        tried.append("no download (download=False)")
    raise FileNotFoundError(
        "UCI 270 gas sensor data not found: looked for files "
        f"batch1.dat ... batch10.dat (any subset) in {'; '.join(tried)}. "
        f"Get the data set from {UCI_PAGE} (archive: {UCI_URL}), unpack it, "
        "and pass the directory holding the batch files as `data_dir` "
        f"(`--data-dir` on the command line) or set {ENV_VAR} to it; "
        "or call with `download=True` (`--download` on the command line) "
        "to fetch and extract it into the Keras cache."
    )


def _compact_batch_list(names):
    """("batch1", ..., "batch6", "batch8") -> "batch1..6, batch8"."""
    numbers = [int(n.removeprefix("batch")) for n in names]
    runs = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"batch{run[0]}..{run[-1]}")
        else:
            parts.extend(f"batch{n}" for n in run)
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--gas-class", type=int, default=1)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    data = load_ethanol(
        args.data_dir,
        gas_class=args.gas_class,
        download=args.download,
        cache_dir=args.cache_dir,
    )
    print(data.description)
    print(f"source: {data.source}")


if __name__ == "__main__":
    main()
