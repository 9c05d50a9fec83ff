"""MNIST's four original IDX files: their names, sizes and sha256, where a run finds them, and
whether it can get them at all, decided without TensorFlow (so that a command line fails in
seconds, before the slow import).

`experiments.data.mnist` (TensorFlow Datasets) builds the data set from these files; this
module is what it shares with the command lines that must not import TensorFlow.
"""

import os
import pathlib
import socket
import threading

from experiments.data._checksums import file_sha256

ENV_VAR = "TF_OVERPARAM_MNIST_DIR"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# (size in bytes, sha256) of the original files, as registered in tfds' url_checksums/mnist.txt.
FILE_CHECKSUMS = {
    "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
MIRROR_HOST = "storage.googleapis.com"
MIRROR_URL = f"https://{MIRROR_HOST}/cvdf-datasets/mnist/"
ORIGINAL_URL = "http://yann.lecun.com/exdb/mnist/"
NUM_TRAIN = 60000
NUM_TEST = 10000
# How long the reachability probe of the mirror may take (name lookup included) before a run
# without local data is told to use a manual folder.
PROBE_SECONDS = 8.0


class MnistNotFoundError(FileNotFoundError):
    """MNIST could be neither read from a manual folder nor downloaded."""


class MnistCorruptError(ValueError):
    """A file of the manual folder is not the original (size or sha256 differ)."""


def instructions(manual_dir=None):
    """Where to get the four files and where to put them."""
    where = f" ({manual_dir})" if manual_dir else ""
    return (
        f"Get the four original MNIST files {', '.join(FILES)} from {MIRROR_URL} (a mirror of "
        f"{ORIGINAL_URL}) and put them, still gzipped and unrenamed, in one folder{where}; "
        f"then pass that folder as `manual_dir` (--manual-dir) or set {ENV_VAR} to it."
    )


def resolve_manual_dir(manual_dir=None):
    """The manual folder to use: `manual_dir`, else `$TF_OVERPARAM_MNIST_DIR`, else None.

    Raises:
        MnistNotFoundError: a folder was named but it is missing or lacks some of the files
            (an explicit folder is not silently replaced by a download).
        MnistCorruptError: a file's size or sha256 is not the original's. This is checked here,
            before tfds, so a corrupt file is reported even when tfds has prepared MNIST before
            (tfds would use its cache and never read the folder).
    """
    source = "manual_dir"
    if manual_dir is None and os.environ.get(ENV_VAR):
        manual_dir, source = os.environ[ENV_VAR], ENV_VAR
    if manual_dir is None:
        return None
    path = pathlib.Path(manual_dir).expanduser()
    if not path.is_dir():
        raise MnistNotFoundError(f"MNIST folder {path} (from {source}) does not exist. " + instructions(path))
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise MnistNotFoundError(
            f"MNIST folder {path} (from {source}) lacks {', '.join(missing)}. " + instructions(path)
        )
    for name in FILES:
        check_file(path / name)
    return path


def check_file(path):
    """Raises `MnistCorruptError` unless the file at `path` has the size and sha256 of the
    original MNIST file of its name."""
    path = pathlib.Path(path)
    size, sha256 = FILE_CHECKSUMS[path.name]
    digest = file_sha256(path)
    if path.stat().st_size != size or digest != sha256:
        raise MnistCorruptError(
            f"MNIST file {path} is corrupt or not the original ({path.stat().st_size} bytes, sha256 "
            f"{digest[:12]}..., expected {size} bytes, sha256 {sha256[:12]}...): download it again "
            f"from {MIRROR_URL}{path.name}"
        )


def tfds_data_dir(data_dir=None):
    """The folder tfds keeps prepared data sets in: `data_dir`, else `$TFDS_DATA_DIR`, else
    tfds' default `~/tensorflow_datasets`."""
    if data_dir is None:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return pathlib.Path(data_dir).expanduser()


def is_prepared(data_dir=None):
    """Whether tfds has prepared MNIST in `data_dir` (a version folder with its dataset_info.json,
    which tfds writes last)."""
    return any(tfds_data_dir(data_dir).glob("mnist/*/dataset_info.json"))


def mirror_reachable(timeout=PROBE_SECONDS, host=MIRROR_HOST, port=443):
    """(True, None) if a TCP connection to the mirror opens within `timeout` seconds, else
    (False, why). The name lookup has no timeout of its own, so the probe runs in a thread."""
    outcome = {}

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" not in outcome:
        return False, f"no answer within {timeout:g} s"
    error = outcome["error"]
    return error is None, None if error is None else f"{type(error).__name__}: {error}"


def check_available(manual_dir=None, data_dir=None, timeout=PROBE_SECONDS):
    """Decides, before tfds runs, whether MNIST can be had: from the manual folder (checked as in
    `resolve_manual_dir`), else from tfds' prepared copy in `data_dir`, else by a download if
    the mirror answers. Returns "manual", "prepared" or "download".

    Raises:
        MnistNotFoundError: none of the three; the message says where to get the files and
            where to put them (tfds would otherwise retry its download for minutes).
        MnistCorruptError: as `resolve_manual_dir`.
    """
    if resolve_manual_dir(manual_dir) is not None:
        return "manual"
    if is_prepared(data_dir):
        return "prepared"
    reachable, why = mirror_reachable(timeout)
    if reachable:
        return "download"
    raise MnistNotFoundError(
        f"MNIST is not prepared in the tfds data_dir {tfds_data_dir(data_dir)} and could not be downloaded "
        f"({MIRROR_HOST} unreachable: {why}). " + instructions()
    )
