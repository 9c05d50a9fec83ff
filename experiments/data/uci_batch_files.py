"""The batch files of UCI 270: finding them under a folder and parsing one.

File format, one measurement per line (libsvm style, trailing space):

```
<gas class>;<concentration> 1:<f1> 2:<f2> ... 128:<f128>
```

Gas classes: 1 Ethanol, 2 Ethylene, 3 Ammonia, 4 Acetaldehyde, 5 Acetone, 6 Toluene.
"""

import math
import pathlib
import re

import numpy as np

NUM_FEATURES = 128
GAS_CLASSES = {
    1: "Ethanol",
    2: "Ethylene",
    3: "Ammonia",
    4: "Acetaldehyde",
    5: "Acetone",
    6: "Toluene",
}

_BATCH_FILE_RE = re.compile(r"batch([1-9]|10)\.dat")
_EXPECTED_INDICES = [str(i) for i in range(1, NUM_FEATURES + 1)]


def parse_batch_file(path):
    """Parses one `batch<N>.dat` file of UCI 270.

    Blank lines are skipped. Every other line must be
    `<class>;<concentration>` followed by exactly the features `1:` to
    `128:` in order, each with a finite float value.

    Args:
        path: path of the file.

    Returns:
        A tuple `(classes, concentrations, features)`: int64 array `(rows,)`,
        float64 array `(rows,)` (ppmv) and float64 array `(rows, 128)`.

    Raises:
        ValueError: for a malformed line; the message names the file, the
            1-based line number and what was wrong.

    Example:

    >>> classes, conc, feats = parse_batch_file("data/batch1.dat")
    >>> feats.shape
    (445, 128)
    """
    path = pathlib.Path(path)
    classes, concentrations, features = [], [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}, line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 text ({e})") from None
            tokens = line.split()
            if not tokens:
                continue
            gas, conc = _parse_head(tokens[0], where)
            classes.append(gas)
            concentrations.append(conc)
            features.append(_parse_features(tokens[1:], where))
    return (
        np.asarray(classes, dtype=np.int64),
        np.asarray(concentrations, dtype=np.float64),
        np.asarray(features, dtype=np.float64).reshape(-1, NUM_FEATURES),
    )


def _parse_head(token, where):
    gas_text, sep, conc_text = token.partition(";")
    if not sep:
        raise ValueError(f"{where}: expected '<gas class>;<concentration>' at the start of the line, got {token!r}")
    try:
        gas = int(gas_text)
    except ValueError:
        raise ValueError(f"{where}: gas class {gas_text!r} is not an integer") from None
    if gas not in GAS_CLASSES:
        raise ValueError(f"{where}: gas class {gas} is not one of {sorted(GAS_CLASSES)}")
    try:
        conc = float(conc_text)
    except ValueError:
        conc = math.nan
    if not math.isfinite(conc):
        raise ValueError(f"{where}: concentration {conc_text!r} is not a finite float")
    return gas, conc


def _parse_features(tokens, where):
    pairs = [token.partition(":") for token in tokens]
    indices = [index for index, _, _ in pairs]
    if indices != _EXPECTED_INDICES:
        _diagnose_indices(pairs, where)
    try:
        values = [float(text) for _, _, text in pairs]
    except ValueError:
        values = None
    if values is None or not all(map(math.isfinite, values)):
        _raise_bad_value(pairs, where)
    return values


def _raise_bad_value(pairs, where):
    for index, _, text in pairs:
        try:
            ok = math.isfinite(float(text))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{where}: value {text!r} of feature {index} is not a finite float")


def _diagnose_indices(pairs, where):
    """Raises for bad feature indices; returns if they are merely spelled
    differently (e.g. `01:`) but are 1..128 in order."""
    indices = []
    for index, sep, _ in pairs:
        if not sep:
            raise ValueError(f"{where}: feature token {index!r} is not of the form <index>:<value>")
        try:
            indices.append(int(index))
        except ValueError:
            raise ValueError(f"{where}: feature index {index!r} is not an integer") from None
    bad = [i for i in indices if not 1 <= i <= NUM_FEATURES]
    if bad:
        raise ValueError(f"{where}: feature index {bad[0]} is out of range 1..{NUM_FEATURES}")
    seen, duplicated = set(), []
    for i in indices:
        if i in seen and i not in duplicated:
            duplicated.append(i)
        seen.add(i)
    if duplicated:
        raise ValueError(f"{where}: feature index {_join(duplicated)} duplicated")
    missing = sorted(set(range(1, NUM_FEATURES + 1)) - seen)
    if missing:
        raise ValueError(
            f"{where}: feature index {_join(missing)} missing ({len(indices)} of {NUM_FEATURES} features present)"
        )
    for previous, current in zip(indices, indices[1:]):
        if current < previous:
            raise ValueError(f"{where}: feature indices out of order ({current} comes after {previous})")


def _join(numbers, limit=8):
    shown = ", ".join(str(n) for n in numbers[:limit])
    if len(numbers) > limit:
        shown += f", ... ({len(numbers)} in all)"
    return shown


def find_batch_files(directory):
    """Finds the `batch<N>.dat` files of UCI 270 under `directory`.

    The directory itself is checked first; otherwise it is searched
    recursively and the subdirectory holding the most batch files is used
    (ties: the shallowest, then the first in sorted order).

    Args:
        directory: directory to search.

    Returns:
        `None` if no batch file is found, else a tuple
        `(directory holding them, {"batch<N>": path})`, sorted by N.
    """
    root = pathlib.Path(directory).expanduser()
    if not root.is_dir():
        return None
    groups = {}
    for path in sorted(root.rglob("batch*.dat")):
        match = _BATCH_FILE_RE.fullmatch(path.name)
        if match and path.is_file() and "__MACOSX" not in path.parts:
            groups.setdefault(path.parent, {})[int(match.group(1))] = path
    if not groups:
        return None
    best = groups.get(root) or None
    if best is None:
        parent = min(groups, key=lambda p: (-len(groups[p]), len(p.parts), str(p)))
        best = groups[parent]
    else:
        parent = root
    return parent, {f"batch{n}": best[n] for n in sorted(best)}
