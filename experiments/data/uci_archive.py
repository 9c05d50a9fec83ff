"""The UCI 270 archive: downloaded with `keras.utils.get_file` and unpacked safely (nested zip
files included) next to it."""

import os
import pathlib
import re
import shutil
import urllib.parse
import zipfile

from experiments.data.uci_batch_files import find_batch_files

UCI_PAGE = "https://archive.ics.uci.edu/dataset/270"
# How deep nested zip files inside the downloaded archive are unpacked.
_MAX_NESTED_ZIP_DEPTH = 3


def download_and_extract(origin, cache_dir):
    """Downloads the archive at `origin` with `keras.utils.get_file` and
    extracts it (and, if needed, zip files inside it) next to it."""
    from keras.utils import get_file  # Lazy: TensorFlow is slow to import.

    fname = os.path.basename(urllib.parse.urlsplit(origin).path)
    fname = re.sub(r"[^A-Za-z0-9._+-]", "_", urllib.parse.unquote(fname))
    if not fname.strip("._"):
        fname = "gas_sensor_uci270.zip"
    if cache_dir is not None:
        # get_file silently falls back to /tmp/.keras if cache_dir does not
        # exist yet (it tests it with os.access), so create it first.
        cache_dir = pathlib.Path(cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        archive = pathlib.Path(
            get_file(
                fname=fname,
                origin=origin,
                cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                cache_subdir="datasets",
            )
        )
    except Exception as e:  # get_file raises a bare Exception for URL errors
        message = " ".join(str(e).split())
        raise ConnectionError(
            f"could not download {origin} ({message}); check the network, or "
            f"get the archive from {UCI_PAGE} by hand and pass the folder "
            "of its batch files as `data_dir`"
        ) from e
    target = archive.with_name(archive.name.removesuffix(".zip") + "_extracted")
    if not target.is_dir():
        _extract_zip(archive, target)
    for _ in range(_MAX_NESTED_ZIP_DEPTH):
        if find_batch_files(target):
            break
        nested = [p for p in sorted(target.rglob("*.zip")) if not p.with_name(p.name[:-4] + "_extracted").exists()]
        if not nested:
            break
        for inner in nested:
            _extract_zip(inner, inner.with_name(inner.name[:-4] + "_extracted"))
    return target


def _extract_zip(archive, target):
    """Extracts `archive` into `target` atomically, refusing members that
    would land outside it."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                parts = pathlib.PurePosixPath(member.replace("\\", "/")).parts
                if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise ValueError(f"{archive}: unsafe member path {member!r}")
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{archive} is not a valid zip archive ({e}); delete it to download it again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, target)
