"""MNIST through tensorflow-datasets, offline from the four original IDX files.

`load_mnist()` returns the tfds MNIST splits as `tf.data.Dataset`s of `(image, label)`, image
uint8 `(28, 28, 1)`, label int64. tfds' MNIST builder asks its download manager for four URLs
(`https://storage.googleapis.com/cvdf-datasets/mnist/<file>`, the mirror of
http://yann.lecun.com/exdb/mnist/). The download manager first looks for each file, under the
file name registered in tfds' checksum list, in `DownloadConfig(manual_dir=...)`; a file found
there is used instead of the download, after its size and sha256 are checked against the
registered ones (a wrong file raises `NonMatchingChecksumError`). So a folder holding

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

(the original files, byte for byte) prepares MNIST without any network access. The folder is
`manual_dir`, else the environment variable `TF_OVERPARAM_MNIST_DIR`; with neither, tfds
downloads the files as usual, once `experiments.data.mnist_files.check_available` has found the
mirror reachable (offline, the error comes in seconds instead of after tfds' retries). The folder is only read; tfds writes the decompressed files and
the prepared TFRecords under `data_dir` (default tfds' own, `~/tensorflow_datasets`), once:
later calls read the prepared data and need neither the folder nor the network.

`train_pipeline` / `eval_pipeline` turn a split into the batched input pipeline of the
experiments (cache, seeded shuffle, scaling, batch, prefetch).
"""

import tensorflow as tf

from experiments.data.mnist_files import (  # noqa: F401 - the files' facts, re-exported here
    ENV_VAR,
    FILE_CHECKSUMS,
    FILES,
    MIRROR_URL,
    NUM_TEST,
    NUM_TRAIN,
    ORIGINAL_URL,
    MnistCorruptError,
    MnistNotFoundError,
    check_available,
    check_file,
    instructions,
    is_prepared,
    resolve_manual_dir,
)

# The TensorFlow tutorial's scaling: (x - PIXEL_DEPTH / 2) / PIXEL_DEPTH, values in [-0.5, 0.5].
PIXEL_DEPTH = 255.0


def download_config(manual_dir=None):
    """The `tfds.download.DownloadConfig` that reads the IDX files from `manual_dir` (resolved
    as in `resolve_manual_dir`); None when there is no folder (tfds' own download)."""
    import tensorflow_datasets as tfds

    path = resolve_manual_dir(manual_dir)
    if path is None:
        return None
    # try_download_gcs=False: prepare from the local files, never from tfds' GCS bucket.
    return tfds.download.DownloadConfig(manual_dir=str(path), try_download_gcs=False)


def load_mnist(splits=("train", "test"), manual_dir=None, data_dir=None):
    """MNIST splits as `tf.data.Dataset`s of `(image uint8 (28, 28, 1), label int64)`.

    Args:
        splits: a tfds split string or a sequence of them ("train", "test", "train[5000:]", ...).
        manual_dir: folder of the four original `*-ubyte.gz` files; default
            `$TF_OVERPARAM_MNIST_DIR`; with neither, tfds downloads them.
        data_dir: where tfds writes the prepared data set; default tfds' (`~/tensorflow_datasets`).

    Returns:
        One dataset, or a list of them when `splits` is a sequence.

    Raises:
        MnistNotFoundError: the named folder lacks files, or MNIST is not prepared in `data_dir`
            and the mirror cannot be reached (decided in seconds by `check_available`, before
            tfds would retry for minutes), or the download failed; the message says where to
            get the files and where to put them.
    """
    import tensorflow_datasets as tfds

    source = check_available(manual_dir, data_dir)
    config = download_config(manual_dir) if source == "manual" else None
    kwargs = {"download_config": config} if config is not None else {}
    try:
        return tfds.load(
            "mnist",
            split=list(splits) if not isinstance(splits, str) else splits,
            as_supervised=True,
            shuffle_files=False,
            data_dir=None if data_dir is None else str(data_dir),
            download_and_prepare_kwargs=kwargs,
        )
    except (OSError, tf.errors.OpError) as error:
        if config is not None:
            raise
        raise MnistNotFoundError(
            f"MNIST is not prepared in the tfds data_dir and could not be downloaded "
            f"({type(error).__name__}: {error}). " + instructions()
        ) from error


def scale_images(images):
    """uint8 pixels to float32 as the TensorFlow tutorial does: (x - 127.5) / 255, in [-0.5, 0.5]."""
    return (tf.cast(images, tf.float32) - PIXEL_DEPTH / 2.0) / PIXEL_DEPTH


def train_pipeline(dataset, batch_size=64, seed=0, take=None, shuffle_buffer=None):
    """cache -> seeded shuffle (a new order each epoch, the same orders for every pipeline built
    with the same seed) -> scale -> batch (full batches only) -> prefetch.

    Args:
        dataset: `(image uint8, label)` examples.
        batch_size: examples per batch; the last partial batch of an epoch is dropped.
        seed: int, the shuffle seed.
        take: int or None, keep only the first `take` examples (before shuffling).
        shuffle_buffer: int or None (default: the whole data set, a uniform shuffle).
    """
    if take is not None:
        dataset = dataset.take(take)
    dataset = dataset.cache()
    if shuffle_buffer is None:
        shuffle_buffer = int(dataset.cardinality()) if dataset.cardinality() > 0 else NUM_TRAIN
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda x, y: (scale_images(x), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(dataset, batch_size=500, take=None):
    """cache -> scale -> batch (keeping the last partial batch) -> prefetch, in a fixed order."""
    if take is not None:
        dataset = dataset.take(take)
    dataset = dataset.cache().map(lambda x, y: (scale_images(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
